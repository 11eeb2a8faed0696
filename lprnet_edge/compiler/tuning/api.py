"""``tune()``: fill a model's tuning database for a target, in a worker process.

The caller hands over the Relax module (from :func:`lprnet_edge.compiler.frontend.to_relax`)
and a :class:`TuneConfig`; this side prepares the module, writes the worker's spec, runs the
worker (:mod:`lprnet_edge.compiler.tuning.launcher`) and returns the database and a
:class:`TuningSummary`. A build applies the database with
``compiler.compile.build(mod, spec, ..., database=db)``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lprnet_edge.compiler.compile import prepare_for_tuning
from lprnet_edge.compiler.rpc import check_reachable
from lprnet_edge.compiler.target import TargetSpec
from lprnet_edge.compiler.toolchain import Compiler, find_compiler
from lprnet_edge.compiler.tuning.config import TuneConfig
from lprnet_edge.compiler.tuning.database import (
    label_database,
    mkdir,
    open_database,
    resolve_db_dir,
    target_dict,
    write_json,
)
from lprnet_edge.compiler.tuning.estimate_runner import EstimateSpec, estimate_spec
from lprnet_edge.compiler.tuning.launcher import run_worker
from lprnet_edge.compiler.tuning.scheduler import check_scheduler, time_budget
from lprnet_edge.compiler.tuning.summary import TuningSummary, log_summary
from lprnet_edge.runtime.errors import ToolchainError


@dataclass(frozen=True)
class TuneOptions:
    """How one run goes, beyond the budget of :class:`TuneConfig` (tests and experiments).

    ``tasks``: only tasks whose name contains one of these strings. ``prepared``: the module
    already went through ``compile.prepare_for_tuning``. ``timeout_s``: kill the worker after
    that long (records measured so far stay). ``scheduler``: ``"balanced"`` (every task gets
    a first round before any gets a second, the rest by FLOPs x calls, each batch saved as
    measured) or MetaSchedule's ``"gradient"`` / ``"round-robin"`` (one run over all tasks: a
    small budget runs out before the last tasks get a trial). ``search``: options of
    MetaSchedule's ``EvolutionarySearch``. ``time_budget_s``: start no new round after that
    long (the worker then finishes cleanly; default: a cap for the default budget only).
    ``cc``: the compiler that links candidates measured on a device (default: the target's).
    """

    tasks: Sequence[str] | None = None
    prepared: bool = False
    timeout_s: float | None = None
    scheduler: str = "balanced"
    search: dict[str, Any] = field(default_factory=dict)
    cc: Compiler | None = None
    time_budget_s: float | None = None


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tune(mod: Any, target: Any, config: TuneConfig, log: Callable[[str], None] | None = None,
         options: TuneOptions | None = None) -> tuple[Any, TuningSummary]:
    """Tune ``mod`` for ``target`` (a TargetSpec) into its database; returns
    ``(database, summary)``. Progress (one line per measured batch, with the best latency so
    far) goes to ``log`` (default: stderr)."""
    log = log or _eprint
    opts = options or TuneOptions()
    budget_s = time_budget(config, opts.time_budget_s)
    check_scheduler(opts.scheduler)
    check_environment()
    est = estimate_spec(target, config)
    if est is not None:
        est.check()
        log(f"tuning against the cost instrument: no board given, every run time is "
            f"{est.label()} (qemu + llvm-mca)")
    if config.rpc or config.rpc_tracker:  # fail fast, before minutes of work
        log(f"checking the device ({config.rpc or config.rpc_tracker})...")
        check_reachable(config.rpc, config.rpc_tracker, config.rpc_key,
                        timeout=config.timeout_s)
    log("tuning: preparing the module (fusion passes)...")
    t0 = time.perf_counter()
    prep = mod if opts.prepared else prepare_for_tuning(mod, target)
    db_dir = mkdir(resolve_db_dir(target, prep, config))
    label_database(db_dir, target, prep, _tvm_version(), log)
    with tempfile.TemporaryDirectory(prefix="lprnet-tune-") as tmp:
        spec = _worker_spec(Path(tmp), prep, target, config, db_dir, opts, budget_s, est)
        worker_summary = run_worker(Path(tmp) / "spec.json", Path(spec["summary"]), db_dir,
                                    log, opts.timeout_s)
    summary = TuningSummary.from_worker(
        worker_summary, wall_s=round(time.perf_counter() - t0, 1), db_dir=str(db_dir),
        budget={"trials": config.trials, "trials_per_task": config.trials_per_task,
                "num_trials_per_iter": config.num_trials_per_iter,
                "scheduler": opts.scheduler, "time_budget_s": budget_s,
                "search": dict(opts.search), "tasks": list(opts.tasks) if opts.tasks else "all"},
        runner=_runner_text(config, est), estimated=est.label() if est else None)
    log_summary(summary, log)
    return open_database(db_dir), summary


def _worker_spec(tmp: Path, prep: Any, target: Any, config: TuneConfig, db_dir: Path,
                 opts: TuneOptions, budget_s: float | None,
                 est: EstimateSpec | None) -> dict[str, Any]:
    """Write the prepared module and the worker's spec into ``tmp``."""
    import tvm  # loaded already by prepare_for_tuning; needed only to serialize the module

    spec = {"module": str(tmp / "module.json"), "target": target_dict(target),
            "config": config.to_dict(), "db_dir": str(db_dir),
            "tasks": list(opts.tasks) if opts.tasks else None, "scheduler": opts.scheduler,
            "search": dict(opts.search), "time_budget_s": budget_s,
            "export_cc": _export_compiler(target, config, opts.cc, est is not None),
            "estimate": est.to_dict() if est else None,
            "summary": str(tmp / "summary.json")}
    Path(spec["module"]).write_text(tvm.ir.save_json(prep))
    write_json(tmp / "spec.json", spec)
    return spec


def _tvm_version() -> str:
    import tvm  # loaded already by prepare_for_tuning

    return str(tvm.__version__)


def _runner_text(config: TuneConfig, est: EstimateSpec | None) -> str:
    if est is not None:
        return f"estimate {est.cpu} (qemu + llvm-mca)"
    if config.rpc:
        return "rpc " + config.rpc
    if config.rpc_tracker:
        return f"rpc-tracker {config.rpc_tracker} key {config.rpc_key}"
    return "local"


def _export_compiler(target: Any, config: TuneConfig, cc: Compiler | None,
                     estimated: bool = False) -> dict[str, Any] | None:
    """The compiler that links candidates for a remote runner or the estimate (None:
    measured here)."""
    if not (config.rpc or config.rpc_tracker or estimated):
        return None
    if cc is None:
        if not isinstance(target, TargetSpec):
            return None
        cc = find_compiler(target)
    return {"path": cc.path, "options": list(cc.options)}


def check_environment() -> None:
    """Refuse the tvm-ffi version known to crash MetaSchedule (and say what to install)."""
    try:
        ffi = version("apache-tvm-ffi")
    except PackageNotFoundError:  # not installed through pip: nothing to check
        return
    if ffi.startswith("0.1.15"):
        raise ToolchainError(
            f"apache-tvm-ffi {ffi} crashes MetaSchedule (TuneContext / save_json segfault): "
            "pip install apache-tvm-ffi==0.1.14.post1")
    try:
        import xgboost  # noqa: F401 - checked here, used by the worker's cost model
    except ImportError as e:
        raise ToolchainError("MetaSchedule's cost model needs xgboost: "
                             "pip install 'lprnet-edge[host]'") from e


def list_tasks(mod: Any, target: Any, prepared: bool = False) -> list[dict[str, Any]]:
    """The tuning tasks of ``mod`` (name, weight), in the current process."""
    import tvm  # MetaSchedule: only for callers that ask for the tasks
    from tvm.s_tir import meta_schedule as ms

    prep = mod if prepared else prepare_for_tuning(mod, target)
    tvm_target = (target.tvm_target() if hasattr(target, "tvm_target")
                  else tvm.target.Target(target_dict(target)))
    tasks = ms.relax_integration.extract_tasks(prep, tvm_target)
    return [{"name": t.task_name, "weight": int(t.weight)} for t in tasks]
