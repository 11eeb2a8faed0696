"""The tuning worker: MetaSchedule in a process of its own
(``python -m lprnet_edge.compiler.tuning.worker SPEC.json``, in its own process group).

Records are appended to the database as they are measured, so a crash, a kill or Ctrl-C loses
at most the batch in flight. The worker talks to :mod:`lprnet_edge.compiler.tuning.launcher`
through progress lines on stdout (``PROGRESS`` + JSON) and the summary file the spec names.

TVM is imported inside :func:`load`, after the first progress line: loading it takes seconds
and the user should see why.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lprnet_edge.compiler.dot import kernel_kind
from lprnet_edge.compiler.schedules import (
    comparable,
    mean_run_secs,
    packaged_defaults,
    target_cpu,
)
from lprnet_edge.compiler.tuning import scheduler as sch
from lprnet_edge.compiler.tuning.config import TuneConfig
from lprnet_edge.compiler.tuning.database import open_database
from lprnet_edge.compiler.tuning.estimate_runner import EstimateSpec
from lprnet_edge.compiler.tuning.measure import MeasureTools, measure_tools
from lprnet_edge.compiler.tuning.summary import PROGRESS, Estimate, estimate, task_table
from lprnet_edge.runtime.errors import LprnetEdgeError

# Tests only: the worker kills itself with SIGSEGV after this many measured batches.
CRASH_TEST_ENV = "LPRNET_EDGE_TUNE_CRASH_AFTER"


@dataclass
class WorkerState:
    """What the worker knows: its tasks, the database, and the progress of the run."""

    spec: dict[str, Any]
    cfg: TuneConfig
    db_dir: Path
    database: Any
    extracted: list[Any]
    names: list[str]
    weights: list[float]
    costs: list[float]
    hashes: list[int]
    # Per task, the packaged default's run time when measured on a comparable target.
    defaults: list[float | None]
    t0: float
    scheduler: str = "balanced"
    existing: int = 0
    counts0: list[int] = field(default_factory=list)
    best: list[float | None] = field(default_factory=list)
    trials: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    done: int = 0
    batches: int = 0
    planned: int = 0
    t_tune: float = 0.0
    deadline: float | None = None
    stopped: bool = False

    @property
    def estimated(self) -> str | None:
        """The estimate's label when candidates are estimated, not measured."""
        est = self.spec.get("estimate")
        return EstimateSpec.from_dict(est).label() if est else None

    def emit(self, **kw: Any) -> None:
        """One progress line for the launcher."""
        kw.setdefault("elapsed_s", time.perf_counter() - self.t0)
        print(PROGRESS + json.dumps(kw), flush=True)

    def estimate(self, best: Sequence[float | None]) -> Estimate:
        """The model's estimate with, per task, the faster of ``best`` and its default."""
        merged = [d if b is None else b if d is None else min(b, d)
                  for b, d in zip(best, self.defaults, strict=True)]
        return estimate(self.weights, merged)


def untuned_tasks(tasks: list[Any]) -> list[Any]:
    """The tasks worth tuning: not the dot-product convolutions, whose hand-written
    tensorized schedule (``compiler.dot.schedule``) the build always applies."""
    return [t for t in tasks
            if kernel_kind(next(iter(t.dispatched[0].functions.values()))) is None]


def _emit_early(t0: float, what: str) -> None:
    kw = {"event": "stage", "what": what, "elapsed_s": time.perf_counter() - t0}
    print(PROGRESS + json.dumps(kw), flush=True)


def load(spec: dict[str, Any], t0: float) -> WorkerState:
    """TVM, the prepared module and its tuning tasks (those the spec asks for)."""
    _emit_early(t0, "loading TVM and the module")
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    mod = tvm.ir.load_json(Path(spec["module"]).read_text())
    target = tvm.target.Target(spec["target"])
    _emit_early(t0, "extracting tuning tasks")
    extracted = untuned_tasks(ms.relax_integration.extract_tasks(mod, target))
    if wanted := spec.get("tasks"):
        extracted = [t for t in extracted if any(w in t.task_name for w in wanted)]
        if not extracted:
            raise LprnetEdgeError(f"no tuning task matches {wanted}")
    hashes = [int(tvm_ffi.structural_hash(t.dispatched[0])) for t in extracted]
    weights = [float(t.weight) for t in extracted]
    flops: list[float | None] = []
    for t in extracted:
        try:
            flops.append(float(estimate_tir_flops(t.dispatched[0])))
        except Exception:  # noqa: BLE001 - unknown ops: treated as cheap
            flops.append(None)
    # The defaults the build will weigh this tuning's records against (compile.build).
    packaged = packaged_defaults(target_cpu(target)).comparable_with(
        spec.get("estimate") is not None)
    defaults = [mean_run_secs(r.run_secs) if (r := packaged.get(h)) is not None
                and comparable(target, r.target) else None for h in hashes]
    return WorkerState(
        spec=spec, cfg=TuneConfig.from_dict(spec["config"]), db_dir=Path(spec["db_dir"]),
        database=open_database(spec["db_dir"]), extracted=extracted,
        names=[t.task_name for t in extracted], weights=weights,
        costs=sch.task_costs(flops, weights), hashes=hashes, defaults=defaults, t0=t0,
        scheduler=spec.get("scheduler") or "balanced")


def per_task(state: WorkerState) -> tuple[list[int], list[float | None]]:
    """Records per task in the database and the fastest valid run time of each (s)."""
    import tvm_ffi

    counts = [0] * len(state.extracted)
    best: list[float | None] = [None] * len(state.extracted)
    index = {h: i for i, h in enumerate(state.hashes)}
    for rec in state.database.get_all_tuning_records():
        i = index.get(int(tvm_ffi.structural_hash(rec.workload.mod)))
        if i is None:
            continue
        counts[i] += 1
        secs = mean_run_secs(rec.run_secs)
        if secs is not None and (best[i] is None or secs < best[i]):
            best[i] = secs
    return counts, best


def write_summary(state: WorkerState, skipped: bool, est_before: Estimate) -> int:
    """The summary file the launcher reads (what the database holds now)."""
    counts, best = per_task(state)
    est_after = state.estimate(best)
    summary = {
        "tasks": len(state.extracted), "records_before": state.existing,
        "est_ms_before": est_before.ms, "est_tasks_before": est_before.tasks,
        "scheduler": state.scheduler, "skipped": skipped,
        "trials_new": sum(counts) - state.existing,
        "tasks_tuned": sum(1 for c in counts if c > 0),
        "untuned": [n for n, c in zip(state.names, counts, strict=True) if c == 0],
        "tune_s": round(time.perf_counter() - state.t0, 1), "records_total": sum(counts),
        "est_ms_after": est_after.ms, "est_tasks_after": est_after.tasks,
        "per_task": [r.to_dict() for r in task_table(state.names, state.weights, state.costs,
                                                     counts, best)],
        "stopped_by_time_budget": state.stopped,
    }
    Path(state.spec["summary"]).write_text(json.dumps(summary))
    return 0


def progress_callback(state: WorkerState) -> Any:
    """A MeasureCallback that reports every measured batch with the best latency and an ETA."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    crash_after = int(os.environ.get(CRASH_TEST_ENV) or 0)

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any,
                  builder_results: Any, runner_results: Any) -> None:
            if not runner_results:  # the task's search space is exhausted
                return
            i = state.ids[task_id]
            record_batch(state, i, builder_results, runner_results)
            if crash_after and state.batches >= crash_after:  # tests: a crash mid-tuning
                os.kill(os.getpid(), signal.SIGSEGV)

    return Progress()


def record_batch(state: WorkerState, i: int, builder_results: Any, runner_results: Any) -> None:
    """Count a measured batch of task ``i``, keep its best time, and report it."""
    state.done += len(runner_results)
    state.trials[i] += len(runner_results)
    for br, rr in zip(builder_results, runner_results, strict=False):
        if br.error_msg is None and rr.error_msg is None:
            secs = mean_run_secs(rr.run_secs)
            if secs is not None and (state.best[i] is None or secs < state.best[i]):
                state.best[i] = secs
    b = state.best[i]
    spent = time.perf_counter() - state.t_tune
    eta = spent / state.done * max(0, state.planned - state.done) if state.done else None
    est = state.estimate(state.best)
    state.emit(event="batch", done=state.done, budget=state.planned, task_index=i,
               tasks=len(state.names), task=state.names[i],
               task_trials=state.counts0[i] + state.trials[i],
               best_ms=None if b is None else b * 1e3,
               est_ms=est.ms if est.tasks == est.of else None, eta_s=eta,
               estimated=state.estimated)
    state.batches += 1


def run_rounds(state: WorkerState, rounds: sch.Rounds, tools: MeasureTools, callbacks: list[Any],
               strategy: Any) -> None:
    """One MetaSchedule run per (round, trials per task) group; records are saved per batch.

    balanced: one run per task and round (a round-robin run over several tasks cannot stop
    between them); the other schedulers: one run over all tasks."""
    from tvm.s_tir import meta_schedule as ms

    balanced = state.scheduler == "balanced"
    for r, entries in enumerate(rounds):
        groups = ([([i], t) for i, t in entries] if balanced
                  else [([i for i, _t in entries], entries[0][1])])
        for ids, t in groups:
            if state.deadline is not None and time.monotonic() > state.deadline:
                state.emit(event="stage", what="time budget spent: stopping before round "
                           f"{r + 1}/{len(rounds)} (records so far are kept)")
                state.stopped = True
                return
            if ids is groups[0][0]:
                state.emit(event="round", round=r + 1, rounds=len(rounds), tasks=len(entries),
                           trials=max(tt for _i, tt in entries), done=state.done,
                           budget=state.planned)
            state.ids = ids
            _tune_group(ms, state, ids, t, r, tools, callbacks, strategy)


def _tune_group(ms: Any, state: WorkerState, ids: list[int], trials: int, r: int,
                tools: MeasureTools, callbacks: list[Any], strategy: Any) -> None:
    cfg, cap = state.cfg, state.cfg.trials_per_task
    balanced = state.scheduler == "balanced"
    contexts, ctx_weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [state.extracted[i] for i in ids], work_dir=str(state.db_dir),
        num_threads=os.cpu_count() or 1,
        seed=cfg.seed + 7919 * r if cfg.seed is not None else None, strategy=strategy)
    per_task_cap = trials if balanced else (cap if cap is not None else trials)
    ms.tune_tasks(
        tasks=contexts, task_weights=ctx_weights, work_dir=str(state.db_dir),
        max_trials_global=trials, max_trials_per_task=per_task_cap,
        num_trials_per_iter=min(cfg.num_trials_per_iter, per_task_cap),
        builder=tools.builder, runner=tools.runner, database=state.database,
        cost_model=tools.cost_model, measure_callbacks=callbacks,
        task_scheduler="round-robin" if balanced else state.scheduler)


def spend_budget(state: WorkerState, rounds: sch.Rounds) -> None:
    """Run the rounds; tasks with tiny search spaces (reshapes) measure fewer candidates than
    planned, so what they leave goes to the tasks that can still use it (twice at most)."""
    from tvm.s_tir import meta_schedule as ms

    cfg = state.cfg
    tools = measure_tools(ms, cfg, state.spec.get("export_cc"), state.emit,
                          state.spec.get("estimate"))
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                 progress_callback(state)]
    strategy: Any = "evolutionary"
    if state.spec.get("search"):
        strategy = ms.search_strategy.EvolutionarySearch(**state.spec["search"])
    exhausted: set[int] = set()
    for _attempt in range(3):
        run_rounds(state, rounds, tools, callbacks, strategy)
        counts_now, _ = per_task(state)
        left = cfg.trials - sum(counts_now)
        if (state.scheduler != "balanced" or left < cfg.num_trials_per_iter
                or state.stopped):
            return
        exhausted |= sch.short_tasks(rounds, state.trials)
        rounds = sch.plan_budget(state.costs, counts_now, left, cfg.num_trials_per_iter,
                                 cfg.trials_per_task, skip=sorted(exhausted))
        if not rounds:
            return
        state.trials = [0] * len(state.extracted)
        state.planned = state.done + sch.planned_trials(rounds)
        state.emit(event="stage", what=f"{left} trials left after exhausted search spaces: "
                   f"{len(rounds)} more rounds")


def main(spec_path: str) -> int:
    """Tune what the spec says into its database and write the summary; 0 on success."""
    t0 = time.perf_counter()
    state = load(json.loads(Path(spec_path).read_text()), t0)
    cfg = state.cfg
    state.counts0, best0 = per_task(state)
    state.existing = sum(state.counts0)
    est_before = state.estimate(best0)
    budget = cfg.trials - state.existing
    rounds = sch.first_plan(state.scheduler, state.costs, state.counts0, budget, cfg)
    if budget <= 0 or not rounds:
        state.emit(event="skip", existing=state.existing, trials=cfg.trials)
        return write_summary(state, True, est_before)
    state.planned = sch.planned_trials(rounds)
    total = sum(state.costs) or 1
    state.emit(event="start", tasks=len(state.extracted),
               tasks_to_tune=len({i for r in rounds for i, _t in r}), budget=state.planned,
               existing=state.existing, db_dir=str(state.db_dir), rounds=len(rounds),
               scheduler=state.scheduler, estimated=state.estimated,
               cheap=sum(1 for c in state.costs if c / total < sch.CHEAP_SHARE))
    state.best, state.trials = list(best0), [0] * len(state.extracted)
    state.t_tune = time.perf_counter()
    if state.spec.get("time_budget_s"):
        state.deadline = time.monotonic() + float(state.spec["time_budget_s"])
    spend_budget(state, rounds)
    return write_summary(state, False, est_before)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m lprnet_edge.compiler.tuning.worker SPEC.json (internal: use "
              "`lprnet-edge tune`)", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(main(sys.argv[1]))
    except LprnetEdgeError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
