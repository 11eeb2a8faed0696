"""Goals a report is checked against: given as data (``report --goals FILE.toml``), evaluated
on the report's rows.

The package knows *kinds* of goal, never a work item's targets: those live in the file the
command is given (the repository's own is ``benchmarks/compression-goals.toml``). Every
figure comes from the rows, and each goal says met / missed *by how much*, or why it was not
evaluated. Latency goals compare TVM artifacts timed at one tuning budget (``--latency
tvm``); PyTorch eager latency says nothing about what the compiled artifacts do, so with it
they are "not evaluated".

Accuracy is the change on ``test/`` in points (1000 plates: 0.1 pt steps); "lost" is the
drop, clipped at 0 (a variant that gains accuracy lost nothing).
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lprnet_edge.runtime.errors import LprnetEdgeError

EPS = 1e-9  # accuracy changes are differences of floats: 0.5 pt must count as 0.5 pt

Row = dict[str, Any]

# kind -> (row key of the ratio against the first row, what the ratio says)
RATIO_KINDS = {"smaller": ("compression_vs_fp32", "smaller stored weights than fp32"),
               "fewer_flops": ("flops_ratio", "fewer model FLOPs"),
               "fewer_executed_flops": ("flops_executed_ratio", "fewer executed FLOPs")}
KINDS = ("faster", "smallest_is_fastest", *RATIO_KINDS)


@dataclass(frozen=True)
class Goal:
    """One goal. ``kind``: ``faster`` (the fastest matching variant within ``points`` is
    ``factor`` x faster than the first row), ``smaller`` / ``fewer_flops`` /
    ``fewer_executed_flops`` (a matching variant within ``points`` reaches ``factor``), or
    ``smallest_is_fastest`` (the smallest variant within ``points`` is the fastest of those,
    or at most ``slack`` slower). ``variants``: a name or glob (``channels-*``)."""

    name: str
    kind: str
    points: float
    factor: float = 1.0
    variants: str = "*"
    slack: float = 0.0
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LprnetEdgeError(f"goal {self.name!r}: unknown kind {self.kind!r}; use one "
                                  f"of {', '.join(KINDS)}")

    @property
    def title(self) -> str:
        if self.text:
            return self.text
        who = "a variant" if self.variants == "*" else f"`{self.variants}`"
        if self.kind == "faster":
            what = f"{who} >= {self.factor:g}x faster than the original"
        elif self.kind == "smallest_is_fastest":
            return (f"the smallest variant within {self.points:g} pt is the fastest of those "
                    f"or within {self.slack:.0%} of it")
        else:
            what = f"{who} with >= {self.factor:g}x {RATIO_KINDS[self.kind][1]}"
        return f"{what}, <= {self.points:g} pt lost"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GoalResult:
    """A goal's verdict: ``status`` is ``met``, ``missed`` or ``not evaluated``; ``detail``
    says by how much (or why not); ``why``: where a missed variant's kernel time goes."""

    goal: str
    status: str
    detail: str
    variant: str | None = None
    ratio: float | None = None
    margin: float | None = None  # ratio - factor (faster / smaller / fewer FLOPs)
    lost_points: float | None = None
    points_margin: float | None = None
    fastest: str | None = None
    why: str | None = None

    @property
    def met(self) -> bool:
        return self.status == "met"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def load_goals(path: str | Path) -> tuple[Goal, ...]:
    """The ``[[goal]]`` tables of a TOML file; a misspelled key is refused, not ignored."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise LprnetEdgeError(f"cannot read goals file {path}: {e}") from e
    return goals_from_dicts(data.get("goal", []), str(path))


def goals_from_dicts(items: list[dict[str, Any]], where: str = "goals") -> tuple[Goal, ...]:
    known = {f.name for f in fields(Goal)}
    out = []
    for i, item in enumerate(items):
        unknown = sorted(set(item) - known)
        missing = sorted({"name", "kind", "points"} - set(item))
        if unknown or missing:
            raise LprnetEdgeError(f"{where}: goal {i + 1}: "
                                  + (f"unknown keys {unknown} " if unknown else "")
                                  + (f"missing keys {missing} " if missing else "")
                                  + f"(keys: {', '.join(sorted(known))})")
        out.append(Goal(**item))
    return tuple(out)


def _lost(r: Row) -> float:
    return max(0.0, -float(r["accuracy_change_points"]))


def _within(r: Row, pts: float) -> bool:
    return _lost(r) <= pts + EPS


def _timed(r: Row) -> bool:
    """A TVM latency that may be compared (same budget as the others: see budget_check)."""
    return (r.get("latency_ms") is not None
            and str(r.get("latency_backend", "")).startswith("tvm")
            and r.get("latency_comparable") is not False)


def _acc(r: Row) -> str:
    return f"{r['accuracy_change_points']:+.1f} pt"


def _runs_note(*rows: Row) -> str:
    """A warning when the rows were timed in different runs (a ``--refresh-latency
    --variant``): their ratio then also compares the host's load at two times."""
    runs = {r.get("latency_run") for r in rows}
    return "" if len(runs) <= 1 else (" [timed in different runs: "
                                      + ", ".join(f"{r['name']} {r.get('latency_run') or '?'}"
                                                  for r in rows) + "]")


def profile_note(r: Row) -> str | None:
    """Where the variant's kernel time goes by schedule kind, and its slowest kernel (from the
    compact profile of :func:`lprnet_edge.report.latency.compact_profile`)."""
    prof = r.get("latency_profile") or {}
    kinds = prof.get("by_schedule") or {}
    rows = prof.get("rows") or []
    if not kinds or not rows:
        return None
    shares = ", ".join(f"{k} {v['share']:.0%}" for k, v in
                       sorted(kinds.items(), key=lambda kv: -kv[1]["ms"]))
    top = rows[0]
    gf = f", {top['gflops']:.1f} GFLOP/s" if top.get("gflops") else ""
    return (f"{r['name']} kernel time by schedule: {shares}; slowest kernel {top['name']} "
            f"{top['ms']:.2f} ms ({top['share']:.0%}, {top['schedule']}{gf})")


def _matching(goal: Goal, rows: list[Row]) -> list[Row]:
    return [r for r in rows[1:] if fnmatch.fnmatchcase(r["name"], goal.variants)]


def _not_evaluated(goal: Goal, reason: str) -> GoalResult:
    return GoalResult(goal.title, "not evaluated", reason)


def faster_goal(goal: Goal, rows: list[Row]) -> GoalResult:
    """The fastest matching variant within ``points`` against the first row (the original)."""
    base, pts, speed = rows[0], goal.points, goal.factor
    cands = _matching(goal, rows)
    if not cands:
        return _not_evaluated(goal, f"no variant matches {goal.variants!r}")
    timed = [r for r in cands if _timed(r)]
    if not timed:
        errs = [f"{r['name']}: {r['latency_error']}" for r in cands if r.get("latency_error")]
        return _not_evaluated(goal, f"{', '.join(r['name'] for r in cands)} has no comparable "
                              "TVM latency" + (f" ({'; '.join(errs)})" if errs else ""))
    ok = [r for r in timed if _within(r, pts)]
    if not ok:
        best = max(timed, key=lambda x: x["test_accuracy"])
        lost = _lost(best)
        return GoalResult(goal.title, "missed", f"no {goal.variants} variant within {pts:g} "
                          f"pt (most accurate: {best['name']} {_acc(best)}, {lost - pts:.1f} "
                          f"pt past the {pts:g} pt budget)", variant=best["name"],
                          ratio=float(base["latency_ms"]) / float(best["latency_ms"]),
                          lost_points=lost, points_margin=pts - lost)
    r = max(ok, key=lambda x: float(base["latency_ms"]) / float(x["latency_ms"]))
    s, lost = float(base["latency_ms"]) / float(r["latency_ms"]), _lost(r)
    met = s >= speed
    need_ms = float(base["latency_ms"]) / speed
    detail = (f"{r['name']} {r['latency_ms']:.2f} ms vs {base['latency_ms']:.2f} ms: "
              f"{s:.2f}x faster"
              + (f" ({s - speed:+.2f}x over {speed:g}x)" if met else
                 f", missed by {speed - s:.2f}x (needs <= {need_ms:.2f} ms, "
                 f"{float(r['latency_ms']) - need_ms:.2f} ms slower)")
              + f"; accuracy {_acc(r)} (within {pts:g} pt by {pts - lost:.1f} pt)"
              + _runs_note(base, r))
    return GoalResult(goal.title, "met" if met else "missed", detail, variant=r["name"],
                      ratio=s, margin=s - speed, lost_points=lost, points_margin=pts - lost,
                      why=None if met else profile_note(r))


def ratio_goal(goal: Goal, rows: list[Row]) -> GoalResult:
    """The matching variant within ``points`` with the largest ratio (size, FLOPs) against
    the first row; needs no latency, so it is evaluated with either backend."""
    key, what = RATIO_KINDS[goal.kind]
    pts, factor = goal.points, goal.factor
    ok = [x for x in _matching(goal, rows) if _within(x, pts) and x.get(key)]
    if not ok:
        return _not_evaluated(goal, f"no {goal.variants} variant within {pts:g} pt")
    r = max(ok, key=lambda x: float(x[key]))
    f = float(r[key])
    met = f >= factor
    extra = (f" ({r['flops_ratio']:.2f}x fewer model FLOPs)"
             if key == "flops_executed_ratio" and r.get("flops_ratio") else "")
    detail = (f"best within {pts:g} pt: {r['name']} {f:.2f}x {what}{extra}, {_acc(r)}"
              + (f", {f - factor:+.2f}x over {factor:g}x" if met
                 else f", missed by {factor - f:.2f}x"))
    return GoalResult(goal.title, "met" if met else "missed", detail, variant=r["name"],
                      ratio=f, margin=f - factor, lost_points=_lost(r),
                      points_margin=pts - _lost(r))


def smallest_fastest_goal(goal: Goal, rows: list[Row]) -> GoalResult:
    """The smallest (stored bytes) variant within ``points`` is the fastest of those within
    ``points``, or at most ``slack`` slower than it."""
    pts, slack = goal.points, goal.slack
    ok = [x for x in rows if _within(x, pts) and fnmatch.fnmatchcase(x["name"], goal.variants)]
    if not ok:
        return _not_evaluated(goal, f"no variant within {pts:g} pt")
    small = min(ok, key=lambda x: x["stored_bytes"])
    timed = [x for x in ok if _timed(x)]
    if not _timed(small) or not timed:
        return _not_evaluated(goal, f"{small['name']} (smallest within {pts:g} pt) has no "
                              "comparable TVM latency")
    fast = min(timed, key=lambda x: x["latency_ms"])
    over = float(small["latency_ms"]) / float(fast["latency_ms"]) - 1.0
    met = over <= slack + EPS
    if small is fast:
        detail = (f"{small['name']} ({small['stored_bytes'] / 1e3:.0f} kB, {_acc(small)}) is "
                  f"also the fastest within {pts:g} pt ({small['latency_ms']:.2f} ms)")
    else:
        detail = (f"smallest: {small['name']} ({small['stored_bytes'] / 1e3:.0f} kB, "
                  f"{_acc(small)}) {small['latency_ms']:.2f} ms; fastest: {fast['name']} "
                  f"({fast['stored_bytes'] / 1e3:.0f} kB) {fast['latency_ms']:.2f} ms; "
                  f"smallest is {over:.1%} slower"
                  + (f" (within {slack:.0%})" if met else
                     f", missed by {over - slack:.1%} points of the {slack:.0%} slack"))
    detail += _runs_note(small, fast)
    return GoalResult(goal.title, "met" if met else "missed", detail, variant=small["name"],
                      ratio=over, margin=slack - over, fastest=fast["name"],
                      lost_points=_lost(small), why=None if met else profile_note(small))


def evaluate_goals(goals: tuple[Goal, ...] | list[Goal], rows: list[Row]
                   ) -> dict[str, dict[str, Any]]:
    """Every goal on the rows (the first row is the original), keyed by goal name in the
    given order; latency goals are "not evaluated" without comparable TVM latencies."""
    out: dict[str, dict[str, Any]] = {}
    base = rows[0] if rows else None
    for goal in goals:
        if base is None:
            res = _not_evaluated(goal, "no rows")
        elif goal.kind in RATIO_KINDS:
            res = ratio_goal(goal, rows)
        elif not _timed(base):
            res = _not_evaluated(goal, "needs --latency tvm" if not str(
                base.get("latency_backend", "")).startswith("tvm")
                else "the original has no comparable TVM latency")
        elif goal.kind == "faster":
            res = faster_goal(goal, rows)
        else:
            res = smallest_fastest_goal(goal, rows)
        out[goal.name] = res.to_dict()
    return out
