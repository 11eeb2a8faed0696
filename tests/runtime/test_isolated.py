"""Timing runtimes side by side in processes of their own: each candidate is built in a worker
process (its environment set first), timed in alternating blocks, and a candidate that cannot
be built is reported rather than taking the others down; then the artifact beside ONNX Runtime
at 2 threads through ``compare_artifact`` (isolated by default above one thread)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lprnet_edge.runtime.errors import LprnetEdgeError
from lprnet_edge.runtime.isolated import WorkerSpec, run_isolated, thread_env


def pid_model(scale: float) -> object:
    """A worker factory for these tests: logits carry the worker's pid and thread setting."""
    pid, threads = os.getpid(), float(os.environ.get("TVM_NUM_THREADS", "0"))
    return lambda x: np.array([pid, threads, float(x.sum()) * scale])


def broken_model() -> object:
    raise LprnetEdgeError("no such model here")


def spec(name: str, factory: object = pid_model, **kwargs: object) -> WorkerSpec:
    return WorkerSpec(name, name, factory, kwargs, thread_env(3))


def test_each_candidate_runs_in_its_own_process_with_its_environment():
    x = np.ones((1, 3, 2, 2), dtype=np.float32)
    res = run_isolated([spec("a", scale=1.0), spec("b", scale=2.0),
                        spec("bad", broken_model)],
                       x, rounds=3, runs=4, warmup=1, settle_s=0.0)
    pids = {name: int(out[0]) for name, out in res.outputs.items()}
    assert set(pids) == {"a", "b"} and len({*pids.values(), os.getpid()}) == 3
    assert all(out[1] == 3.0 for out in res.outputs.values())  # TVM_NUM_THREADS set there
    assert res.outputs["b"][2] == 2 * res.outputs["a"][2] == 24.0
    assert set(res.blocks) == {"a", "b"}
    assert all(len(b) == 3 and all(len(r) == 4 for r in b) for b in res.blocks.values())
    assert "no such model here" in res.errors["bad"]


def test_refuses_no_rounds():
    with pytest.raises(LprnetEdgeError, match="rounds >= 1"):
        run_isolated([spec("a", scale=1.0)], np.zeros(1), rounds=0)


@pytest.mark.slow
def test_compare_artifact_at_two_threads_times_each_runtime_alone(tiny_tvm_artifact):
    pytest.importorskip("onnxruntime")
    from lprnet_edge.model.onnx import export_onnx
    from lprnet_edge.runtime.baselines import compare_artifact, comparison_title

    onnx = export_onnx(tiny_tvm_artifact.parent / "tiny.pth",
                       cache=tiny_tvm_artifact.parent / "onnx").path
    comp = compare_artifact(tiny_tvm_artifact, onnx=onnx, threads=2, rounds=2, runs=3,
                            warmup=1)
    assert comp.isolated and comp.threads == 2 and not comp.missing
    assert [r["name"] for r in comp.rows] == ["tvm", "onnxruntime"]
    ort = comp.rows[1]
    assert ort["max_abs_logit_diff"] < 1e-3
    assert ort["timing"]["rounds"] == 2 and ort["timing"]["runs"] == 6
    assert "one process per runtime" in comparison_title(comp.to_dict())
    same = compare_artifact(tiny_tvm_artifact, onnx=onnx, threads=1, rounds=1, runs=2, warmup=1)
    assert not same.isolated and same.rows[1]["max_abs_logit_diff"] < 1e-3
