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

from lprnet_edge.compress.configs import TuneConfig
from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError

DB_FILES = ("database_workload.json", "database_tuning_record.json")
FAILED_SECS = 1e9  # MetaSchedule records failed candidates with run_secs = 1e10
PROGRESS = "@@lprnet-tune "  # prefix of the worker's progress lines (JSON follows)
# Tests only: the worker kills itself with SIGSEGV after this many measured batches.
CRASH_TEST_ENV = "LPRNET_EDGE_TUNE_CRASH_AFTER"
SCHEDULERS = ("gradient", "round-robin")

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
         timeout_s: float | None = None, scheduler: str = "gradient",
         search: dict[str, Any] | None = None, cc: Any = None) -> tuple[Any, dict[str, Any]]:
    """Tune ``mod`` (from ``compile.to_relax``) for ``target`` (a TargetSpec).

    Returns ``(database, summary)``; build with ``compile.build(mod, spec, ..., database=db)``.
    ``tasks``: only tune tasks whose name contains one of these strings (tests, debugging).
    ``prepared``: ``mod`` already went through ``compile.prepare_for_tuning``.
    ``timeout_s``: kill the worker after that long (records measured so far stay).
    ``scheduler``: MetaSchedule's ``"gradient"`` task scheduler (default: spends the budget
    where the estimated latency gains most) or ``"round-robin"``. MetaSchedule writes a
    batch's records when the scheduler *joins* it: round-robin joins every batch as soon as
    it is measured, gradient only after its first pass over all tasks (an interrupted first
    pass keeps nothing).
    ``search``: options of MetaSchedule's ``EvolutionarySearch`` (e.g. a smaller
    ``population_size`` for quick tests); default: MetaSchedule's defaults.
    ``cc``: the :class:`lprnet_edge.compiler.toolchain.Compiler` that links candidates measured on a
    device (default: the target's toolchain), so the device loads a ready ``.so`` and needs no
    compiler of its own (MetaSchedule's default ships ``.tar`` objects the device must link).
    Progress (one line per measured batch, with the best latency so far) goes to ``log``
    (default: stderr).
    """
    log = log or _eprint
    if scheduler not in SCHEDULERS:
        raise LprnetEdgeError(f"scheduler {scheduler!r}: use one of {list(SCHEDULERS)}")
    check_environment()
    if config.rpc or config.rpc_tracker:  # fail fast, before minutes of work
        from lprnet_edge.compiler.rpc import check_reachable

        log(f"checking the device ({config.rpc or config.rpc_tracker})...")
        check_reachable(config.rpc, config.rpc_tracker, config.rpc_key,
                        timeout=config.timeout_s)
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
                "search": dict(search or {}),
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
                         "scheduler": scheduler,
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
                f"({p['existing']} records already in {p['db_dir']})")
    if kind == "skip":
        return (f"tuning skipped: the database already has {p['existing']} records for this "
                f"model and target (budget {p['trials']}); reusing them")
    best = p.get("best_ms")
    est = p.get("est_ms")
    return (f"[{p['done']}/{p['budget']}] task {p['task_index'] + 1}/{p['tasks']} "
            f"{p['task']}: {p['task_trials']} trials, best "
            + (f"{best:.3f} ms" if best is not None else "-")
            + (f"; model estimate {est:.2f} ms" if est is not None else "")
            + f" ({p['elapsed_s']:.0f}s)")


def _log_summary(s: dict[str, Any], log: Callable[[str], None]) -> None:
    def ms(v: float | None) -> str:
        return f"{v:.2f} ms" if v is not None else "n/a"

    log(f"tuning summary: {s['tasks_tuned']}/{s['tasks']} tasks tuned, "
        f"{s['trials_new']} new trials ({s['records_total']} records in total), "
        f"{s['tune_s']:.0f}s; estimated latency {ms(s['est_ms_before'])} -> "
        f"{ms(s['est_ms_after'])}; database {s['db_dir']}")


# ---------------------------------------------------------------- the worker process


def _worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import tvm
    import tvm_ffi
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    cfg = TuneConfig.from_dict(spec["config"])
    db_dir = Path(spec["db_dir"])
    mod = tvm.ir.load_json(Path(spec["module"]).read_text())
    target = tvm.target.Target(spec["target"])
    t0 = time.perf_counter()

    def emit(**kw: Any) -> None:
        print(PROGRESS + json.dumps(kw), flush=True)

    extracted = ms.relax_integration.extract_tasks(mod, target)
    wanted = spec.get("tasks")
    if wanted:
        extracted = [t for t in extracted if any(w in t.task_name for w in wanted)]
        if not extracted:
            raise LprnetEdgeError(f"no tuning task matches {wanted}")
    database = open_database(db_dir)
    hashes = [int(tvm_ffi.structural_hash(t.dispatched[0])) for t in extracted]
    weights = [float(t.weight) for t in extracted]
    names = [t.task_name for t in extracted]

    def per_task() -> tuple[list[int], list[float | None]]:
        counts = [0] * len(extracted)
        best: list[float | None] = [None] * len(extracted)
        index = {h: i for i, h in enumerate(hashes)}
        for rec in database.get_all_tuning_records():
            i = index.get(int(tvm_ffi.structural_hash(rec.workload.mod)))
            if i is None:
                continue
            counts[i] += 1
            secs = _mean_secs(rec.run_secs)
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
    todo = [i for i in range(len(extracted)) if cap is None or counts[i] < cap]
    budget = cfg.trials - existing
    summary: dict[str, Any] = {
        "tasks": len(extracted), "records_before": existing, "est_ms_before": est_before,
    }
    if budget <= 0 or not todo:
        emit(event="skip", existing=existing, trials=cfg.trials)
        summary.update(skipped=True, tasks_tuned=0, trials_new=0, tune_s=0.0,
                       records_total=existing, est_ms_after=est_before,
                       per_task=_task_table(names, weights, counts, best0))
        Path(spec["summary"]).write_text(json.dumps(summary))
        return 0

    emit(event="start", tasks=len(extracted), tasks_to_tune=len(todo), budget=budget,
         existing=existing, db_dir=str(db_dir))
    nthreads = os.cpu_count() or 1
    strategy: Any = "evolutionary"
    if spec.get("search"):
        strategy = ms.search_strategy.EvolutionarySearch(**spec["search"])
    contexts, ctx_weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [extracted[i] for i in todo], work_dir=str(db_dir), num_threads=nthreads,
        seed=cfg.seed, strategy=strategy)
    state = {"done": 0, "best": list(best0), "trials": [0] * len(extracted), "batches": 0}
    crash_after = int(os.environ.get(CRASH_TEST_ENV) or 0)

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any,
                  builder_results: Any, runner_results: Any) -> None:
            i = todo[task_id]
            state["done"] += len(runner_results)
            state["trials"][i] += len(runner_results)
            for br, rr in zip(builder_results, runner_results, strict=False):
                if br.error_msg is None and rr.error_msg is None:
                    secs = _mean_secs(rr.run_secs)
                    if secs is not None and (state["best"][i] is None or secs < state["best"][i]):
                        state["best"][i] = secs
            b = state["best"][i]
            emit(event="batch", done=state["done"], budget=budget, task_index=todo.index(i),
                 tasks=len(todo), task=names[i], task_trials=counts[i] + state["trials"][i],
                 best_ms=None if b is None else b * 1e3, est_ms=estimate(state["best"]),
                 elapsed_s=time.perf_counter() - t0)
            state["batches"] += 1
            if crash_after and state["batches"] >= crash_after:  # tests: a crash mid-tuning
                os.kill(os.getpid(), signal.SIGSEGV)

    timeout = max(1, int(cfg.timeout_s))
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100,
                                          enable_cpu_cache_flush=False)
    export = spec.get("export_cc")
    builder = ms.builder.LocalBuilder(
        max_workers=nthreads, timeout_sec=timeout,
        f_export=functools.partial(export_shared, export["path"], tuple(export["options"]))
        if export else None)
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
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), Progress()]
    ms.tune_tasks(
        tasks=contexts, task_weights=ctx_weights, work_dir=str(db_dir),
        max_trials_global=budget, max_trials_per_task=cap if cap is not None else budget,
        num_trials_per_iter=cfg.num_trials_per_iter, builder=builder, runner=runner,
        database=database,
        cost_model=ms.cost_model.XGBModel(num_tuning_cores=nthreads, tree_method="auto"),
        measure_callbacks=callbacks, task_scheduler=spec.get("scheduler") or "gradient")
    counts, best = per_task()
    summary.update(skipped=False, tasks_tuned=len(todo), trials_new=sum(counts) - existing,
                   tune_s=round(time.perf_counter() - t0, 1), records_total=sum(counts),
                   est_ms_after=estimate(best),
                   per_task=_task_table(names, weights, counts, best))
    Path(spec["summary"]).write_text(json.dumps(summary))
    return 0


def _mean_secs(run_secs: Any) -> float | None:
    if run_secs is None:
        return None
    vals = [float(getattr(v, "value", v)) for v in run_secs]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    return None if m >= FAILED_SECS else m


def _task_table(names: list[str], weights: list[float], counts: list[int],
                best: list[float | None]) -> list[dict[str, Any]]:
    return [{"task": n, "weight": w, "records": c,
             "best_ms": None if b is None else round(b * 1e3, 4)}
            for n, w, c, b in zip(names, weights, counts, best, strict=True)]


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
