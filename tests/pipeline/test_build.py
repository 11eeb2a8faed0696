"""``lprnet-edge build`` end to end on a tiny random LPRNet: stages, CLI, atomicity, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_user_error, copy_images, randomize_batchnorm

from lprnet_edge.compiler.config import CompileConfig
from lprnet_edge.compiler.target import load_target
from lprnet_edge.compress.configs import QuantizeConfig
from lprnet_edge.pipeline.build import BuildOptions
from lprnet_edge.runtime.artifact import load_manifest, machine_arch
from lprnet_edge.runtime.errors import ArtifactError


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from lprnet_edge.model.checkpoint import save_checkpoint
    from lprnet_edge.model.lprnet import LPRNet

    torch.manual_seed(0)
    m = LPRNet(class_num=68)
    randomize_batchnorm(m)
    p = tmp_path_factory.mktemp("tiny") / "tiny.pth"
    save_checkpoint(m.eval(), p)
    return p


# ---------------------------------------------------------------- fast checks


@pytest.mark.parametrize("args, fragment", [
    (["--sparsity", "0.5"], "--sparsity needs --prune unstructured"),
    (["--prune", "channels", "--sparsity", "0.5"], "--sparsity needs --prune unstructured"),
    (["--prune-ratio", "0.5"], "--prune-ratio needs --prune channels"),
    (["--calibrator", "mse"], "--calibrator needs --quantize"),
    (["--trials", "10"], "--trials needs --tune"),
    (["--rpc", "h:1", "--rpc-key", "k"], "--rpc, --rpc-key need --tune"),
    (["--tune", "--rpc", "h:1", "--rpc-tracker", "h:2"], "either --rpc or --rpc-tracker"),
    (["--tune", "--rpc-tracker", "h:2"], "--rpc-tracker needs --rpc-key"),
], ids=["sparsity", "sparsity-kind", "ratio", "calibrator", "trials", "rpc", "rpc-both",
        "tracker-key"])
def test_cli_usage_errors(cli_runner, tmp_path: Path, args: list[str], fragment: str):
    r = cli_runner("build", "--out", tmp_path / "out", *args)
    assert r.exit_code != 0
    assert fragment in r.output, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_cli_target_and_target_file_conflict(cli_runner, tmp_path: Path):
    f = tmp_path / "t.toml"
    f.write_text('arch = "aarch64"\n[tvm]\nkind = "llvm"\n', encoding="utf-8")
    r = cli_runner("build", "--target", "rpi4", "--target-file", f)
    assert r.exit_code == 2 and "either --target or --target-file" in r.output


def test_cli_unknown_target(cli_runner, tmp_path: Path):
    r = cli_runner("build", "--target", "rpi9", "--out", tmp_path / "o")
    assert_user_error(r, "unknown target 'rpi9'", "rpi4", "rpi-armv7", "host")
    assert not (tmp_path / "o").exists()


def test_cli_missing_toolchain(cli_runner, tmp_path: Path, tiny_ckpt: Path):
    f = tmp_path / "board.toml"
    f.write_text(
        'name = "board"\narch = "aarch64"\n[tvm]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\n'
        '[toolchain]\ntriple = "aarch64-unknown-elf"\ncompiler = "no-such-cross-g++"\n'
        'debian_package = "g++-no-such-cross"\n', encoding="utf-8")
    r = cli_runner("build", "--target-file", f, "--weights", tiny_ckpt, "--out", tmp_path / "o")
    assert_user_error(r, "apt-get install g++-no-such-cross", "--cc", "no-such-cross-g++")
    assert r.exit_code == 6  # ToolchainError
    assert not (tmp_path / "o").exists()


def test_cli_existing_output_needs_force(cli_runner, tmp_path: Path, tiny_ckpt: Path):
    out = tmp_path / "o"
    out.mkdir()
    r = cli_runner("build", "--target", "host", "--weights", tiny_ckpt, "--out", out)
    assert_user_error(r, "exists (use --force")
    # Asking for a bundle of an existing build says what --force does with it.
    r = cli_runner("build", "--target", "host", "--weights", tiny_ckpt, "--out", out, "--bundle")
    assert_user_error(r, "use --force to rebuild it", "o.tar.gz")


# ---------------------------------------------------------------- real builds (tiny model)


@pytest.fixture(scope="module")
def host_build(tiny_ckpt: Path, tmp_path_factory, cli_root):
    """``lprnet-edge build --target host`` of the tiny model, with a bundle."""
    pytest.importorskip("tvm")
    from conftest import CliRunner

    out = tmp_path_factory.mktemp("cli") / "lprnet-tiny"
    r = CliRunner(cli_root)("build", "--target", "host", "--weights", tiny_ckpt, "--out", out,
                            "--verify-images", "8", "--bundle", "--threads", "1")
    assert r.exit_code == 0, r.output
    return out, r


@pytest.mark.slow
def test_cli_host_build(host_build):
    out, r = host_build
    for stage in ("[1/5] load", "[2/5] import", "[3/5] compile", "[4/5] verify",
                  "[5/5] package"):
        assert stage in r.stderr, r.stderr
    assert f"artifact      {out}" in r.stdout
    assert "verification  passed on 8 images" in r.stdout
    assert "model.so" in r.stdout and "params.npz" in r.stdout
    m = load_manifest(out)
    assert m.verification["status"] == "passed"
    assert m.runtime.num_threads == 1
    assert m.stages["compile"]["num_threads"] == 1
    assert (out.parent / "lprnet-tiny.tar.gz").is_file()
    from lprnet_edge.runtime.recognizer import Recognizer

    rec = Recognizer.from_artifact(out)
    assert rec.benchmark(runs=2, warmup=1)["runs"] == 2


@pytest.mark.slow
def test_bundle_of_an_existing_build(host_build, tiny_ckpt: Path, cli_runner):
    """``--bundle`` again with the same settings packs the build as it is; with other
    settings it says that --force rebuilds it."""
    out, _ = host_build
    tar = out.parent / "lprnet-tiny.tar.gz"
    tar.unlink()
    args = ["build", "--target", "host", "--weights", tiny_ckpt, "--out", out,
            "--verify-images", "8", "--bundle"]
    r = cli_runner(*args, "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "bundled as it is" in r.stderr and "] load" not in r.stderr
    assert f"bundle        {tar}" in r.stdout and tar.is_file()
    r = cli_runner(*args, "--threads", "2")
    assert_user_error(r, "not a build of these settings", "use --force to rebuild it")


@pytest.mark.slow
def test_failed_verification_leaves_previous_artifact(host_build, tiny_ckpt: Path, cli_runner):
    out, _ = host_build
    before = (out / "manifest.json").read_bytes()
    # Tolerance 0: float reordering makes some logit differ, so verification must fail.
    r = cli_runner("build", "--target", "host", "--weights", tiny_ckpt, "--out", out, "--force",
                   "--verify-images", "4", "--tolerance", "0")
    assert_user_error(r, "verification failed", "No artifact written")
    assert r.exit_code == ArtifactError.exit_code
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["lprnet-tiny", "lprnet-tiny.tar.gz"]


@pytest.mark.slow
def test_cli_cross_build_rpi4(cli_runner, tiny_ckpt: Path, tmp_path: Path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed")
    pytest.importorskip("tvm")
    out = tmp_path / "lprnet-rpi4"
    r = cli_runner("build", "--target", "rpi4", "--weights", tiny_ckpt, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m == load_manifest(out).to_dict()
    assert m["target"]["name"] == "rpi4" and m["target"]["arch"] == "aarch64"
    assert m["target"]["tvm"]["mcpu"] == "cortex-a72"
    assert m["target"]["toolchain"]["cross"] is (machine_arch() != "aarch64")
    assert m["runtime"]["num_threads"] == 4
    if machine_arch() != "aarch64":
        v = m["verification"]
        assert v["status"] == "skipped"
        assert v["reason"] == ("cross-compiled for aarch64; verify on the device with "
                               "`lprnet-edge deploy`")
        # The on-device check: calib/ inputs and PyTorch logits, checksummed like the model.
        assert v["device_check"]["status"] == "stored" and "verify.npz" in m["files"]
        import numpy as np

        from lprnet_edge.model.checkpoint import load_model

        with np.load(out / "verify.npz") as z:
            x, y = z["inputs"], z["logits"]
        assert len(x) == v["device_check"]["inputs"] > 0
        ref = load_model(tiny_ckpt)
        import torch

        with torch.inference_mode():
            np.testing.assert_allclose(ref(torch.from_numpy(x[:1])).numpy()[0], y[0],
                                       rtol=1e-5, atol=1e-5)
        head = (out / "model.so").read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and head[4] == 2
        assert int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
        from lprnet_edge.runtime.recognizer import Recognizer

        with pytest.raises(ArtifactError) as e:
            Recognizer.from_artifact(out)
        assert f"built for rpi4 (aarch64), but this machine is {machine_arch()}" in str(e.value)
        r = cli_runner("eval", "--data", tmp_path, "--artifact", out)
        assert_user_error(r, "built for rpi4 (aarch64)")


def test_compile_config_in_options(tmp_path: Path):
    opts = BuildOptions(target=load_target("rpi4"), out=tmp_path,
                        compile=CompileConfig(frontend="onnx", num_threads=2))
    assert opts.compile.to_dict()["frontend"] == "onnx"


def test_cli_refuses_test_split_as_calib(cli_runner, tmp_path: Path, tiny_ckpt: Path):
    test = tmp_path / "test"
    test.mkdir()
    r = cli_runner("build", "--target", "host", "--weights", tiny_ckpt, "--out", tmp_path / "o",
                   "--calib", test, "--verify-images", "2")
    assert_user_error(r, "refusing to calibrate")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the accuracy check


@pytest.fixture(scope="module")
def small_calib(data_dir: Path, tmp_path_factory) -> Path:
    files = sorted((data_dir / "calib").glob("*.jpg"))[:120]
    return copy_images(files, tmp_path_factory.mktemp("accuracy") / "calib")


def test_accuracy_check_fails_a_build_that_loses_accuracy(cli_runner, weights_path: Path,
                                                          small_calib: Path, tmp_path: Path):
    """Without --max-accuracy-drop a compressed build may lose at most 1 point on the calib/
    validation split; it fails before compiling, and says which flag accepts the loss."""
    out = tmp_path / "o"
    args = ["build", "--target", "host", "--weights", weights_path, "--calib", small_calib,
            "--out", out, "--prune", "unstructured", "--sparsity", "0.95"]
    r = cli_runner(*args)
    assert_user_error(r, "on the calib/ validation split (36 plates", "default budget of 1 point",
                      "--max-accuracy-drop")
    assert r.exit_code == ArtifactError.exit_code
    assert "] accuracy" in r.stderr and "] import" not in r.stderr  # nothing was compiled
    assert not out.exists()
    r = cli_runner(*args, "--max-accuracy-drop", "0.5")
    assert_user_error(r, "exceeds --max-accuracy-drop 0.5")
    assert not out.exists()


def test_accuracy_check_measures_on_the_validation_split(weights_path: Path,
                                                        small_calib: Path):
    from lprnet_edge.compress.accuracy import VALIDATION, Budget, check_model
    from lprnet_edge.compress.configs import Int8WeightsConfig
    from lprnet_edge.model.calib import CalibrationSet, accuracy
    from lprnet_edge.pipeline.steps import load_torch, quantize_model

    tm = quantize_model(load_torch(weights_path), Int8WeightsConfig(), small_calib)
    calib = CalibrationSet.load(small_calib)
    # 36 validation plates here: one plate is 2.8 points, so the budget is explicit (the
    # default 1-point budget: test_int8_build_compiles_the_typed_result).
    c = check_model(tm.original, tm.reference, calib, Budget.of(5.0))
    _, val = calib.split(0.3, 0)  # the search's split
    assert VALIDATION.of(calib)[1].names == val.names
    g = c.to_dict()
    assert g["split"] == {"fraction": 0.3, "seed": 0, "images": len(val)}
    assert g["original"] == pytest.approx(accuracy(tm.original, val))
    assert g["compressed"] == pytest.approx(accuracy(tm.reference, val))
    assert g["drop_points"] == pytest.approx(g["lost_points"] - g["gained_points"])
    assert g["drop_points"] == pytest.approx(100 * (g["original"] - g["compressed"]))
    assert g["budget_points"] == 5.0 and g["budget_source"] == "--max-accuracy-drop"
    assert g["ok"] == (g["drop_points"] <= 5.0)
    # The typed result's fields, not attributes read back from a module.
    assert tm.param_encodings["backbone.0.weight"] == "int8"
    assert tm.param_encodings["heads.0.weight"] == "int8"  # folded first: the split head
    assert tm.model.module is tm.reference and tm.stages["quantize"]["mode"] == "int8-weights"


@pytest.mark.slow
def test_int8_build_compiles_the_typed_result(cli_runner, tiny_ckpt: Path, small_calib: Path,
                                              tmp_path: Path):
    """``--quantize int8``: quantize returns a QuantizedModel, the frontend compiles its int8
    convolutions as int8 x int8 -> int32, verification compares with its simulation."""
    pytest.importorskip("tvm")
    out = tmp_path / "int8"
    r = cli_runner("build", "--target", "host", "--weights", tiny_ckpt, "--calib", small_calib,
                   "--out", out, "--quantize", "int8", "--verify-images", "8", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    q = m["stages"]["quantize"]
    assert q["mode"] == "int8" and q["fallback_layers"] == ["container.0"]
    from lprnet_edge.compress.configs import Int8Config

    assert isinstance(QuantizeConfig.from_dict(q), Int8Config)  # the manifest reads back
    assert m["reports"]["accuracy_check"]["ok"] and "[3/7] accuracy" in r.stderr
    enc = m["param_encodings"]
    # The int8 weights are quantized (and laid out) at build time: stored raw, as int8. The
    # head (folded first, so split in four) computes in float32 from int8-stored weights.
    raw = [n for n, e in enc.items() if e == "raw"]
    assert raw and all(e in ("raw", "dense", "int8-last") for e in enc.values())
    heads = [n for n in enc if n.startswith("p_heads_") and n.endswith("_weight")]
    assert heads and all(enc[n] == "int8-last" for n in heads)
    from lprnet_edge.runtime.params_codec import load_params

    params = load_params(out / "params.npz")
    assert {str(params[n].dtype) for n in raw} >= {"int8"}
    v = m["verification"]
    assert v["status"] == "passed" and v["tolerance"] == pytest.approx(1e-2)
