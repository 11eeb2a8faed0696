"""Real int8 convolutions: a tuned schedule computes bit for bit what the untuned one does.

Issue 11: ``build --quantize int8 --tune`` failed verification (max |logit diff| 0.63) because
tuned schedules inlined the rescale ``float(acc) * scale + bias`` into one expression, which
LLVM contracts into an FMA (one rounding instead of PyTorch's two). The reference now adds the
bias in the accumulator's units and ends with the multiply. These tests compile one quantized
convolution whose output *is* that rescale, so any contraction or float64 detour shows as a
mismatch in a large share of the outputs (not only the rare ones that flip an int8 code).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

from lprnet_edge.compiler.tuning import TuneConfig, TuneOptions, tune  # noqa: E402
from lprnet_edge.compiler.tuning.worker import untuned_tasks  # noqa: E402

# A small evolutionary search: enough for the tuned schedule to inline the epilogue.
SEARCH = {"population_size": 64, "init_min_unmeasured": 16, "genetic_num_iters": 1}


@pytest.fixture(scope="module")
def qconv():
    """A QuantizedModel of one int8 conv (3 -> 16 channels, bias): (acc + b / s) * s."""
    from torch import nn

    from lprnet_edge.compress.api import QuantizedModel
    from lprnet_edge.compress.configs import Int8Config
    from lprnet_edge.compress.quantize import QuantConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, padding=1)
    nn.init.uniform_(conv.bias, -1.0, 1.0)
    module = nn.Sequential(QuantConv2d(conv, act_scale=1.0 / 127)).eval()
    return QuantizedModel(module, Int8Config(), {}, int8_convs=("0",))


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 24, 94)).astype(np.float32)


@pytest.fixture(scope="module")
def host():
    from lprnet_edge.compiler.target import load_target

    return load_target("host")


def _reference(qmodel, x: np.ndarray) -> np.ndarray:
    """PyTorch's value with an exact accumulation: the conv of the int8 codes in float64
    (exact integers), plus the bias in the accumulator's units, then one float32 rescale."""
    q = qmodel.module[0]
    c = q.conv
    with torch.inference_mode():
        xq = torch.clamp(torch.round(torch.from_numpy(x) / q.act_scale), -127, 127)
        wq = torch.clamp(torch.round(c.weight / q.weight_scale), -127, 127)
        acc = torch.nn.functional.conv2d(xq.double(), wq.double(), None, 1, 1).float()
        scale = q.act_scale * q.weight_scale.view(1, -1, 1, 1)
        return ((acc + c.bias.view(1, -1, 1, 1) / scale) * scale).numpy()


def test_int8_conv_ends_with_its_rescale(qconv):
    """The bias is added to the accumulator before the one multiply by the scale: nothing
    after the multiply for LLVM to contract, and no float64."""
    from lprnet_edge.compiler.frontend import to_relax

    mod, params = to_relax(qconv)
    text = mod["main"].script()
    assert 'out_dtype="int32"' in text
    assert "float64" not in text
    scaled = re.findall(r"= R\.multiply\((\w+), ", text)[-1]  # the first: the input's
    assert re.search(rf"\b{scaled}: [^\n]*= R\.add\(", text), text
    assert len(params) == 2


def _fused_conv(mod, host):
    from lprnet_edge.compiler.compile import prepare_for_tuning

    prepared = prepare_for_tuning(mod, host)
    names = [gv.name_hint for gv, _ in prepared.functions_items() if "conv2d" in gv.name_hint]
    assert len(names) == 1, names
    return prepared[names[0]].with_attr("global_symbol", "main")


@pytest.mark.slow
def test_inlined_epilogue_is_bit_exact(qconv, host):
    """The schedule MetaSchedule's AutoInline produces (every elementwise block inlined into
    the last one) gives exactly the outputs of the untuned kernel, on random int8 inputs."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from lprnet_edge.compiler.frontend import to_relax

    mod, _ = to_relax(qconv)
    func = _fused_conv(mod, host)
    plain = tvm.IRModule({"main": func})
    sch = s_tir.Schedule(plain)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    inlined = 0
    for b in blocks[:-1]:
        try:
            sch.compute_inline(b)
            inlined += 1
        except Exception:  # noqa: BLE001 - the reduction block cannot be inlined
            pass
    assert inlined >= 3  # pad, casts, multiply went into the epilogue

    rng = np.random.default_rng(1)
    infos = ms.arg_info.ArgInfo.from_prim_func(func)
    args = []
    for info in infos[:-1]:
        shape = [int(s) for s in info.shape]
        if str(info.dtype) == "int8":
            args.append(rng.integers(-127, 128, shape).astype("int8"))
        else:
            args.append(rng.uniform(-1, 1, shape).astype(str(info.dtype)) * 1e-3)
    outs = []
    for m in (plain, sch.mod):
        lib = tvm.compile(m, target=host.tvm_target())
        out = tvm.runtime.tensor(np.zeros([int(s) for s in infos[-1].shape],
                                          str(infos[-1].dtype)))
        lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
        outs.append(out.numpy())
    mismatched = int((outs[0] != outs[1]).sum())
    assert mismatched == 0, f"{mismatched} of {outs[0].size} outputs differ"


@pytest.mark.slow
def test_tuned_int8_conv_matches_untuned_and_pytorch(qconv, x, host, tmp_path: Path):
    """Tune the int8 conv task with a few trials; the tuned build, the untuned build and
    PyTorch's two-rounding rescale agree bit for bit."""
    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.session import run_host

    mod, params = to_relax(qconv)
    cfg = TuneConfig(trials=8, num_trials_per_iter=4, db_dir=str(tmp_path / "db"),
                     timeout_s=240)
    db, summary = tune(mod, host, cfg, log=lambda _m: None,
                       options=TuneOptions(tasks=["conv2d"], search=SEARCH))
    assert summary.trials_new > 0
    outs = {}
    for tag, database in (("untuned", None), ("tuned", db)):
        lib = tmp_path / f"{tag}.so"
        info = build(mod, host, lib, None, database=database, defaults=False)
        if tag == "tuned":
            assert info["schedules"].get("tuned", 0) >= 1, info["schedules"]
        outs[tag] = np.asarray(run_host(lib, x, list(params.values())))
    ref = _reference(qconv, x)
    assert outs["untuned"].shape == ref.shape
    np.testing.assert_array_equal(outs["untuned"], ref)
    np.testing.assert_array_equal(outs["tuned"], ref)


# ---------------------------------------------------------------- VNNI


def _has_vnni(host) -> bool:
    from lprnet_edge.compiler.dot import int8_dot

    return int8_dot(host.tvm_target()) == "vnni"


@pytest.fixture(scope="module")
def qnet():
    """Two int8 convs with shapes the VNNI packing must pad: 3 input channels (not a
    multiple of 4), 20 and 8 outputs (not multiples of 16), asymmetric 1x3 / 3x1 padding."""
    from torch import nn

    from lprnet_edge.compress.api import QuantizedModel
    from lprnet_edge.compress.configs import Int8Config
    from lprnet_edge.compress.quantize import QuantConv2d

    torch.manual_seed(1)
    a, b = nn.Conv2d(3, 20, (1, 3), padding=(0, 1)), nn.Conv2d(20, 8, (3, 1), padding=(1, 0))
    for conv in (a, b):
        nn.init.uniform_(conv.bias, -0.5, 0.5)
    module = nn.Sequential(QuantConv2d(a, act_scale=1.0 / 127), nn.ReLU(),
                           QuantConv2d(b, act_scale=4.0 / 127)).eval()
    return QuantizedModel(module, Int8Config(), {}, int8_convs=("0", "2"))


def test_int8_dot_is_read_from_the_target():
    import tvm

    from lprnet_edge.compiler.dot import int8_dot

    def llvm(*mattr: str) -> object:
        return tvm.target.Target({"kind": "llvm", "mattr": list(mattr)})

    assert int8_dot(llvm("+avx2", "+avx512bw", "+avx512vnni")) == "vnni"
    assert int8_dot(llvm("+avx2", "+fma")) == "avx2"  # an AVX2-only host
    assert int8_dot(llvm("+avx512bw", "-avx512vnni")) == "avx2"  # AVX-512 implies AVX2
    assert int8_dot(llvm("+sse4.2")) is None

    def arm(triple: str, *mattr: str) -> object:
        return tvm.target.Target({"kind": "llvm", "mtriple": triple, "mattr": list(mattr)})

    assert int8_dot(arm("aarch64-linux-gnu", "+neon", "+dotprod")) == "sdot"  # rpi5
    assert int8_dot(arm("aarch64-linux-gnu", "+neon")) == "neon"  # rpi4: no sdot
    assert int8_dot(arm("armv7l-linux-gnueabihf", "+neon")) is None


def test_int8_graph_takes_precomputed_weights_without_layout_round_trips(qnet):
    """The weights' quantization is done at build time (int8 parameters), and no
    NHWC -> NCHW -> NHWC transpose pair is left around the activations' quantization."""
    from lprnet_edge.compiler.frontend import to_relax

    mod, params = to_relax(qnet, layout="NHWC")
    assert sum(p.dtype == np.int8 for p in params.values()) == 2
    text = mod["main"].script()
    assert text.count("R.round(") == 2  # the two activations only: weights come quantized
    # the NCHW input's and output's permutes; the others are of (1, 1, 1, C) scales
    shapes = re.findall(r"R\.Tensor\(\(1, (\d+), (\d+), \d+\), dtype=\"\w+\"\) = "
                        r"R\.permute_dims", text)
    assert len([s for s in shapes if s != ("1", "1")]) == 2, shapes


def _x86_target(host, kind: str):
    """``host`` with only ``kind``'s dot product: AVX2 is the host with VNNI switched off."""
    from lprnet_edge.compiler.dot import int8_dot
    from lprnet_edge.compiler.target import parse_target

    if kind == "vnni":
        return host if _has_vnni(host) else None
    if int8_dot(host.tvm_target()) is None:
        return None
    mattr = [m for m in host.tvm.get("mattr", []) if "vnni" not in m] + ["-avx512vnni",
                                                                          "-avxvnni"]
    text = (f'name = "host-avx2"\narch = "{host.arch}"\n[tvm]\nkind = "llvm"\n'
            f'mcpu = "{host.tvm["mcpu"]}"\nmattr = {mattr!r}\nnum-cores = 1\n'.replace("'", '"'))
    target = parse_target(text, "<test>")
    return target if int8_dot(target.tvm_target()) == "avx2" else None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vnni", "avx2"])
def test_x86_dot_convs_are_bit_exact_and_tensorized(qnet, x, host, kind, tmp_path: Path):
    """The VNNI form (u8 activations + 128, packed weights, offset subtracted) and the AVX2
    one (pairs through ``vpmaddwd``) give the int8 outputs of ``R.nn.conv2d`` bit for bit,
    and every such kernel is built with the tensorized schedule (no tuning)."""
    target = _x86_target(host, kind)
    if target is None:
        pytest.skip(f"this host cannot run {kind} (see /proc/cpuinfo)")
    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.session import run_host

    outs, infos = {}, {}
    for dot in (None, kind):
        mod, params = to_relax(qnet, int8_dot=dot)
        lib = tmp_path / f"{dot}.so"
        infos[dot] = build(mod, target, lib, None, defaults=False)
        outs[dot] = np.asarray(run_host(lib, x, list(params.values())))
    assert infos[kind]["schedules"]["tensorized"] == 2, infos[kind]["schedules"]
    assert not any(kind in k for k in infos[None]["kernel_schedules"])
    np.testing.assert_array_equal(outs[kind], outs[None])
    with torch.inference_mode():
        ref = qnet.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(outs[kind], ref, atol=1e-4)


def test_vnni_kernels_are_left_out_of_tuning(qnet, host):
    from tvm.s_tir import meta_schedule as ms

    from lprnet_edge.compiler.compile import prepare_for_tuning
    from lprnet_edge.compiler.frontend import to_relax

    mod, _ = to_relax(qnet, int8_dot="vnni")
    tasks = ms.relax_integration.extract_tasks(prepare_for_tuning(mod, host),
                                               host.tvm_target())
    vnni = [t.task_name for t in tasks if "vnni_conv2d" in t.task_name]
    assert len(vnni) == 2
    assert {t.task_name for t in untuned_tasks(tasks)} == {t.task_name for t in tasks} - set(vnni)


@pytest.mark.slow
@pytest.mark.parametrize("target, kind", [("rpi5", "sdot"), ("rpi4", "neon")])
def test_arm_dot_products_cross_compile(qnet, target, kind, tmp_path: Path):
    """The AArch64 forms (TVM's sdot and NEON intrinsics) tensorize and link for the board;
    running them is the emulated Pi's job (``bench --host``), timing them a board's."""
    import shutil

    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.dot import int8_dot
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.compiler.toolchain import find_compiler

    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed (cross_compile/install-debian.sh)")
    spec = load_target(target)
    assert int8_dot(spec.tvm_target()) == kind
    mod, _ = to_relax(qnet, int8_dot=kind)
    info = build(mod, spec, tmp_path / "m.so", find_compiler(spec), defaults=False)
    assert info["schedules"]["tensorized"] == 2, info["schedules"]
    assert (tmp_path / "m.so").stat().st_size > 0
