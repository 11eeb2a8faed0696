"""One path that loads and times a compiled module, here or on a device (tvmc's ``run_module``).

A :class:`Session` is local (``tvm.rpc.LocalSession()``, this process) or remote (a server or a
tracker, :func:`lprnet_edge.compiler.rpc.connect`). Then the same code runs for both
(:class:`lprnet_edge.runtime.profile.LoadedModule`): upload the library, load it, build the VM
on ``session.cpu()``, send the weights, ``vm.time_evaluator`` -> a typed :class:`Timing`.

Per-kernel profiles (``profile=True``): locally and on a board through its agent over SSH
(``bench --host --profile``) with ``VirtualMachine.set_instrument``; over RPC, where a Python
instrument cannot run on the device (TVM 0.27 cannot send a callback, and ``time_evaluator``
does not search the executable's imported kernel library), by calling each kernel from here
(:meth:`LoadedModule.profile_calls`) with the argument shapes the build recorded.

TVM is imported inside the functions that use it: importing it takes seconds (and
loads torch), and this module is imported by every command at start-up.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.compiler.rpc import DEFAULT_TIMEOUT_S, connect, with_timeout
from lprnet_edge.runtime.artifact import Artifact
from lprnet_edge.runtime.profile import (
    LoadedModule,
    ModuleInputs,
    Profile,
    Timing,
    apply_threads,
    configured_threads,
    module_inputs,
)


@dataclass
class Session:
    """Where a module runs: ``kind`` ``"local"`` or ``"rpc"``; ``tvm_session`` is the
    ``tvm.rpc`` session object (``LocalSession`` or ``RPCSession``)."""

    kind: str
    where: str
    tvm_session: Any
    timeout: float = 600.0

    @property
    def is_local(self) -> bool:
        return self.kind == "local"


def local_session() -> Session:
    """This process, through ``tvm.rpc.LocalSession`` (the same calls as a remote one)."""
    from tvm import rpc as tvm_rpc

    # LocalSession runs TVM's server-side handlers here, which log every load_module at INFO.
    logging.getLogger("RPCServer").setLevel(logging.WARNING)
    return Session("local", "local", tvm_rpc.LocalSession())


def open_session(rpc: str | None = None, tracker: str | None = None, key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, session_timeout: float = 0,
                 run_timeout: float = 600.0) -> Session:
    """A local session, or with ``rpc="HOST:PORT"`` / ``tracker`` + ``key`` a device's.

    ``timeout`` bounds reaching the device; ``run_timeout`` each timing run on it."""
    if not rpc and not tracker:
        return local_session()
    sess = connect(rpc, tracker, key, timeout=timeout, session_timeout=session_timeout)
    where = rpc or f"{tracker} key {key}"
    return Session("rpc", where, sess, run_timeout)


@dataclass(frozen=True)
class ModuleRun:
    """A timed module: the figures, its first output (to check it) and the load time
    (upload included over RPC)."""

    timing: Timing
    output: np.ndarray
    load_s: float


def time_module(session: Session, lib_path: str | Path, params: list[np.ndarray],
                x: np.ndarray, entry: str = "main", number: int = 1, repeat: int = 100,
                warmup: int = 10, threads: int | None = None) -> ModuleRun:
    """Load ``lib_path`` on the session, bind ``x`` and ``params``, time ``entry``.

    ``threads``: the thread count to report (local: the one configured here)."""

    def run() -> ModuleRun:
        mod = LoadedModule(lib_path, params, entry, session.tvm_session)
        timing = mod.time(x, number=number, repeat=repeat, warmup=warmup, threads=threads)
        return ModuleRun(timing, mod.output(), mod.load_s)

    if session.is_local:
        return run()
    return with_timeout(run, session.timeout, f"benchmark on {session.where}")


@dataclass(frozen=True)
class BenchResult:
    """``time_artifact``'s answer: where, what, how fast (and per kernel with a profile)."""

    artifact: str
    where: str
    target: str
    timing: Timing
    output_shape: list[int]
    load_s: float
    profile: Profile | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"artifact": self.artifact, "where": self.where,
                             "target": self.target, "time_evaluator": self.timing.to_dict(),
                             "output_shape": self.output_shape, "load_s": self.load_s}
        if self.profile is not None:
            d["profile"] = self.profile.to_dict()
        return d


def time_artifact(artifact: str | Path | Artifact, session: Session | None = None,
                  number: int = 1, repeat: int = 100, warmup: int = 10,
                  threads: int | None = None, profile: bool = False,
                  profile_runs: int = 20) -> BenchResult:
    """Time an artifact's module on ``session`` (None: locally); ``profile`` adds the
    per-kernel breakdown (over RPC: :func:`_profile_remote`)."""
    session = session or local_session()
    inp = module_inputs(artifact, check_arch=session.is_local)
    if profile and not session.is_local:
        return _profile_remote(inp, session, repeat, warmup, profile_runs)
    n_threads = None
    if session.is_local:
        apply_threads(threads, inp.artifact)
        n_threads = configured_threads(threads)
    run = time_module(session, inp.lib_path, inp.params, inp.x, inp.entry, number=number,
                      repeat=repeat, warmup=warmup, threads=n_threads)
    prof = None
    if profile:
        mod = LoadedModule(inp.lib_path, inp.params, inp.entry)
        prof = mod.profile(inp.x, runs=profile_runs, warmup=min(warmup, 5),
                           schedules=inp.schedules, threads=n_threads)
    return BenchResult(artifact=str(inp.artifact.root), where=session.where,
                       target=inp.artifact.manifest.target.name, timing=run.timing,
                       output_shape=list(run.output.shape), load_s=run.load_s, profile=prof)


def _profile_remote(inp: ModuleInputs, session: Session, repeat: int, warmup: int,
                    profile_runs: int) -> BenchResult:
    """Over RPC: the whole call timed on the device, then each kernel called from here
    (:meth:`LoadedModule.profile_calls`; an instrument cannot cross RPC)."""
    kernels = inp.kernels  # refused before anything is uploaded if the build recorded none

    def run() -> BenchResult:
        mod = LoadedModule(inp.lib_path, inp.params, inp.entry, session.tvm_session)
        timing = mod.time(inp.x, number=1, repeat=repeat, warmup=warmup)
        prof = mod.profile_calls(inp.x, kernels, runs=profile_runs, schedules=inp.schedules)
        return BenchResult(artifact=str(inp.artifact.root), where=session.where,
                           target=inp.artifact.manifest.target.name, timing=timing,
                           output_shape=list(mod.output().shape), load_s=mod.load_s,
                           profile=prof)

    return with_timeout(run, session.timeout, f"profile on {session.where}")


# ---------------------------------------------------------------- host conveniences


def load_host(lib_path: str | Path, params: list[np.ndarray] | dict[str, np.ndarray],
              entry: str = "main") -> LoadedModule:
    """A host-built library loaded in this process, weights bound; call it with ``x``."""
    values = list(params.values()) if isinstance(params, dict) else list(params)
    return LoadedModule(lib_path, [_weight(p) for p in values], entry)


def _weight(p: np.ndarray) -> np.ndarray:
    """A weight as the module takes it: float32, unless it has an integer (or float64) type
    of its own (the int8 graph's precomputed weights)."""
    a = np.asarray(p)
    return a if a.dtype.kind in "iu" or a.dtype == np.float64 else a.astype(np.float32)


def run_host(lib_path: str | Path, x: np.ndarray,
             params: list[np.ndarray] | dict[str, np.ndarray]) -> np.ndarray:
    """Run a host-built module once on ``x`` (1x3x24x94 float32): the logits."""
    return load_host(lib_path, params)(x)


def in_child_process(fn: Callable[..., Any], *args: Any, timeout: float,
                     on_timeout: Callable[[], Exception]) -> Any:
    """``fn(*args)`` in a fresh (spawned) process, killed after ``timeout`` seconds (then
    ``on_timeout()`` is raised). The TVM RPC client blocks in C++ holding the GIL, which would
    starve Python threads of this process, such as those pumping an SSH tunnel."""
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        fut = ex.submit(fn, *args)
        try:
            return fut.result(timeout=timeout)
        except cf.TimeoutError:
            for p in list(getattr(ex, "_processes", {}).values()):
                p.kill()
            raise on_timeout() from None
