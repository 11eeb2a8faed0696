"""How a trial budget is spread over the tuning tasks, as rounds of ``(task, new trials)``.

Records already in the database count: tuning again with the same budget measures nothing, a
larger budget tunes only the difference, and tasks that have ``trials_per_task`` records are
skipped. Nothing here needs TVM; the worker runs the rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

from lprnet_edge.compiler.tuning.config import TuneConfig
from lprnet_edge.runtime.errors import LprnetEdgeError

Rounds = list[list[tuple[int, int]]]

SCHEDULERS = ("balanced", "gradient", "round-robin")
# "balanced" (lprnet-edge's own plan, see plan_budget): a task whose share of the model's
# estimated FLOPs is below CHEAP_SHARE is "cheap" (pooling, means, reshapes) and gets at most
# CHEAP_TRIALS measured candidates; every task gets its first round before any gets a second.
CHEAP_SHARE = 0.01
CHEAP_TRIALS = 4
# A tuning run with TuneConfig's default trial budget also stops starting new rounds after
# this long, so a plain `build --tune` ends within half an hour even on a busy machine.
DEFAULT_TIME_BUDGET_S = 25 * 60


def check_scheduler(scheduler: str) -> None:
    if scheduler not in SCHEDULERS:
        raise LprnetEdgeError(f"scheduler {scheduler!r}: use one of {list(SCHEDULERS)}")


def time_budget(config: TuneConfig, time_budget_s: float | None) -> float | None:
    """The given time budget, else ``DEFAULT_TIME_BUDGET_S`` for the default trial budget
    (a plain ``build --tune`` must end), else none."""
    if time_budget_s is None and config.trials == TuneConfig().trials:
        return DEFAULT_TIME_BUDGET_S
    return time_budget_s


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


def first_plan(scheduler: str, costs: Sequence[float], counts: Sequence[int], budget: int,
               cfg: TuneConfig) -> Rounds:
    """The rounds of a run: :func:`plan_budget` for "balanced"; MetaSchedule's own
    schedulers get one round over every task below the cap, with the whole budget."""
    cap = cfg.trials_per_task
    if scheduler == "balanced":
        return plan_budget(costs, counts, max(budget, 0), cfg.num_trials_per_iter, cap)
    todo = [i for i in range(len(costs)) if cap is None or counts[i] < cap]
    return [[(i, budget) for i in todo]] if todo and budget > 0 else []


def short_tasks(rounds: Rounds, got: Sequence[int]) -> set[int]:
    """Tasks that measured fewer candidates than planned: their search space is exhausted."""
    planned: dict[int, int] = {}
    for r in rounds:
        for i, t in r:
            planned[i] = planned.get(i, 0) + t
    return {i for i, t in planned.items() if got[i] < t}


def planned_trials(rounds: Rounds) -> int:
    return sum(t for r in rounds for _i, t in r)


def task_costs(flops: Sequence[float | None], weights: Sequence[float]) -> list[float]:
    """Estimated FLOPs x calls of each task (a task TVM cannot estimate counts as cheap)."""
    return [max(f or 0.0, 1.0) * w for f, w in zip(flops, weights, strict=True)]
