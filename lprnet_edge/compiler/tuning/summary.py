"""What a tuning run reports: the worker's progress lines and the run's summary.

The summary crosses modules (the CLI prints it, the build stores it in the manifest), so it
is a frozen dataclass; ``to_dict()`` is its JSON form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lprnet_edge.compiler.tuning.scheduler import CHEAP_TRIALS

PROGRESS = "@@lprnet-tune "  # prefix of the worker's progress lines (JSON follows)


@dataclass(frozen=True)
class TaskRow:
    """One tuning task: its calls per inference, size, share of the model's FLOPs, records
    and the fastest measured run time (ms, None: no valid record)."""

    task: str
    weight: float
    mflop: float
    cost_share: float
    records: int
    best_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_table(names: Sequence[str], weights: Sequence[float], costs: Sequence[float],
               counts: Sequence[int], best: Sequence[float | None]) -> tuple[TaskRow, ...]:
    """The tasks, the most expensive first (estimated time, else FLOPs x calls), so the rows
    that matter lead the table."""
    total = sum(costs) or 1.0
    rows = [TaskRow(task=n, weight=w, mflop=round(f / w / 1e6, 3), cost_share=round(f / total, 4),
                    records=c, best_ms=None if b is None else round(b * 1e3, 4))
            for n, w, f, c, b in zip(names, weights, costs, counts, best, strict=True)]
    return tuple(sorted(rows, key=lambda r: (-(r.best_ms or 0.0) * r.weight, -r.cost_share)))


@dataclass(frozen=True)
class Estimate:
    """The model's estimated latency: the sum of calls x fastest run time over the tasks
    that have one (``tasks`` of ``of``); None when no task has a measured time."""

    ms: float | None
    tasks: int
    of: int

    def text(self) -> str:
        if self.ms is None:
            return "n/a (no task has a measured schedule)"
        part = "" if self.tasks == self.of else f" over {self.tasks}/{self.of} tasks"
        return f"{self.ms:.2f} ms{part}"


def estimate(weights: Sequence[float], best: Sequence[float | None]) -> Estimate:
    known = [w * b for w, b in zip(weights, best, strict=True) if b is not None]
    return Estimate(ms=1e3 * sum(known) if known else None, tasks=len(known), of=len(best))


@dataclass(frozen=True)
class TuningSummary:
    """One tuning run: what the database held before and after, and how it was spent.

    The latency estimates count, per task, the faster of its records and the packaged
    default schedule measured on a comparable target (what a build applies)."""

    tasks: int
    records_before: int
    est_before: Estimate
    scheduler: str
    skipped: bool
    trials_new: int
    tasks_tuned: int
    untuned: tuple[str, ...]
    tune_s: float
    records_total: int
    est_after: Estimate
    per_task: tuple[TaskRow, ...]
    stopped_by_time_budget: bool = False
    wall_s: float = 0.0
    db_dir: str = ""
    budget: dict[str, Any] = field(default_factory=dict)
    runner: str = "local"
    estimated: str | None = None  # the estimate's label when no board measured the run

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks, "records_before": self.records_before,
            "est_ms_before": self.est_before.ms, "est_tasks_before": self.est_before.tasks,
            "scheduler": self.scheduler, "skipped": self.skipped,
            "trials_new": self.trials_new, "tasks_tuned": self.tasks_tuned,
            "untuned": list(self.untuned), "tune_s": self.tune_s,
            "records_total": self.records_total, "est_ms_after": self.est_after.ms,
            "est_tasks_after": self.est_after.tasks,
            "per_task": [r.to_dict() for r in self.per_task],
            "stopped_by_time_budget": self.stopped_by_time_budget, "wall_s": self.wall_s,
            "db_dir": self.db_dir, "budget": dict(self.budget), "runner": self.runner,
            "estimated": self.estimated,
        }

    @classmethod
    def from_worker(cls, d: dict[str, Any], **host: Any) -> TuningSummary:
        """The summary the worker wrote (JSON), completed with what the host side knows."""
        n = int(d["tasks"])
        return cls(
            tasks=n, records_before=d["records_before"],
            est_before=Estimate(d["est_ms_before"], d["est_tasks_before"], n),
            scheduler=d["scheduler"], skipped=d["skipped"], trials_new=d["trials_new"],
            tasks_tuned=d["tasks_tuned"], untuned=tuple(d["untuned"]), tune_s=d["tune_s"],
            records_total=d["records_total"],
            est_after=Estimate(d["est_ms_after"], d["est_tasks_after"], n),
            per_task=tuple(TaskRow(**r) for r in d["per_task"]),
            stopped_by_time_budget=bool(d.get("stopped_by_time_budget")), **host)

    def latency_words(self) -> str:
        """How the latency figures were obtained: the sum of measured task times, or of
        estimated cycles when no board took part."""
        if self.estimated:
            return f"model latency {self.estimated}, not measured on a board:"
        return "estimated latency"

    def lines(self) -> list[str]:
        """The summary as the tuner logs it."""
        out = [f"tuning summary: {self.tasks_tuned}/{self.tasks} tasks tuned, "
               f"{self.trials_new} new trials ({self.records_total} records in total), "
               f"{self.tune_s:.0f}s; {self.latency_words()} {self.est_before.text()} -> "
               f"{self.est_after.text()}; database {self.db_dir}"]
        if self.stopped_by_time_budget:
            out.append("  stopped by the time budget before the trial budget was spent")
        if self.untuned:
            out.append(f"  {len(self.untuned)} tasks have no record and keep default "
                       "schedules: " + ", ".join(self.untuned))
        return out


def log_summary(summary: TuningSummary, log: Callable[[str], None]) -> None:
    for line in summary.lines():
        log(line)


def format_progress(p: dict[str, Any]) -> str:
    """One progress event of the worker as a log line."""
    kind = p.get("event")
    if kind == "start":
        return (("" if not p.get("estimated") else f"[{p['estimated']}] ")
                + f"tuning {p['tasks_to_tune']} of {p['tasks']} tasks, {p['budget']} new trials "
                + (f"in {p['rounds']} rounds ({p['cheap']} cheap tasks get at most "
                   f"{CHEAP_TRIALS}) " if p.get("scheduler") == "balanced" else "")
                + f"({p['existing']} records already in {p['db_dir']})")
    if kind == "stage":
        return f"tuning: {p['what']}... ({p['elapsed_s']:.0f}s)"
    if kind == "round":
        return (f"round {p['round']}/{p['rounds']}: {p['tasks']} tasks, up to {p['trials']} "
                f"trials each [{p['done']}/{p['budget']} done] ({p['elapsed_s']:.0f}s)")
    if kind == "skip":
        return (f"tuning skipped: the database already has {p['existing']} records for this "
                f"model and target (budget {p['trials']}); reusing them")
    return _batch_line(p)


def _batch_line(p: dict[str, Any]) -> str:
    best, est = p.get("best_ms"), p.get("est_ms")
    return (f"[{p['done']}/{p['budget']}] task {p['task_index'] + 1}/{p['tasks']} "
            f"{p['task']}: {p['task_trials']} trials, best "
            + (f"{best:.3f} ms" if best is not None else "-")
            + (" estimated" if p.get("estimated") else "")
            + (f"; model estimate {est:.2f} ms" if est is not None else "")
            + f" ({p['elapsed_s']:.0f}s"
            + (f", ETA {duration(p['eta_s'])})" if p.get("eta_s") is not None else ")"))


def duration(secs: float) -> str:
    secs = int(round(secs))
    return f"{secs // 60}m{secs % 60:02d}s" if secs >= 60 else f"{secs}s"
