"""``lprnet-edge bench --artifact A``: the artifact beside ONNX Runtime fp32 and PyTorch eager,
interleaved at one thread count, with the speed-ups, on a real host build of a small random
LPRNet; the ONNX Runtime row replaced by its install hint when onnxruntime cannot import; and
``bench --host``, where the device's agent times ONNX Runtime beside the deployed model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import BLOCK_ONNXRUNTIME, REPO

pytest_plugins = ["sshd_fixture"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_cache")]

SMALL = ["--runs", "4", "--warmup", "1", "--rounds", "2", "--threads", "1"]




def _bench_json(artifact: Path, *extra: str, block_ort: bool = False) -> dict:
    """``lprnet-edge bench --json`` in a subprocess (an import hook can make onnxruntime
    uninstalled there, which an in-process run cannot undo)."""
    code = BLOCK_ONNXRUNTIME + textwrap.dedent("""
        if sys.argv[1] == "block":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                pass
            else:
                raise SystemExit("onnxruntime was importable: the test would prove nothing")
        from lprnet_edge.cli.main import main
        sys.argv = ["lprnet-edge", *sys.argv[2:]]
        main()
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, "block" if block_ort else "-", "bench",
                        "--artifact", str(artifact), *SMALL, "--json", *extra],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_bench_json_has_the_three_rows_and_the_ratios(tiny_tvm_artifact: Path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    from lprnet_edge.runtime.files import sha256_file

    weights = tiny_tvm_artifact.parent / "tiny.pth"
    res = _bench_json(tiny_tvm_artifact, "--weights", str(weights))
    # the existing figures are still there
    assert {"end_to_end", "model_only", "time_evaluator"} <= set(res)
    comp = res["compare"]
    names = [r["name"] for r in comp["rows"]]
    assert names == ["tvm", "onnxruntime", "torch"]
    assert comp["threads"] == 1 == res["threads"] and comp["missing"] == {}
    assert set(comp["speedup"]) == {"vs_onnxruntime", "vs_torch"}
    tvm_ms = comp["rows"][0]["timing"]["median_ms"]
    for row in comp["rows"][1:]:
        assert row["speedup"] == pytest.approx(row["timing"]["median_ms"] / tvm_ms)
        assert row["speedup"] == pytest.approx(comp["speedup"][f"vs_{row['name']}"])
        assert row["max_abs_logit_diff"] < 1e-2  # same fp32 weights everywhere
        assert row["timing"]["rounds"] == 2 and row["timing"]["threads"] == 1
    assert "flushed" in comp["rows"][2]["label"]
    assert comp["same_weights"] is True and comp["weights_sha256"] == sha256_file(weights)
    assert Path(comp["onnx"]).is_file()


def test_bench_without_onnxruntime_keeps_torch_and_says_why(tiny_tvm_artifact: Path):
    pytest.importorskip("torch")
    weights = tiny_tvm_artifact.parent / "tiny.pth"
    res = _bench_json(tiny_tvm_artifact, "--weights", str(weights), "--compare",
                      block_ort=True)
    comp = res["compare"]
    assert [r["name"] for r in comp["rows"]] == ["tvm", "torch"]
    assert set(comp["speedup"]) == {"vs_torch"}
    assert "pip install onnxruntime" in comp["missing"]["onnxruntime"]


def test_bench_text_names_other_weights(tiny_tvm_artifact: Path, weights_path: Path,
                                        cli_runner):
    """Baselines from weights that are not the artifact's source: the output says so."""
    pytest.importorskip("onnxruntime")
    r = cli_runner("bench", "--artifact", tiny_tvm_artifact, *SMALL, "--weights", weights_path,
                   "--compare")
    assert r.exit_code == 0, r.output
    assert "Side by side" in r.output and "artifact speed-up" in r.output
    assert "ONNX Runtime" in r.output and "PyTorch eager" in r.output
    assert "NOT the artifact's source weights" in r.output


def test_bench_no_compare_and_rpc_compare(tiny_tvm_artifact: Path, cli_runner):
    from conftest import assert_user_error

    r = cli_runner("bench", "--artifact", tiny_tvm_artifact, *SMALL, "--no-compare", "--json")
    assert r.exit_code == 0, r.output
    assert "compare" not in json.loads(r.stdout) and "time_evaluator" in json.loads(r.stdout)
    r = cli_runner("bench", "--artifact", tiny_tvm_artifact, "--rpc", "127.0.0.1:9",
                   "--compare")
    assert_user_error(r, "--compare", "--host")


# ---------------------------------------------------------------- on a device over SSH

BLOCK_ORT = textwrap.dedent("""
    import importlib.abc, sys

    class _Block(importlib.abc.MetaPathFinder):
        \"\"\"onnxruntime not installed: the error Python gives for a missing package.\"\"\"

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "onnxruntime":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Block())
""")


def test_bench_host_compares_on_the_device(host_sshd, tiny_tvm_artifact: Path, tmp_path: Path,
                                          cli_runner):
    """`bench --host --compare`: the ONNX file is uploaded and ONNX Runtime timed by the
    device's agent beside the deployed model (the "device" is this machine over a real sshd,
    its venv a real one on this interpreter); without onnxruntime in that venv the row says
    how to install it there."""
    pytest.importorskip("onnxruntime")
    remote_dir = tmp_path / "device" / ".lprnet-edge"
    venv = remote_dir / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=120)
    args = ["--host", host_sshd.target, "--key", str(host_sshd.key_path), "--known-hosts",
            str(host_sshd.known_hosts_path), "--remote-dir", str(remote_dir)]
    r = cli_runner("deploy", tiny_tvm_artifact, *args)
    assert r.exit_code == 0, r.output
    weights = tiny_tvm_artifact.parent / "tiny.pth"
    r = cli_runner("bench", "--artifact", tiny_tvm_artifact, *args, *SMALL, "--weights",
                   weights, "--json")  # compare is the default with PyTorch installed here
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["mode"] == "ssh" and res["runs"] == 4  # the Recognizer figures are kept
    comp = res["compare"]
    assert [row["name"] for row in comp["rows"]] == ["tvm", "onnxruntime"]
    assert comp["threads"] == 1 and "127.0.0.1" in comp["host"]
    assert set(comp["speedup"]) == {"vs_onnxruntime"} and comp["same_weights"] is True
    assert comp["rows"][1]["max_abs_logit_diff"] < 1e-2
    assert "PyTorch" in comp["missing"]["torch"]
    assert not list((remote_dir / "tmp").glob("job-*"))  # the upload was cleaned up

    site = next(venv.glob("lib/python*/site-packages"))
    (site / "sitecustomize.py").write_text(BLOCK_ORT)
    r = cli_runner("bench", *args, *SMALL, "--weights", weights, "--compare")
    assert r.exit_code == 0, r.output
    assert "Side by side" in r.output
    assert f"not installed on the device: pip install onnxruntime in {venv}" in r.output
