"""Auto-tuning with MetaSchedule, into a reusable, resumable JSON tuning database.

* The database (``ms.database.JSONDatabase``: ``database_workload.json`` +
  ``database_tuning_record.json``) lives in ``$LPRNET_EDGE_CACHE/tuning/<key>/`` where
  ``<key>`` = hash of the target's canonical TVM dict + structural hash of the prepared
  module, or in ``TuneConfig.db_dir`` / ``--tuning-db DIR`` (a directory that can be shared).
* Budget: ``config.trials`` is the *total* number of measured candidates wanted for the
  model's tasks. Records already in the database count: tuning again with the same budget
  measures nothing and returns at once; a larger budget tunes only the difference; tasks with
  ``config.trials_per_task`` records already are skipped.
* MetaSchedule runs in a **worker process** (``python -m lprnet_edge.compiler.tune SPEC``)
  in its own process group. Records are appended to the JSON files as they are measured, so a
  crash, a kill or Ctrl-C loses at most the batch in flight; a crash is reported with its
  signal and the same command resumes.
* The worker and MetaSchedule's builder/runner processes start with a ``PYTHONPATH`` shim
  (:func:`worker_env`) that keeps torch out of them (``tvm_ffi`` imports torch eagerly when
  it is installed) and caches ``inspect.getmodule`` misses, which makes TVMScript's
  ``import tvm.s_tir.tensor_intrin`` several times faster.
* Measurement: local (``LocalBuilder`` + ``LocalRunner``), an RPC server directly
  (``config.rpc``: MetaSchedule's ``RPCRunner`` only knows trackers, so it is given a session
  function that connects to the server itself), or an RPC tracker + key.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lprnet_edge.compiler.schedules import mean_run_secs
from lprnet_edge.compress.configs import TuneConfig
from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError

DB_FILES = ("database_workload.json", "database_tuning_record.json")
PROGRESS = "@@lprnet-tune "  # prefix of the worker's progress lines (JSON follows)
# Tests only: the worker kills itself with SIGSEGV after this many measured batches.
CRASH_TEST_ENV = "LPRNET_EDGE_TUNE_CRASH_AFTER"
SCHEDULERS = ("balanced", "gradient", "round-robin")
# "balanced" (lprnet-edge's own plan, see plan_budget): a task whose share of the model's
# estimated FLOPs is below CHEAP_SHARE is "cheap" (pooling, means, reshapes) and gets at most
# CHEAP_TRIALS measured candidates; every task gets its first round before any gets a second.
CHEAP_SHARE = 0.01
CHEAP_TRIALS = 4
# A tuning run with TuneConfig's default trial budget also stops starting new rounds after
# this long, so a plain `build --tune` ends within 30 min even on a slow or busy machine.
DEFAULT_TIME_BUDGET_S = 25 * 60

# ---------------------------------------------------------------- worker environment

_SITECUSTOMIZE = '''\
"""lprnet-edge tuning worker shim (written by lprnet_edge.compiler.tune; safe to delete)."""
import inspect as _inspect

_orig_getmodule = _inspect.getmodule
_misses = set()


def _getmodule(object, _filename=None):
    # TVMScript calls inspect.stack() for every @prim_func; for frames of frozen modules
    # inspect.getmodule() scans all of sys.modules each time. Remember the misses.
    if _filename is not None and _filename in _misses:
        return None
    m = _orig_getmodule(object, _filename)
    if m is None and _filename is not None:
        _misses.add(_filename)
    return m


_inspect.getmodule = _getmodule
'''
_NO_TORCH = ('raise ImportError("torch is kept out of lprnet-edge\'s TVM worker processes '
             '(see lprnet_edge.compiler.tune.worker_env)")\n')


def _shim_dir() -> Path:
    """A directory with the shim's ``sitecustomize.py`` and a ``torch`` that fails to import."""
    from lprnet_edge.paths import cache_dir

    digest = hashlib.sha256((_SITECUSTOMIZE + _NO_TORCH).encode()).hexdigest()[:10]
    d = cache_dir() / "tvm-worker-shim" / digest
    if not (d / "torch" / "__init__.py").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".shim-", dir=_mkdir(d.parent)))
        (tmp / "torch").mkdir()
        (tmp / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        (tmp / "torch" / "__init__.py").write_text(_NO_TORCH)
        try:
            os.replace(tmp, d)
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return d


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for TVM worker processes (tuning worker, builders, RPC servers)."""
    env = dict(os.environ)
    env.update(extra or {})
    parts = [str(_shim_dir())]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    # The package itself must stay importable from the workers (RPC session function).
    parts.append(str(Path(__file__).resolve().parent.parent))
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    return env


# ---------------------------------------------------------------- keys and locations


def target_dict(target: Any) -> dict[str, Any]:
    """The TVM target dict of a TargetSpec, a dict, or a ``tvm.target.Target``."""
    if hasattr(target, "tvm") and isinstance(target.tvm, dict):
        return dict(target.tvm)
    if isinstance(target, dict):
        return dict(target)
    if hasattr(target, "export"):
        return dict(target.export())
    raise LprnetEdgeError(f"not a target: {target!r}")


def target_key(target: Any) -> str:
    canon = json.dumps(target_dict(target), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def workload_key(prepared: Any) -> str:
    import tvm_ffi

    return f"{int(tvm_ffi.structural_hash(prepared)) & ((1 << 64) - 1):016x}"


def default_db_dir(target: Any, prepared: Any) -> Path:
    from lprnet_edge.paths import cache_dir

    return cache_dir() / "tuning" / f"{target_key(target)}-{workload_key(prepared)}"


def resolve_db_dir(target: Any, prepared: Any, config: TuneConfig) -> Path:
    return Path(config.db_dir) if config.db_dir else default_db_dir(target, prepared)


def has_records(db_dir: str | Path) -> bool:
    p = Path(db_dir) / DB_FILES[1]
    return p.is_file() and p.stat().st_size > 0


def open_database(db_dir: str | Path) -> Any:
    """The JSON database in ``db_dir`` (created empty if missing)."""
    from tvm.s_tir import meta_schedule as ms

    d = _mkdir(Path(db_dir))
    return ms.database.JSONDatabase(path_workload=str(d / DB_FILES[0]),
                                    path_tuning_record=str(d / DB_FILES[1]),
                                    allow_missing=True)


def count_records(db_dir: str | Path) -> int:
    """Lines (= measured candidates) in the records file, without loading TVM."""
    p = Path(db_dir) / DB_FILES[1]
    if not p.is_file():
        return 0
    with open(p, "rb") as f:
        return sum(1 for line in f if line.strip())


def _prepare(mod: Any, target: Any) -> Any:
    """The module MetaSchedule extracts tasks from (compile.py's shared pre-tuning passes)."""
    from lprnet_edge.compiler.build import prepare_for_tuning

    return prepare_for_tuning(mod, target)


def _tvm_target(target: Any) -> Any:
    if hasattr(target, "tvm_target"):
        return target.tvm_target()
    import tvm

    return tvm.target.Target(target_dict(target))


def check_environment() -> None:
    """Refuse the tvm-ffi version known to crash MetaSchedule (and say what to install)."""
    try:
        from importlib.metadata import version

        ffi = version("apache-tvm-ffi")
    except Exception:  # noqa: BLE001 - not installed through pip: nothing to check
        return
    if ffi.startswith("0.1.15"):
        raise ToolchainError(
            f"apache-tvm-ffi {ffi} crashes MetaSchedule (TuneContext / save_json segfault): "
            "pip install apache-tvm-ffi==0.1.14.post1")
    try:
        import xgboost  # noqa: F401
    except ImportError as e:
        raise ToolchainError("MetaSchedule's cost model needs xgboost: "
                             "pip install 'lprnet-edge[host]'") from e


# ---------------------------------------------------------------- public API


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tune(mod: Any, target: Any, config: TuneConfig, log: Callable[[str], None] | None = None,
         tasks: Sequence[str] | None = None, prepared: bool = False,
         timeout_s: float | None = None, scheduler: str = "balanced",
         search: dict[str, Any] | None = None, cc: Any = None,
         time_budget_s: float | None = None) -> tuple[Any, dict[str, Any]]:
    """Tune ``mod`` (from ``compile.to_relax``) for ``target`` (a TargetSpec).

    Returns ``(database, summary)``; build with ``compile.build(mod, spec, ..., database=db)``.
    ``tasks``: only tune tasks whose name contains one of these strings (tests, debugging).
    ``prepared``: ``mod`` already went through ``compile.prepare_for_tuning``.
    ``timeout_s``: kill the worker after that long (records measured so far stay).
    ``scheduler``: ``"balanced"`` (default, :func:`plan_budget`): every task gets its first
    round (a few trials for cheap pooling/elementwise tasks) before any task gets a second,
    the rest goes to the convolutions in proportion to FLOPs x calls; it runs MetaSchedule's
    round-robin scheduler round by round, so each batch is saved as soon as it is measured.
    ``"gradient"`` / ``"round-robin"``: one MetaSchedule run with that task scheduler over all
    tasks (gradient keeps nothing of an interrupted first pass, and a small budget runs out
    before the last tasks get any trial).
    ``time_budget_s``: start no new task round after that many seconds (the worker then
    finishes cleanly with what it measured; unlike ``timeout_s``, not an error). Default:
    ``DEFAULT_TIME_BUDGET_S`` when ``config.trials`` is TuneConfig's default, else none.
    ``search``: options of MetaSchedule's ``EvolutionarySearch`` (e.g. a smaller
    ``population_size`` for quick tests); default: MetaSchedule's defaults.
    ``cc``: the :class:`lprnet_edge.compiler.toolchain.Compiler` that links candidates measured on a
    device (default: the target's toolchain), so the device loads a ready ``.so`` and needs no
    compiler of its own (MetaSchedule's default ships ``.tar`` objects the device must link).
    Progress (one line per measured batch, with the best latency so far) goes to ``log``
    (default: stderr).
    """
    log = log or _eprint
    if time_budget_s is None and config.trials == TuneConfig().trials:
        time_budget_s = DEFAULT_TIME_BUDGET_S
    if scheduler not in SCHEDULERS:
        raise LprnetEdgeError(f"scheduler {scheduler!r}: use one of {list(SCHEDULERS)}")
    check_environment()
    if config.rpc or config.rpc_tracker:  # fail fast, before minutes of work
        from lprnet_edge.compiler.rpc import check_reachable

        log(f"checking the device ({config.rpc or config.rpc_tracker})...")
        check_reachable(config.rpc, config.rpc_tracker, config.rpc_key,
                        timeout=config.timeout_s)
    log("tuning: preparing the module (fusion passes)...")
    import tvm

    t0 = time.perf_counter()
    prep = mod if prepared else _prepare(mod, target)
    db_dir = _mkdir(resolve_db_dir(target, prep, config))
    tdict = target_dict(target)
    meta = {"target": tdict, "target_name": getattr(target, "name", None),
            "target_key": target_key(target), "workload_key": workload_key(prep),
            "tvm": tvm.__version__}
    meta_path = db_dir / "lprnet-edge-tuning.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if old and old.get("target_key") != meta["target_key"]:
        # A shared --tuning-db from another target: keep its label, say what happens.
        log(f"note: {db_dir} holds records tuned for {old.get('target_name') or 'another'} "
            f"target; they are applied to {meta['target_name']} where workloads match")
    else:
        _write_json(meta_path, meta)
    with tempfile.TemporaryDirectory(prefix="lprnet-tune-") as tmp:
        spec = {"module": str(Path(tmp) / "module.json"), "target": tdict,
                "config": config.to_dict(), "db_dir": str(db_dir),
                "tasks": list(tasks) if tasks else None, "scheduler": scheduler,
                "search": dict(search or {}), "time_budget_s": time_budget_s,
                "export_cc": _export_compiler(target, config, cc),
                "summary": str(Path(tmp) / "summary.json")}
        Path(spec["module"]).write_text(tvm.ir.save_json(prep))
        _write_json(Path(tmp) / "spec.json", spec)
        summary = _run_worker(Path(tmp) / "spec.json", Path(spec["summary"]), db_dir, log,
                              timeout_s)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["db_dir"] = str(db_dir)
    summary["budget"] = {"trials": config.trials, "trials_per_task": config.trials_per_task,
                         "num_trials_per_iter": config.num_trials_per_iter,
                         "scheduler": scheduler, "time_budget_s": time_budget_s,
                "search": dict(search or {}), "tasks": list(tasks) if tasks else "all"}
    summary["runner"] = ("rpc " + config.rpc if config.rpc else
                         f"rpc-tracker {config.rpc_tracker} key {config.rpc_key}"
                         if config.rpc_tracker else "local")
    _log_summary(summary, log)
    return open_database(db_dir), summary


def _export_compiler(target: Any, config: TuneConfig, cc: Any) -> dict[str, Any] | None:
    """The compiler that links candidates for a remote runner (None: measured here)."""
    if not (config.rpc or config.rpc_tracker):
        return None
    if cc is None:
        from lprnet_edge.compiler.target import TargetSpec
        from lprnet_edge.compiler.toolchain import find_compiler

        if not isinstance(target, TargetSpec):
            return None
        cc = find_compiler(target)
    return {"path": cc.path, "options": list(cc.options)}


def export_shared(cc_path: str, options: Sequence[str], mod: Any) -> str:
    """MetaSchedule builder export: a shared library linked here by ``cc_path`` (runs in the
    builder's worker processes, hence a module-level function)."""
    from lprnet_edge.compiler.build import export_library

    path = os.path.join(tempfile.mkdtemp(prefix="lprnet-cand-"), "tvm_tmp_mod.so")
    export_library(mod, path, cc_path, options)
    return path


def untuned_tasks(tasks: list[Any]) -> list[Any]:
    """The tasks worth tuning: not the dot-product convolutions, whose hand-written
    tensorized schedule (``compiler.dot.schedule``) the build always applies."""
    from lprnet_edge.compiler.dot import kernel_kind

    return [t for t in tasks
            if kernel_kind(next(iter(t.dispatched[0].functions.values()))) is None]


def list_tasks(mod: Any, target: Any, prepared: bool = False) -> list[dict[str, Any]]:
    """The tuning tasks of ``mod`` (name, weight), in the current process."""
    from tvm.s_tir import meta_schedule as ms

    prep = mod if prepared else _prepare(mod, target)
    tasks = ms.relax_integration.extract_tasks(prep, _tvm_target(target))
    return [{"name": t.task_name, "weight": int(t.weight)} for t in tasks]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _run_worker(spec_path: Path, summary_path: Path, db_dir: Path,
                log: Callable[[str], None], timeout_s: float | None) -> dict[str, Any]:
    logs = _mkdir(db_dir / "logs")
    log_path = logs / f"worker-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    before = count_records(db_dir)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    with open(log_path, "w", encoding="utf-8") as wlog:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lprnet_edge.compiler.tune", str(spec_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=worker_env(), text=True, bufsize=1,
            encoding="utf-8", errors="replace")
        timed_out = False
        try:
            assert proc.stdout is not None
            if deadline:
                import threading

                def watchdog() -> None:
                    nonlocal timed_out
                    while proc.poll() is None:
                        if time.monotonic() > deadline:
                            timed_out = True
                            _kill_group(proc)
                            return
                        time.sleep(0.5)

                threading.Thread(target=watchdog, daemon=True).start()
            for line in proc.stdout:
                if line.startswith(PROGRESS):
                    with contextlib.suppress(ValueError):
                        log(_format_progress(json.loads(line[len(PROGRESS):])))
                        continue
                wlog.write(line)
                wlog.flush()
            proc.wait()
        except BaseException:
            _kill_group(proc)
            kept = count_records(db_dir)
            log(f"tuning interrupted: {kept} records kept in {db_dir} "
                f"({kept - before} new); run the same command again to resume")
            raise
        finally:
            _kill_group(proc)  # builder/runner processes left behind by a crash
    if proc.returncode != 0 or not summary_path.is_file():
        kept = count_records(db_dir)
        rc = proc.returncode
        if timed_out:
            how = f"was stopped after the {timeout_s:g}s time limit"
        elif rc is not None and rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            how = f"crashed ({name})"
        else:
            how = f"failed (exit code {rc})"
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-6:])
        raise LprnetEdgeError(
            f"the MetaSchedule tuning worker {how}; {kept} records are kept in {db_dir} "
            f"({kept - before} from this run) and the same command resumes from them. "
            f"Worker log {log_path}: {tail}")
    return json.loads(summary_path.read_text())


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Stragglers of the group (builder/runner pool workers) after the leader is gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _format_progress(p: dict[str, Any]) -> str:
    kind = p.get("event")
    if kind == "start":
        return (f"tuning {p['tasks_to_tune']} of {p['tasks']} tasks, {p['budget']} new trials "
                + (f"in {p['rounds']} rounds ({p['cheap']} cheap tasks get at most "
                   f"{CHEAP_TRIALS}) " if p.get("scheduler") == "balanced" else "")
                + f"({p['existing']} records already in {p['db_dir']})")
    if kind == "stage":
        return f"tuning: {p['what']}... ({p['elapsed_s']:.0f}s)"
    if kind == "round":
        return (f"round {p['round']}/{p['rounds']}: {p['tasks']} tasks, up to {p['trials']} "
                "trials each "
                f"[{p['done']}/{p['budget']} done] ({p['elapsed_s']:.0f}s)")
    if kind == "skip":
        return (f"tuning skipped: the database already has {p['existing']} records for this "
                f"model and target (budget {p['trials']}); reusing them")
    best = p.get("best_ms")
    est = p.get("est_ms")
    return (f"[{p['done']}/{p['budget']}] task {p['task_index'] + 1}/{p['tasks']} "
            f"{p['task']}: {p['task_trials']} trials, best "
            + (f"{best:.3f} ms" if best is not None else "-")
            + (f"; model estimate {est:.2f} ms" if est is not None else "")
            + f" ({p['elapsed_s']:.0f}s"
            + (f", ETA {_duration(p['eta_s'])})" if p.get("eta_s") is not None else ")"))


def _duration(secs: float) -> str:
    secs = int(round(secs))
    return f"{secs // 60}m{secs % 60:02d}s" if secs >= 60 else f"{secs}s"


def _log_summary(s: dict[str, Any], log: Callable[[str], None]) -> None:
    def ms(v: float | None) -> str:
        return f"{v:.2f} ms" if v is not None else "n/a"

    log(f"tuning summary: {s['tasks_tuned']}/{s['tasks']} tasks tuned, "
        f"{s['trials_new']} new trials ({s['records_total']} records in total), "
        f"{s['tune_s']:.0f}s; estimated latency {ms(s['est_ms_before'])} -> "
        f"{ms(s['est_ms_after'])}; database {s['db_dir']}")
    if s.get("stopped_by_time_budget"):
        log("  stopped by the time budget before the trial budget was spent")
    if s.get("untuned"):
        log(f"  {len(s['untuned'])} tasks have no record and keep default schedules: "
            + ", ".join(s["untuned"]))


# ---------------------------------------------------------------- the worker process


def plan_budget(costs: Sequence[float], have: Sequence[int], budget: int, per_iter: int,
                cap: int | None = None, skip: Sequence[int] = ()
                ) -> list[list[tuple[int, int]]]:
    """Rounds of ``(task index, new trials)`` for the "balanced" scheduler.

    Round 0 gives every task its first round (``per_iter`` trials, ``CHEAP_TRIALS`` for a
    cheap task; none if its records already make one), heaviest first, so a budget too small
    for everyone still tunes the convolutions. The rest goes in ``per_iter`` units to the
    non-cheap tasks, each unit to the task with the highest ``cost / (trials + per_iter)``,
    which makes trials proportional to cost (FLOPs x calls); existing records count, so a
    resumed run rebalances. ``cap``: at most that many records per task (existing included).
    ``skip``: tasks that get nothing (their search space is exhausted).
    """
    n = len(costs)
    total = float(sum(costs)) or 1.0
    cheap = [c / total < CHEAP_SHARE for c in costs]
    room = [0 if i in skip else max(0, cap - h) if cap is not None else budget
            for i, h in enumerate(have)]
    trials = [int(h) for h in have]
    left = max(0, int(budget))
    order = sorted(range(n), key=lambda i: (cheap[i], -costs[i], i))
    first: list[tuple[int, int]] = []
    for i in order:
        want = CHEAP_TRIALS if cheap[i] else per_iter
        t = min(want - trials[i], room[i], left) if trials[i] < want else 0
        if t > 0:
            first.append((i, t))
            trials[i] += t
            room[i] -= t
            left -= t
    units: list[list[int]] = [[] for _ in range(n)]
    for pool in ([i for i in order if not cheap[i]], order):
        while left > 0:
            open_ = [i for i in pool if room[i] > 0]
            if not open_:
                break
            i = max(open_, key=lambda j: (costs[j] / (trials[j] + per_iter), -j))
            t = min(per_iter, room[i], left)
            units[i].append(t)
            trials[i] += t
            room[i] -= t
            left -= t
    rounds = [first] if first else []
    for r in range(max((len(u) for u in units), default=0)):
        rounds.append([(i, units[i][r]) for i in order if len(units[i]) > r])
    return rounds


def _task_costs(extracted: Sequence[Any]) -> list[float]:
    """Estimated FLOPs x calls of each task (0 when TVM cannot estimate it)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    out = []
    for t in extracted:
        try:
            f = float(estimate_tir_flops(t.dispatched[0]))
        except Exception:  # noqa: BLE001 - unknown ops: treat as cheap
            f = 0.0
        out.append(max(f, 1.0) * float(t.weight))
    return out


def _worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()

    def emit(**kw: Any) -> None:
        kw.setdefault("elapsed_s", time.perf_counter() - t0)
        print(PROGRESS + json.dumps(kw), flush=True)

    emit(event="stage", what="loading TVM and the module")
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    cfg = TuneConfig.from_dict(spec["config"])
    db_dir = Path(spec["db_dir"])
    mod = tvm.ir.load_json(Path(spec["module"]).read_text())
    target = tvm.target.Target(spec["target"])
    emit(event="stage", what="extracting tuning tasks")
    extracted = untuned_tasks(ms.relax_integration.extract_tasks(mod, target))
    wanted = spec.get("tasks")
    if wanted:
        extracted = [t for t in extracted if any(w in t.task_name for w in wanted)]
        if not extracted:
            raise LprnetEdgeError(f"no tuning task matches {wanted}")
    database = open_database(db_dir)
    hashes = [int(tvm_ffi.structural_hash(t.dispatched[0])) for t in extracted]
    weights = [float(t.weight) for t in extracted]
    names = [t.task_name for t in extracted]
    costs = _task_costs(extracted)

    def per_task() -> tuple[list[int], list[float | None]]:
        counts = [0] * len(extracted)
        best: list[float | None] = [None] * len(extracted)
        index = {h: i for i, h in enumerate(hashes)}
        for rec in database.get_all_tuning_records():
            i = index.get(int(tvm_ffi.structural_hash(rec.workload.mod)))
            if i is None:
                continue
            counts[i] += 1
            secs = mean_run_secs(rec.run_secs)
            if secs is not None and (best[i] is None or secs < best[i]):
                best[i] = secs
        return counts, best

    def estimate(best: Sequence[float | None]) -> float | None:
        if any(b is None for b in best):
            return None
        return 1e3 * sum(w * b for w, b in zip(weights, best, strict=True))  # type: ignore[operator]

    counts, best0 = per_task()
    existing = sum(counts)
    est_before = estimate(best0)
    cap = cfg.trials_per_task
    budget = cfg.trials - existing
    scheduler = spec.get("scheduler") or "balanced"
    if scheduler == "balanced":
        rounds = plan_budget(costs, counts, max(budget, 0), cfg.num_trials_per_iter, cap)
    else:
        todo0 = [i for i in range(len(extracted)) if cap is None or counts[i] < cap]
        rounds = [[(i, budget) for i in todo0]] if todo0 and budget > 0 else []
    summary: dict[str, Any] = {
        "tasks": len(extracted), "records_before": existing, "est_ms_before": est_before,
        "scheduler": scheduler,
    }

    def finish(skipped: bool) -> int:
        counts, best = per_task()
        summary.update(skipped=skipped, trials_new=sum(counts) - existing,
                       tasks_tuned=sum(1 for c in counts if c > 0),
                       untuned=[n for n, c in zip(names, counts, strict=True) if c == 0],
                       tune_s=round(time.perf_counter() - t0, 1), records_total=sum(counts),
                       est_ms_after=estimate(best),
                       per_task=_task_table(names, weights, costs, counts, best))
        Path(spec["summary"]).write_text(json.dumps(summary))
        return 0

    if budget <= 0 or not rounds:
        emit(event="skip", existing=existing, trials=cfg.trials)
        return finish(True)
    planned = sum(t for r in rounds for _i, t in r)
    todo = sorted({i for r in rounds for i, _t in r})
    emit(event="start", tasks=len(extracted), tasks_to_tune=len(todo), budget=planned,
         existing=existing, db_dir=str(db_dir), rounds=len(rounds), scheduler=scheduler,
         cheap=sum(1 for c in costs if c / (sum(costs) or 1) < CHEAP_SHARE))
    tools = _measure_tools(ms, cfg, spec, emit)
    state = {"done": 0, "best": list(best0), "trials": [0] * len(extracted), "batches": 0,
             "ids": [], "t_tune": time.perf_counter(),
             "deadline": (time.monotonic() + float(spec["time_budget_s"])
                          if spec.get("time_budget_s") else None)}
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                 _progress_callback(ms, state, names, counts, planned, emit, estimate)]
    strategy: Any = "evolutionary"
    if spec.get("search"):
        strategy = ms.search_strategy.EvolutionarySearch(**spec["search"])
    nthreads = os.cpu_count() or 1
    exhausted: set[int] = set()
    for _attempt in range(3):
        _run_rounds(ms, extracted, rounds, state, cfg, scheduler, cap, tools, database,
                    callbacks, strategy, nthreads, db_dir, emit, planned)
        # Tasks with tiny search spaces (reshapes) measure fewer candidates than planned:
        # give what is left to the tasks that can still use it.
        counts_now, _ = per_task()
        left = cfg.trials - sum(counts_now)
        got = {i: state["trials"][i] for i in range(len(extracted))}
        short = {i for r in rounds for i, _t in r if got[i] < sum(
            t for rr in rounds for j, t in rr if j == i)}
        if scheduler != "balanced" or left < cfg.num_trials_per_iter or state.get("stopped"):
            break
        exhausted |= short
        rounds = plan_budget(costs, counts_now, left, cfg.num_trials_per_iter, cap,
                             skip=sorted(exhausted))
        if not rounds:
            break
        state["trials"] = [0] * len(extracted)
        planned = state["done"] + sum(t for r in rounds for _i, t in r)
        emit(event="stage", what=f"{left} trials left after exhausted search spaces: "
             f"{len(rounds)} more rounds")
    summary["stopped_by_time_budget"] = bool(state.get("stopped"))
    return finish(False)


def _run_rounds(ms: Any, extracted: Sequence[Any], rounds: list[list[tuple[int, int]]],
                state: dict[str, Any], cfg: TuneConfig, scheduler: str, cap: int | None,
                tools: dict[str, Any], database: Any, callbacks: list[Any], strategy: Any,
                nthreads: int, db_dir: Path, emit: Callable[..., None], planned: int) -> None:
    """One MetaSchedule run per (round, trials per task) group; records are saved per batch."""
    state["planned"] = planned
    deadline = state.get("deadline")
    for r, entries in enumerate(rounds):
        # balanced: one MetaSchedule run per task and round (a round-robin run over several
        # tasks cannot stop between them); the others: one run over all tasks.
        groups = ([([i], t) for i, t in entries] if scheduler == "balanced"
                  else [([i for i, _t in entries], entries[0][1])])
        for ids, t in groups:
            if deadline is not None and time.monotonic() > deadline:
                emit(event="stage", what="time budget spent: stopping before round "
                     f"{r + 1}/{len(rounds)} (records so far are kept)")
                state["stopped"] = True
                return
            if ids is groups[0][0]:
                emit(event="round", round=r + 1, rounds=len(rounds), tasks=len(entries),
                     trials=max(tt for _i, tt in entries), done=state["done"], budget=planned)
            contexts, ctx_weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [extracted[i] for i in ids], work_dir=str(db_dir), num_threads=nthreads,
                seed=cfg.seed + 7919 * r if cfg.seed is not None else None, strategy=strategy)
            state["ids"] = ids
            per_task_cap = t if scheduler == "balanced" else (cap if cap is not None else t)
            ms.tune_tasks(
                tasks=contexts, task_weights=ctx_weights, work_dir=str(db_dir),
                max_trials_global=t, max_trials_per_task=per_task_cap,
                num_trials_per_iter=min(cfg.num_trials_per_iter, per_task_cap),
                builder=tools["builder"], runner=tools["runner"], database=database,
                cost_model=tools["cost_model"], measure_callbacks=callbacks,
                task_scheduler="round-robin" if scheduler == "balanced" else scheduler)


def _progress_callback(ms: Any, state: dict[str, Any], names: list[str], counts: list[int],
                       planned: int, emit: Callable[..., None],
                       estimate: Callable[[Sequence[float | None]], float | None]) -> Any:
    """A MeasureCallback that reports every measured batch with the best latency and an ETA."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    crash_after = int(os.environ.get(CRASH_TEST_ENV) or 0)

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any,
                  builder_results: Any, runner_results: Any) -> None:
            i = state["ids"][task_id]
            if not runner_results:  # the task's search space is exhausted
                return
            state["done"] += len(runner_results)
            state["trials"][i] += len(runner_results)
            for br, rr in zip(builder_results, runner_results, strict=False):
                if br.error_msg is None and rr.error_msg is None:
                    secs = mean_run_secs(rr.run_secs)
                    if secs is not None and (state["best"][i] is None or secs < state["best"][i]):
                        state["best"][i] = secs
            b = state["best"][i]
            spent = time.perf_counter() - state["t_tune"]
            planned_now = state.get("planned", planned)
            eta = (spent / state["done"] * max(0, planned_now - state["done"])
                   if state["done"] else None)
            emit(event="batch", done=state["done"], budget=planned_now, task_index=i,
                 tasks=len(names), task=names[i], task_trials=counts[i] + state["trials"][i],
                 best_ms=None if b is None else b * 1e3, est_ms=estimate(state["best"]),
                 eta_s=eta)
            state["batches"] += 1
            if crash_after and state["batches"] >= crash_after:  # tests: a crash mid-tuning
                os.kill(os.getpid(), signal.SIGSEGV)

    return Progress()


class _PooledBuild:
    """``LocalBuilder.build`` with a worker pool kept for ``REUSE_BATCHES`` batches.

    MetaSchedule's LocalBuilder starts a new process pool for every batch (against a memory
    leak of long-lived workers), and each new worker imports TVM and its tensor intrinsics:
    10-20 s per batch on a busy 2-core machine, as long as the builds themselves. Recycling
    the pool every few batches keeps the leak bounded and pays the start-up less often.
    """

    REUSE_BATCHES = 8

    def __init__(self, builder: Any, f_export: Any) -> None:
        self.builder = builder
        # The Python callable itself: read back from the builder object it is an ffi.Function,
        # which the worker pool cannot serialize.
        self.f_export = f_export
        self.pool: Any = None
        self.uses = 0

    def __call__(self, build_inputs: Any) -> list[Any]:
        from tvm.s_tir.meta_schedule.builder import BuilderResult
        from tvm.s_tir.meta_schedule.builder import local_builder as lb
        from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

        b = self.builder
        if not build_inputs:
            return []
        if self.pool is None or self.uses >= self.REUSE_BATCHES:
            if self.pool is not None:
                self.pool.shutdown()
            self.pool = PopenPoolExecutor(max_workers=b.max_workers, timeout=b.timeout_sec,
                                          initializer=b.initializer)
            self.uses = 0
        self.uses += 1
        args = [(None, self.f_export, bi.mod, bi.target, lb._serialize_params(bi.params))
                for bi in build_inputs]
        results = []
        for res in self.pool.map_with_error_catching(lambda x: lb._worker_func(*x), args):
            if res.status == StatusKind.COMPLETE:
                results.append(BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(
                    None, f"LocalBuilder: Timeout, killed after {b.timeout_sec} seconds"))
                self.uses = self.REUSE_BATCHES  # a killed worker: start a fresh pool
            else:
                results.append(BuilderResult(
                    None, "LocalBuilder: An exception occurred\n" + str(res.value)))
        return results


def _measure_tools(ms: Any, cfg: TuneConfig, spec: dict[str, Any],
                   emit: Callable[..., None]) -> dict[str, Any]:
    """Builder, runner (local, RPC server or tracker) and one cost model shared by all rounds,
    wrapped so that builds and measurements show up in the progress as they start."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import PyBuilder
    from tvm.s_tir.meta_schedule.runner import PyRunner

    nthreads = os.cpu_count() or 1
    timeout = max(1, int(cfg.timeout_s))
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100,
                                          enable_cpu_cache_flush=False)
    export = spec.get("export_cc")
    f_export = (functools.partial(export_shared, export["path"], tuple(export["options"]))
                if export else None)
    builder = ms.builder.LocalBuilder(max_workers=nthreads, timeout_sec=timeout,
                                      f_export=f_export)
    if cfg.rpc or cfg.rpc_tracker:
        from lprnet_edge.compiler.rpc import direct_session, parse_hostport

        if cfg.rpc:
            host, port = parse_hostport(cfg.rpc, "--rpc")
            rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                             tracker_key="direct", session_timeout_sec=timeout)
            runner = ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator,
                                         f_create_session=direct_session)
        else:
            host, port = parse_hostport(cfg.rpc_tracker, "--rpc-tracker")  # type: ignore[arg-type]
            rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                             tracker_key=cfg.rpc_key,
                                             session_timeout_sec=timeout)
            runner = ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator)
    else:
        runner = ms.runner.LocalRunner(timeout_sec=timeout, evaluator_config=evaluator)

    pooled = _PooledBuild(builder, f_export)

    @derived_object
    class ShowBuilds(PyBuilder):
        def build(self, build_inputs: Any) -> Any:
            if build_inputs:
                emit(event="stage", what=f"building {len(build_inputs)} candidates")
            return pooled(build_inputs)

    @derived_object
    class ShowRuns(PyRunner):
        def run(self, runner_inputs: Any) -> Any:
            if runner_inputs:
                emit(event="stage", what=f"measuring {len(runner_inputs)} candidates")
            return runner.run(runner_inputs)

    return {"builder": ShowBuilds(), "runner": ShowRuns(),
            "cost_model": ms.cost_model.XGBModel(num_tuning_cores=nthreads, tree_method="auto")}


def _task_table(names: list[str], weights: list[float], costs: list[float], counts: list[int],
                best: list[float | None]) -> list[dict[str, Any]]:
    total = sum(costs) or 1.0
    return [{"task": n, "weight": w, "mflop": round(f / w / 1e6, 3),
             "cost_share": round(f / total, 4), "records": c,
             "best_ms": None if b is None else round(b * 1e3, 4)}
            for n, w, f, c, b in zip(names, weights, costs, counts, best, strict=True)]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m lprnet_edge.compiler.tune SPEC.json (internal: use "
              "`lprnet-edge tune`)",
              file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(_worker_main(sys.argv[1]))
    except LprnetEdgeError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
