"""Time runtimes side by side, each in its own process, alternating processes round by round.

At more than one thread, two runtimes in one process do not share the cores fairly: ONNX
Runtime's and TVM's worker pools spin-wait between calls, so interleaving them in one process
on a small machine slows each by the other's idle spinning. Here every candidate runs in a
worker process of its own (loaded once, thread count set in its environment before its runtime
starts), and the parent asks one worker at a time for a block of ``runs`` timed calls, round
after round (A, B, C, A, B, C...), so a drift of the machine's speed still hits them all alike;
between blocks the parent waits ``settle_s`` so the previous worker's pool stops spinning.

A candidate is a :class:`WorkerSpec`: a module-level function the worker calls with ``kwargs``
to build ``fn(x) -> logits`` (pickled by name, so the worker imports its module), since a
loaded runtime cannot be sent to another process. Runtime side: numpy and the standard
library (this file ships to the board).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lprnet_edge.runtime.errors import LprnetEdgeError

STOP_TIMEOUT_S = 30.0  # a worker that does not exit by then is terminated (it is our child)


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker process builds one candidate: ``factory(**kwargs)``, a module-level
    function; ``env`` is set before it runs (e.g. ``TVM_NUM_THREADS``)."""

    name: str
    label: str
    factory: Callable[..., Callable[[np.ndarray], Any]]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        factory = f"{self.factory.__module__}:{self.factory.__qualname__}"
        return {"name": self.name, "label": self.label, "factory": factory,
                "kwargs": {k: str(v) for k, v in self.kwargs.items()}, "env": dict(self.env)}


def thread_env(threads: int) -> dict[str, str]:
    """The environment that sizes every runtime's pool in a fresh process."""
    n = str(int(threads))
    return {"TVM_NUM_THREADS": n, "OMP_NUM_THREADS": n}


def _worker(conn: Any, spec: WorkerSpec) -> None:
    """A candidate's process: build it, then answer ``warmup``/``block``/``stop`` requests."""
    os.environ.update(spec.env)
    try:
        fn = spec.factory(**dict(spec.kwargs))
    except Exception as e:  # any failure to build is reported, not raised in the child
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    x = None
    while True:
        op, arg = conn.recv()
        if op == "stop":
            return
        if op == "warmup":
            x, n = arg
            y = None
            for _ in range(max(1, n)):
                y = fn(x)
            conn.send(("out", np.asarray(y)))
        elif op == "block":
            times = []
            for _ in range(arg):
                t0 = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - t0)
            conn.send(("times", times))


@dataclass(frozen=True)
class IsolatedRun:
    """Per candidate: the per-round blocks of call times (s) and the output for the input."""

    blocks: dict[str, list[list[float]]]
    outputs: dict[str, np.ndarray]
    errors: dict[str, str]


def _ask(conn: Any, name: str, msg: tuple[str, Any], timeout: float) -> Any:
    conn.send(msg)
    if not conn.poll(timeout):
        raise LprnetEdgeError(f"{name}: its worker process did not answer within {timeout:.0f} s")
    kind, value = conn.recv()
    if kind == "error":
        raise LprnetEdgeError(f"{name}: {value}")
    return value


def run_isolated(specs: Sequence[WorkerSpec], x: np.ndarray, rounds: int = 5, runs: int = 20,
                 warmup: int = 5, settle_s: float = 0.05, timeout: float = 600.0
                 ) -> IsolatedRun:
    """Start one worker per spec (one at a time), warm each up on ``x``, then ``rounds``
    rounds of one ``runs``-call block per worker, in spec order. A worker that cannot build
    its candidate is left out and named in ``errors``."""
    if rounds < 1 or runs < 1:
        raise LprnetEdgeError("timing needs rounds >= 1 and runs >= 1")
    ctx = mp.get_context("spawn")  # a fresh interpreter: no runtime state inherited
    workers: dict[str, tuple[Any, Any]] = {}
    errors: dict[str, str] = {}
    outputs: dict[str, np.ndarray] = {}
    try:
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            try:
                if not parent.poll(timeout):
                    raise LprnetEdgeError(f"{spec.name}: did not load within {timeout:.0f} s")
                kind, value = parent.recv()
                if kind == "error":
                    raise LprnetEdgeError(value)
                outputs[spec.name] = _ask(parent, spec.name, ("warmup", (x, warmup)), timeout)
            except (LprnetEdgeError, EOFError) as e:
                errors[spec.name] = str(e) or "the worker process died"
                _stop(proc, parent)
                continue
            workers[spec.name] = (proc, parent)
        blocks: dict[str, list[list[float]]] = {name: [] for name in workers}
        for _ in range(rounds):
            for name, (_, conn) in workers.items():
                time.sleep(settle_s)
                blocks[name].append(_ask(conn, name, ("block", runs), timeout))
    finally:
        for proc, conn in workers.values():
            _stop(proc, conn)
    return IsolatedRun(blocks, outputs, errors)


def _stop(proc: Any, conn: Any) -> None:
    try:
        conn.send(("stop", None))
    except (OSError, ValueError):
        pass
    proc.join(STOP_TIMEOUT_S)
    if proc.is_alive():
        proc.terminate()
        proc.join(STOP_TIMEOUT_S)
    conn.close()


def artifact_module(artifact: str, threads: int | None = None) -> Callable[[np.ndarray], Any]:
    """Worker factory: an artifact's compiled module (model only, numpy in and out), with
    TVM's pool sized to ``threads`` before it starts."""
    from lprnet_edge.runtime.profile import LoadedModule, apply_threads, module_inputs

    inp = module_inputs(artifact, check_arch=True)
    apply_threads(threads, inp.artifact)
    return LoadedModule(inp.lib_path, inp.params, inp.entry)


def onnxruntime_model(path: str, threads: int) -> Callable[[np.ndarray], Any]:
    """Worker factory: ONNX Runtime fp32 as :class:`~lprnet_edge.runtime.baselines.
    OnnxRuntimeModel` sets it up."""
    from lprnet_edge.runtime.baselines import OnnxRuntimeModel

    return OnnxRuntimeModel(path, threads)
