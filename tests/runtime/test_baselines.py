"""The baselines timed beside an artifact: the interleaved timer, ONNX Runtime set up as a fair
baseline on a real ONNX export, and the device agent's ``bench --onnx`` run here as it runs
on a board (subprocess, torch blocked), with and without onnxruntime importable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK_ONNXRUNTIME, REPO

from lprnet_edge.runtime.baselines import RoundsTiming, interleaved, speedups
from lprnet_edge.runtime.errors import LprnetEdgeError


def test_interleaved_runs_rounds_in_turn_and_takes_median_of_round_medians():
    order: list[str] = []
    a = np.random.default_rng(0).random((64, 64))
    cands = {"A": lambda: order.append("A") or a @ a, "B": lambda: order.append("B") or a + a,
             "C": lambda: order.append("C")}
    flushed: list[int] = []
    res = interleaved(cands, rounds=3, runs=4, warmup=2,
                      before={"B": lambda: flushed.append(len(order))})
    # warm-up (2 each), then A x4, B x4, C x4, three times
    assert order[:6] == ["A", "A", "B", "B", "C", "C"]
    assert order[6:] == (["A"] * 4 + ["B"] * 4 + ["C"] * 4) * 3
    # the hook ran right before B's warm-up and before each of B's blocks
    assert flushed == [2, 10, 22, 34]
    for t in res.values():
        assert isinstance(t, RoundsTiming)
        assert t.rounds == 3 and len(t.round_medians_ms) == 3 and t.runs == 12
        assert t.median_ms == pytest.approx(float(np.median(t.round_medians_ms)))
        assert t.min_ms <= min(t.round_medians_ms)
    ratios = speedups(res, "A")
    assert set(ratios) == {"vs_B", "vs_C"}
    assert ratios["vs_B"] == pytest.approx(res["B"].median_ms / res["A"].median_ms)
    d = res["A"].to_dict()
    assert d["p50_ms"] == d["median_ms"] and d["rounds"] == 3


def test_interleaved_refuses_no_rounds():
    with pytest.raises(LprnetEdgeError, match="rounds >= 1"):
        interleaved({"A": lambda: None}, rounds=0)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random LPRNet checkpoint and its ONNX export (the real exporter, cached by sha256)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from lprnet_edge.model.checkpoint import save_checkpoint
    from lprnet_edge.model.lprnet import LPRNet
    from lprnet_edge.model.onnx import export_onnx

    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    save_checkpoint(LPRNet(class_num=68).eval(), d / "tiny.pth")
    first = export_onnx(d / "tiny.pth", cache=d / "cache")
    again = export_onnx(d / "tiny.pth", cache=d / "cache")
    assert not first.cached and again.cached and again.path == first.path
    return d / "tiny.pth", first.path


@pytest.mark.slow
def test_onnxruntime_model_matches_torch_and_uses_the_threads(tiny_onnx):
    import torch

    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.runtime.baselines import OnnxRuntimeModel

    weights, onnx = tiny_onnx
    ort = OnnxRuntimeModel(onnx, threads=2)
    opts = ort.session.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    x = np.random.default_rng(1).random((1, 3, 24, 94), dtype=np.float32)
    with torch.inference_mode():
        want = load_model(weights)(torch.from_numpy(x)).numpy()
    got = ort(x)
    assert got.shape == want.shape == (1, 68, 18)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _agent(args: list[str], block_ort: bool = False, path: Path | None = None) -> dict:
    """``python -m lprnet_edge.runtime.agent ARGS`` as on a board (torch blocked by the agent;
    with ``block_ort`` an import hook makes onnxruntime uninstalled; ``path`` goes first on
    PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (path, REPO) if p)}
    env.pop("LPRNET_EDGE_AGENT_ALLOW_TORCH", None)
    code = BLOCK_ONNXRUNTIME + textwrap.dedent("""
        from lprnet_edge.runtime.agent import main
        sys.exit(main(sys.argv[2:]))
    """)
    r = subprocess.run([sys.executable, "-c", code, "block" if block_ort else "-", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"], (r.stdout, r.stderr)
    return doc["result"]


@pytest.mark.slow
def test_agent_bench_onnx_times_ort_beside_the_artifact(tiny_tvm_artifact: Path):
    pytest.importorskip("onnxruntime")
    from lprnet_edge.model.onnx import export_onnx
    from lprnet_edge.runtime.files import sha256_file

    weights = tiny_tvm_artifact.parent / "tiny.pth"
    onnx = export_onnx(weights, cache=tiny_tvm_artifact.parent / "onnx-cache").path
    res = _agent(["bench", "--artifact", str(tiny_tvm_artifact), "--onnx", str(onnx),
                  "--runs", "4", "--warmup", "1", "--rounds", "2", "--threads", "1"])
    assert res["runs"] == 4 and res["threads"] == 1  # the Recognizer benchmark is still there
    comp = res["compare"]
    assert [r["name"] for r in comp["rows"]] == ["tvm", "onnxruntime"]
    assert comp["threads"] == 1 and comp["rounds"] == 2 and comp["runs_per_round"] == 2
    for row in comp["rows"]:
        t = row["timing"]
        assert t["rounds"] == 2 and t["runs"] == 4 and t["median_ms"] > 0
    ort_row = comp["rows"][1]
    assert ort_row["speedup"] == pytest.approx(comp["speedup"]["vs_onnxruntime"])
    assert ort_row["speedup"] == pytest.approx(ort_row["timing"]["median_ms"]
                                               / comp["rows"][0]["timing"]["median_ms"])
    assert ort_row["max_abs_logit_diff"] < 1e-2  # same fp32 weights, two compilers
    assert "PyTorch" in comp["missing"]["torch"]
    assert comp["source"]["weights_sha256"] == sha256_file(weights)


@pytest.mark.slow
def test_agent_bench_onnx_without_onnxruntime_says_how_to_install(tiny_tvm_artifact: Path,
                                                                  tmp_path: Path):
    pytest.importorskip("torch")
    from lprnet_edge.model.onnx import export_onnx

    onnx = export_onnx(tiny_tvm_artifact.parent / "tiny.pth",
                       cache=tiny_tvm_artifact.parent / "onnx-cache").path
    res = _agent(["bench", "--artifact", str(tiny_tvm_artifact), "--onnx", str(onnx),
                  "--compare-only", "--runs", "2", "--warmup", "0", "--rounds", "2",
                  "--threads", "1"], block_ort=True)
    assert "runs" not in res  # --compare-only: no Recognizer benchmark
    comp = res["compare"]
    assert [r["name"] for r in comp["rows"]] == ["tvm"] and comp["speedup"] == {}
    assert comp["missing"]["onnxruntime"].startswith("not installed on the device: "
                                                     "pip install onnxruntime")


@pytest.mark.slow
def test_agent_bench_onnx_survives_an_onnxruntime_that_crashes(tiny_tvm_artifact: Path,
                                                               tmp_path: Path):
    """An onnxruntime wheel that kills the process on import (the aarch64 wheel does so
    under qemu-user: SIGSEGV) costs its row only: the agent probes it in a child process."""
    pytest.importorskip("torch")
    from lprnet_edge.model.onnx import export_onnx

    onnx = export_onnx(tiny_tvm_artifact.parent / "tiny.pth",
                       cache=tiny_tvm_artifact.parent / "onnx-cache").path
    crashing = tmp_path / "site" / "onnxruntime"
    crashing.mkdir(parents=True)
    (crashing / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), "
                                          "signal.SIGSEGV)\n")
    res = _agent(["bench", "--artifact", str(tiny_tvm_artifact), "--onnx", str(onnx),
                  "--compare-only", "--runs", "2", "--warmup", "0", "--rounds", "2",
                  "--threads", "1"], path=tmp_path / "site")
    comp = res["compare"]
    assert [r["name"] for r in comp["rows"]] == ["tvm"]
    assert "crashes on import (signal 11)" in comp["missing"]["onnxruntime"]
