"""The budget plan: how trials are spread over the tuning tasks (no TVM needed)."""

from __future__ import annotations

from lprnet_edge.compiler.tuning.config import TuneConfig
from lprnet_edge.compiler.tuning.scheduler import (
    CHEAP_TRIALS,
    first_plan,
    plan_budget,
    planned_trials,
    short_tasks,
    task_costs,
)

# Shares like LPRNet's: four convolutions, three cheap kernels (pooling, means, reshapes).
COSTS = [40.0, 30.0, 20.0, 9.0, 0.5, 0.3, 0.2]


def _totals(rounds: list[list[tuple[int, int]]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in rounds:
        for i, t in r:
            out[i] = out.get(i, 0) + t
    return out


def test_plan_gives_every_task_a_first_round_before_any_second():
    rounds = plan_budget(COSTS, [0] * 7, 200, 16)
    first = dict(rounds[0])
    assert sorted(first) == list(range(7))
    assert [first[i] for i in range(4)] == [16] * 4
    assert [first[i] for i in range(4, 7)] == [CHEAP_TRIALS] * 3
    later = {i for r in rounds[1:] for i, _t in r}
    assert later <= {0, 1, 2, 3}  # cheap tasks get no second round
    tot = _totals(rounds)
    assert sum(tot.values()) == 200
    assert tot[0] >= tot[1] >= tot[2] >= tot[3]  # the rest follows FLOPs x calls


def test_plan_small_budget_tunes_the_heaviest_first():
    assert plan_budget(COSTS, [0] * 7, 40, 16) == [[(0, 16), (1, 16), (2, 8)]]


def test_plan_counts_existing_records_and_the_cap():
    have = [16, 16, 16, 16, 4, 4, 4]
    rounds = plan_budget(COSTS, have, 100, 16, cap=48)
    tot = _totals(rounds)
    assert all(have[i] + t <= 48 for i, t in tot.items())
    assert not any(i >= 4 for i in tot)  # first rounds already done: nothing for cheap ones
    assert sum(tot.values()) == 100
    assert plan_budget(COSTS, have, 0, 16) == []


def test_first_plan_of_metaschedule_schedulers_is_one_round_below_the_cap():
    cfg = TuneConfig(trials=64, trials_per_task=16)
    rounds = first_plan("gradient", COSTS, [16, 0, 0, 0, 0, 0, 0], 40, cfg)
    assert rounds == [[(i, 40) for i in range(1, 7)]]
    assert first_plan("round-robin", COSTS, [0] * 7, 0, cfg) == []
    assert first_plan("balanced", COSTS, [0] * 7, 40, TuneConfig()) == \
        plan_budget(COSTS, [0] * 7, 40, 16)


def test_short_tasks_are_those_that_measured_less_than_planned():
    rounds = [[(0, 16), (1, 16)], [(0, 16)]]
    assert planned_trials(rounds) == 48
    assert short_tasks(rounds, [32, 16, 0]) == set()
    assert short_tasks(rounds, [20, 16, 0]) == {0}


def test_task_costs_count_unknown_flops_as_cheap():
    assert task_costs([2e6, None], [3.0, 2.0]) == [6e6, 2.0]
