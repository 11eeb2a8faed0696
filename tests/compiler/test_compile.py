"""The compile stage: BatchNorm folding, Relax import, host and cross builds (ELF checks)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import randomize_batchnorm  # noqa: E402

from lprnet_edge.compiler.target import load_target  # noqa: E402
from lprnet_edge.runtime.artifact import machine_arch  # noqa: E402

# ELF e_machine values (bytes 18-19, little endian).
EM_ARM, EM_X86_64, EM_AARCH64 = 40, 62, 183


def elf_machine(path: Path) -> tuple[int, int]:
    """(EI_CLASS: 1 = 32-bit, 2 = 64-bit, e_machine) of an ELF file."""
    head = Path(path).read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return head[4], int.from_bytes(head[18:20], "little")


@pytest.fixture(scope="module")
def tiny():
    from lprnet_edge.model.lprnet import LPRNet

    torch.manual_seed(0)
    m = LPRNet(class_num=68)
    randomize_batchnorm(m)
    return m.eval()


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 24, 94)).astype(np.float32)


def _ref(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_fold_batchnorm_is_exact_and_keeps_zeros(tiny, x):
    from torch import nn

    from lprnet_edge.model.bn_fold import fold_batchnorm

    folded = fold_batchnorm(tiny)  # a copy: the original keeps its BatchNorms
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    np.testing.assert_allclose(_ref(folded, x), _ref(tiny, x), atol=1e-4, rtol=1e-4)

    sparse = copy.deepcopy(tiny)
    with torch.no_grad():
        w = sparse.backbone[0].weight
        w[w.abs() < w.abs().median()] = 0
    folded = fold_batchnorm(sparse)
    assert torch.equal(folded.backbone[0].weight == 0, sparse.backbone[0].weight == 0)


@pytest.fixture(scope="module")
def relax_tiny(tiny):
    pytest.importorskip("tvm")
    from lprnet_edge.compiler.frontend import to_relax

    return to_relax(tiny, "torch.export")


@pytest.mark.slow
def test_to_relax_lifts_every_weight(relax_tiny):
    mod, params = relax_tiny
    names = [v.name for v in mod["main"].params]
    assert names[0] == "x"
    assert names[1:] == list(params)
    # 15 backbone convolutions (BatchNorm folded into them) and the head split in 4 parts by
    # channel folding (model.channel_fold), weight + bias each, plus the head's bias.
    assert len(params) == 2 * 15 + 2 * 4 + 1
    assert all(a.dtype == np.float32 for a in params.values())
    x_ty = mod["main"].params[0].ty
    assert [int(s) for s in x_ty.shape] == [1, 3, 24, 94] and x_ty.dtype == "float32"
    assert "batch_norm" not in mod.script()


@pytest.mark.slow
def test_nhwc_weights_are_transposed_at_import(relax_tiny, tiny):
    """NHWC convolutions take HWIO weights: the transposes ConvertLayout adds are applied to
    the stored weights once, not run on every call."""
    from lprnet_edge.compiler.frontend import to_relax

    mod, params = relax_tiny  # the default layout
    nchw_mod, nchw = to_relax(tiny, layout="NCHW")
    assert list(params) == list(nchw)
    w = "p_backbone_4_block_2_weight"
    assert nchw[w].shape == (32, 32, 3, 1) and params[w].shape == (3, 1, 32, 32)
    np.testing.assert_array_equal(params[w], nchw[w].transpose(2, 3, 1, 0))
    script = mod["main"].script()
    assert 'data_layout="NHWC", kernel_layout="HWIO"' in script
    assert not any(f"permute_dims({p}," in script for p in params)
    assert 'data_layout="NHWC"' not in nchw_mod["main"].script()


@pytest.mark.slow
def test_layouts_compute_the_same_logits(relax_tiny, tiny, x, tmp_path):
    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.session import run_host

    host = load_target("host")
    outs = []
    for layout in ("NHWC", "NCHW"):
        mod, params = relax_tiny if layout == "NHWC" else to_relax(tiny, layout=layout)
        build(mod, host, tmp_path / f"{layout}.so", None, defaults=False)
        outs.append(run_host(tmp_path / f"{layout}.so", x, params))
    np.testing.assert_allclose(outs[0], _ref(tiny, x), atol=1e-3, rtol=0)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_prepare_for_tuning_fuses_deterministically(relax_tiny):
    from lprnet_edge.compiler.compile import prepare_for_tuning

    mod, _ = relax_tiny
    host = load_target("host")
    a = prepare_for_tuning(mod, host)
    b = prepare_for_tuning(mod, host)
    import tvm_ffi

    assert tvm_ffi.structural_equal(a, b)
    fused = [gv.name_hint for gv, f in a.functions_items() if gv.name_hint.startswith("fused_")]
    assert fused, "FuseOps/FuseTIR did not produce fused functions"


@pytest.fixture(scope="module")
def host_lib(relax_tiny, tmp_path_factory) -> Path:
    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.toolchain import find_compiler

    mod, _ = relax_tiny
    host = load_target("host")
    out = tmp_path_factory.mktemp("host") / "model.so"
    info = build(mod, host, out, find_compiler(host))
    assert info["tuned"] is False and info["compile_s"] > 0
    return out


@pytest.mark.slow
def test_host_build_matches_pytorch(host_lib, relax_tiny, tiny, x):
    from lprnet_edge.compiler.session import load_host, run_host

    _, params = relax_tiny
    assert elf_machine(host_lib)[1] == {"x86_64": EM_X86_64, "aarch64": EM_AARCH64,
                                        "armv7": EM_ARM}[machine_arch()]
    out = run_host(host_lib, x, params)
    assert out.shape == (1, 68, 18)
    np.testing.assert_allclose(out, _ref(tiny, x), atol=1e-3, rtol=0)
    m = load_host(host_lib, list(params.values()))
    x2 = -x
    np.testing.assert_allclose(m(x2), _ref(tiny, x2), atol=1e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("target, exe, cls, machine", [
    ("rpi4", "aarch64-linux-gnu-g++", 2, EM_AARCH64),
    ("rpi-armv7", "arm-linux-gnueabihf-g++", 1, EM_ARM),
])
def test_cross_build_produces_device_elf(relax_tiny, tmp_path, target, exe, cls, machine):
    if shutil.which(exe) is None:
        pytest.skip(f"{exe} not installed (cross_compile/install-debian.sh)")
    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.toolchain import find_compiler

    mod, _ = relax_tiny
    spec = load_target(target)
    out = tmp_path / "model.so"
    info = build(mod, spec, out, find_compiler(spec))
    assert Path(info["compiler"]).name == exe
    assert elf_machine(out) == (cls, machine)
    if target == "rpi-armv7":
        # e_flags: EABI version 5 + hard-float ABI (0x400), what armhf boards need.
        flags = int.from_bytes(out.read_bytes()[36:40], "little")
        assert flags & 0x400 and flags >> 24 == 5


@pytest.mark.slow
def test_onnx_frontend_matches_pytorch(tiny, x, tmp_path):
    pytest.importorskip("onnx")
    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.session import run_host
    from lprnet_edge.compiler.toolchain import find_compiler

    mod, params = to_relax(tiny, "onnx")
    # ONNX's exporter folds some head constants itself: fewer inputs than torch.export's.
    assert params and all(a.dtype == np.float32 for a in params.values())
    host = load_target("host")
    build(mod, host, tmp_path / "m.so", find_compiler(host))
    np.testing.assert_allclose(run_host(tmp_path / "m.so", x, params), _ref(tiny, x),
                               atol=1e-3, rtol=0)


def test_unknown_frontend():
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.runtime.errors import LprnetEdgeError

    with pytest.raises(LprnetEdgeError, match="frontend 'tflite'"):
        to_relax(object(), "tflite")
    with pytest.raises(LprnetEdgeError, match=r"layout 'NCWH': use one of \['NHWC', 'NCHW'\]"):
        to_relax(object(), layout="NCWH")


# ---------------------------------------------------------------- default schedules


def _needs_defaults() -> None:
    from lprnet_edge.compiler import schedules

    if not schedules.has_defaults():
        pytest.skip("no packaged default schedules (benchmarks/make_default_schedules.py)")


@pytest.mark.slow
def test_untuned_builds_apply_the_default_schedules(relax_tiny, tiny, x, tmp_path):
    """Without a tuning database the host build replays the packaged schedules (and still
    computes what PyTorch computes); the rpi4 cross build replays the same ones."""
    _needs_defaults()
    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.session import run_host
    from lprnet_edge.compiler.toolchain import find_compiler

    mod, params = relax_tiny
    host = load_target("host")
    info = build(mod, host, tmp_path / "host.so", find_compiler(host))
    sched = info["schedules"]
    assert sched["default"] > 0 and info["tuned"] is False
    assert sum(sched.values()) == len(info["kernel_schedules"])
    np.testing.assert_allclose(run_host(tmp_path / "host.so", x, params), _ref(tiny, x),
                               atol=1e-3, rtol=0)
    naive = build(mod, host, tmp_path / "naive.so", find_compiler(host), defaults=False)
    assert naive["schedules"] == {}
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed")
    rpi = load_target("rpi4")
    cross = build(mod, rpi, tmp_path / "rpi.so", find_compiler(rpi))
    assert cross["schedules"]["default"] == sched["default"]
    assert elf_machine(tmp_path / "rpi.so") == (2, EM_AARCH64)


def test_refitted_tiles_keep_a_vector_friendly_inner_factor():
    """A pruned width (56 filters) re-fits a 16-wide vector tile to 8 lanes, not 14: a
    sparse80 build's 1x3 convolution ran at 1.9 GFLOP/s with 14 (78.9 with 8)."""
    from lprnet_edge.compiler.schedules import _fit_tiles

    assert _fit_tiles(56, [1, 4, 16]) == [7, 1, 8]
    assert _fit_tiles(64, [2, 2, 16]) == [2, 2, 16]  # a fitting trace is kept as it is
    for extent in (18, 21, 40, 44, 90, 120):
        tiles = _fit_tiles(extent, [2, 3, 16])
        assert np.prod(tiles) == extent and tiles[-1] & (tiles[-1] - 1) == 0


@pytest.mark.slow
def test_unknown_shapes_get_a_transferred_schedule(tmp_path):
    """A convolution no database knows (other channel counts, as after pruning) replays the
    trace of a known one with refitted tiles: scheduled, and still exact."""
    _needs_defaults()
    from tvm.relax.frontend.torch import from_exported_program

    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.session import run_host

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(40, 24, 3, padding=1), torch.nn.ReLU()).eval()
    xin = torch.randn(1, 40, 20, 44)
    mod = from_exported_program(torch.export.export(net, (xin,)), keep_params_as_input=True)
    params = [p.detach().numpy() for p in net.parameters()]
    info = build(mod, load_target("host"), tmp_path / "m.so", None)
    assert info["schedules"]["transferred"] >= 1, info["kernel_schedules"]
    with torch.no_grad():
        want = net(xin).numpy()
    np.testing.assert_allclose(run_host(tmp_path / "m.so", xin.numpy(), params), want,
                               atol=1e-4, rtol=1e-4)


def _task_hashes(mod: object, target_name: str) -> tuple[object, object, dict[int, str]]:
    """The TVM target, the module prepared for it, and task name by workload hash."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from lprnet_edge.compiler.compile import prepare_for_tuning

    spec = load_target(target_name)
    target = spec.tvm_target()
    prepared = prepare_for_tuning(mod, spec)
    names = {int(tvm_ffi.structural_hash(t.dispatched[0])): t.task_name
             for t in ms.relax_integration.extract_tasks(prepared, target)}
    return target, prepared, names


@pytest.mark.slow
def test_a_build_keeps_the_faster_of_tuned_record_and_default(relax_tiny):
    """Per kernel, a tuned record slower than the packaged default measured on a comparable
    machine gives way to the default; a faster one wins, and so does one measured on a
    board (its time cannot be compared with a host's)."""
    _needs_defaults()
    from tvm.s_tir import meta_schedule as ms

    from lprnet_edge.compiler import schedules
    from lprnet_edge.compiler.compile import schedule_database

    mod, _params = relax_tiny
    target, prepared, names = _task_hashes(mod, "host")
    packaged = schedules.default_records()
    slower, faster = [h for h in names if h in packaged][:2]

    def tuned(records: dict[int, tuple[float, object]]) -> object:
        """A database holding the default's own trace for each workload, re-timed."""
        db = ms.database.MemoryDatabase()
        for h, (factor, tgt) in records.items():
            ref = packaged[h]
            secs = schedules.mean_run_secs(ref.run_secs) * factor
            db.commit_tuning_record(ms.database.TuningRecord(
                trace=ref.trace, workload=db.commit_workload(ref.workload.mod),
                run_secs=[secs], target=tgt, args_info=ref.args_info))
        return db

    own = tuned({slower: (1.5, target), faster: (0.5, target)})
    _db, cover = schedule_database(mod, target, own, prepared=prepared)
    assert names[slower] in cover["default"] and names[faster] in cover["tuned"]
    board = load_target("rpi4").tvm_target()
    _db, cover = schedule_database(mod, target, tuned({slower: (1.5, board)}), prepared=prepared)
    assert names[slower] in cover["tuned"]


def _packaged_with_a72_set(tmp_path: Path, ref: object, secs: float, target: object) -> None:
    """Point the packaged defaults at ``tmp_path``: the x86 set as packaged, and an A72 set
    holding ``ref``'s trace at ``secs`` (an estimated time), recorded for ``target``."""
    from tvm.s_tir import meta_schedule as ms

    from lprnet_edge.compiler import schedules

    own_dir = tmp_path / "cortex-a72"
    own_dir.mkdir()
    db = ms.database.JSONDatabase(*(str(own_dir / f) for f in schedules.DB_FILES))
    db.commit_tuning_record(ms.database.TuningRecord(
        trace=ref.trace, workload=db.commit_workload(ref.workload.mod), run_secs=[secs],
        target=target, args_info=ref.args_info))
    del db
    for f in schedules.DB_FILES:
        (tmp_path / f).symlink_to(schedules.DEFAULTS_DIR / f)


@pytest.mark.slow
def test_a_cores_own_defaults_come_before_the_x86_set(tmp_path: Path, monkeypatch):
    """default_schedules/<mcpu>/ overrides the x86 set per workload; other workloads keep
    the x86 record; a related core takes the set too; an x86 core sees only the x86 set."""
    _needs_defaults()
    from lprnet_edge.compiler import schedules

    packaged = schedules.default_records()
    some = sorted(packaged)[0]
    ref = packaged[some]
    _packaged_with_a72_set(tmp_path, ref, 1e-6, ref.target)
    monkeypatch.setattr(schedules, "DEFAULTS_DIR", tmp_path)
    a72 = schedules.default_records("cortex-a72")
    assert set(a72) == set(packaged)
    assert schedules.mean_run_secs(a72[some].run_secs) == 1e-6
    other = next(h for h in packaged if h != some)
    assert a72[other].run_secs == packaged[other].run_secs
    a76 = schedules.default_records("cortex-a76")  # a related core: the A72's set applies
    assert schedules.mean_run_secs(a76[some].run_secs) == 1e-6
    x86 = schedules.default_records("znver4")
    assert schedules.mean_run_secs(x86[some].run_secs) == schedules.mean_run_secs(ref.run_secs)


@pytest.mark.slow
def test_estimated_defaults_never_replace_a_boards_own_record(relax_tiny, tmp_path: Path,
                                                               monkeypatch):
    """A core's packaged set holds estimated run times: a record of the build's own
    database for that core stays, however much faster the estimate says the default is;
    unless that database was tuned against the estimate as well."""
    _needs_defaults()
    from tvm.s_tir import meta_schedule as ms

    from lprnet_edge.compiler import schedules
    from lprnet_edge.compiler.compile import schedule_database

    mod, _params = relax_tiny
    target, prepared, names = _task_hashes(mod, "rpi4")
    x86 = schedules.default_records()
    h = next(h for h in names if h in x86 and "conv2d" in names[h])
    ref = x86[h]
    secs = schedules.mean_run_secs(ref.run_secs)
    _packaged_with_a72_set(tmp_path, ref, secs / 1000, target)
    monkeypatch.setattr(schedules, "DEFAULTS_DIR", tmp_path)
    own = ms.database.MemoryDatabase()
    own.commit_tuning_record(ms.database.TuningRecord(
        trace=ref.trace, workload=own.commit_workload(ref.workload.mod), run_secs=[secs],
        target=target, args_info=ref.args_info))
    _db, cover = schedule_database(mod, target, own, prepared=prepared)
    assert names[h] in cover["tuned"]
    # Tuned against the estimate too: the times compare, and the faster default wins.
    _db, cover = schedule_database(mod, target, own, prepared=prepared, estimated=True)
    assert names[h] in cover["default"]
    # Not for a related core (an A76 build applies the A72's set): another core's estimate.
    target5, prepared5, names5 = _task_hashes(mod, "rpi5")
    own5 = ms.database.MemoryDatabase()
    own5.commit_tuning_record(ms.database.TuningRecord(
        trace=ref.trace, workload=own5.commit_workload(ref.workload.mod), run_secs=[secs],
        target=target5, args_info=ref.args_info))
    _db, cover = schedule_database(mod, target5, own5, prepared=prepared5, estimated=True)
    assert names5[h] in cover["tuned"]
