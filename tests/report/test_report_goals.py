"""Goals given to the compression report as data: pure logic over report rows.

The rows are built here with the keys the report writes (:func:`report.variants.measure`,
:mod:`report.latency`); every expected figure is computed from those rows, none is copied
from a measurement. The goals are the repository's own file, as ``report --goals`` reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_user_error

from lprnet_edge.errors import LprnetEdgeError
from lprnet_edge.report.goals import (
    Goal,
    evaluate_goals,
    faster_goal,
    goals_from_dicts,
    load_goals,
    ratio_goal,
    smallest_fastest_goal,
)
from lprnet_edge.report.render import goal_lines

GOALS_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "compression-goals.toml"
GOALS = {g.name: g for g in load_goals(GOALS_FILE)}
INT8, CHANNELS = GOALS["int8_1.5x_faster_within_0.5pt"], GOALS["channels_2x_faster_within_1pt"]
EXEC_FLOPS = GOALS["flops_executed_4x_within_1pt"]
SMALLEST = GOALS["smallest_within_0.5pt_fastest_or_10pct"]
LATENCY_KEYS = (INT8.name, CHANNELS.name, SMALLEST.name)


def int8_goal(rows: list[dict], _base: dict) -> dict:
    return faster_goal(INT8, rows).to_dict()


def channel_speed_goal(rows: list[dict], _base: dict) -> dict:
    return faster_goal(CHANNELS, rows).to_dict()


def flops_goal(rows: list[dict]) -> dict:
    return ratio_goal(EXEC_FLOPS, rows).to_dict()

BASE_MS = 20.0
BASE_FLOPS = 300e6
BASE_EXEC = 150e6


def _row(name: str, change_pt: float, ms: float | None, stored: int, flops: float = BASE_FLOPS,
         executed: float = BASE_EXEC, backend: str = "tvm", profile: dict | None = None
         ) -> dict:
    r = {"name": name, "accuracy_change_points": change_pt, "test_accuracy": 0.9 + change_pt / 100,
         "stored_bytes": stored, "flops": flops, "flops_ratio": BASE_FLOPS / flops,
         "flops_executed": executed, "flops_executed_ratio": BASE_EXEC / executed,
         "latency_ms": ms, "latency_backend": backend, "latency_comparable": True}
    if profile is not None:
        r["latency_profile"] = profile
    return r


def _profile(kind: str) -> dict:
    rows = [{"name": "fused_conv2d_add_relu", "ms": 3.0, "share": 0.6, "calls": 1,
             "gflops": 2.5, "schedule": kind},
            {"name": "fused_max_pool", "ms": 2.0, "share": 0.4, "calls": 1, "gflops": None,
             "schedule": "default"}]
    return {"rows": rows, "kernels_ms": 5.0, "wall": {"median_ms": 5.1}, "runs": 10,
            "by_schedule": {kind: {"kernels": 1, "ms": 3.0, "share": 0.6},
                            "default": {"kernels": 1, "ms": 2.0, "share": 0.4}}}


def _rows(int8_speed: float, int8_pt: float, ch_speed: float, ch_pt: float) -> list[dict]:
    return [_row("original", 0.0, BASE_MS, 600_000),
            _row("int8w", 0.1, BASE_MS * 1.01, 160_000, executed=BASE_EXEC),
            _row("int8-sim", int8_pt, BASE_MS / int8_speed, 600_000, profile=_profile("naive")),
            _row("channels-b23x0.5+kd", ch_pt, BASE_MS / ch_speed, 300_000, flops=BASE_FLOPS / 3,
                 executed=BASE_EXEC / 2, profile=_profile("transferred")),
            _row("channels-tiny+kd", -3.0, BASE_MS / 5, 50_000, flops=BASE_FLOPS / 8,
                 executed=BASE_EXEC / 6)]


def test_int8_goal_met_and_missed_by_how_much():
    rows = _rows(1.6, -0.5, 2.0, -1.0)
    g = int8_goal(rows, rows[0])
    assert g["status"] == "met" and g["ratio"] == pytest.approx(1.6)
    assert g["points_margin"] == pytest.approx(0.0) and g["why"] is None  # 0.5 pt is within
    slow = BASE_MS / 1.2
    rows = _rows(1.2, -0.2, 2.0, -1.0)
    g = int8_goal(rows, rows[0])
    assert g["status"] == "missed" and g["margin"] == pytest.approx(1.2 - 1.5)
    need = BASE_MS / 1.5
    assert f"missed by {1.5 - 1.2:.2f}x" in g["detail"]
    assert f"needs <= {need:.2f} ms, {slow - need:.2f} ms slower" in g["detail"]
    assert "naive 60%" in g["why"] and "fused_conv2d_add_relu" in g["why"]  # from its profile
    rows = _rows(2.0, -0.6, 2.0, -1.0)  # fast enough, but past the accuracy budget
    g = int8_goal(rows, rows[0])
    assert g["status"] == "missed" and "0.1 pt past the 0.5 pt budget" in g["detail"]


def test_channel_goal_takes_the_fastest_within_budget():
    rows = _rows(1.6, 0.0, 2.4, -0.9)
    g = channel_speed_goal(rows, rows[0])
    # channels-tiny+kd is faster but 3 pt down: the goal is carried by the 2.4x variant.
    assert g["status"] == "met" and g["variant"] == "channels-b23x0.5+kd"
    assert g["ratio"] == pytest.approx(2.4) and "+0.40x over 2x" in g["detail"]
    rows = _rows(1.6, 0.0, 1.5, -0.9)
    g = channel_speed_goal(rows, rows[0])
    assert g["status"] == "missed" and f"missed by {2 - 1.5:.2f}x" in g["detail"]
    assert g["why"].startswith("channels-b23x0.5+kd kernel time by schedule: transferred 60%")
    rows = _rows(1.6, 0.0, 2.4, -1.5)
    g = channel_speed_goal(rows, rows[0])
    assert g["status"] == "missed" and "no channels-* variant within 1 pt" in g["detail"]


def test_flops_goal_uses_executed_flops():
    rows = _rows(1.6, 0.0, 2.0, -1.0)
    g = flops_goal(rows)
    # channels-tiny+kd has 6x fewer executed FLOPs but lost 3 pt; the 2x one is the best.
    assert g["status"] == "missed" and g["variant"] == "channels-b23x0.5+kd"
    assert g["ratio"] == pytest.approx(2.0) and "missed by 2.00x" in g["detail"]
    assert "3.00x fewer model FLOPs" in g["detail"]
    rows[4]["accuracy_change_points"] = -1.0
    g = flops_goal(rows)
    assert g["status"] == "met" and g["variant"] == "channels-tiny+kd"


def test_smallest_within_budget_vs_fastest():
    rows = _rows(1.6, -0.4, 2.0, -0.3)  # within 0.5 pt: original, int8w, int8-sim, channels
    g = smallest_fastest_goal(SMALLEST, rows).to_dict()
    # Smallest within 0.5 pt: int8w (160 kB) at 1.01x the original's time; fastest:
    # channels-b23x0.5+kd at half of it.
    over = (BASE_MS * 1.01) / (BASE_MS / 2.0) - 1
    assert g["variant"] == "int8w" and g["fastest"] == "channels-b23x0.5+kd"
    assert g["status"] == "missed" and g["ratio"] == pytest.approx(over)
    assert f"smallest is {over:.1%} slower" in g["detail"]
    rows[1]["latency_ms"] = BASE_MS / 2.0 * 1.10  # exactly 10% slower: within the slack
    g = smallest_fastest_goal(SMALLEST, rows).to_dict()
    assert g["status"] == "met"
    rows[1]["latency_ms"] = BASE_MS / 2.5  # the smallest is also the fastest
    g = smallest_fastest_goal(SMALLEST, rows).to_dict()
    assert g["status"] == "met" and "is also the fastest" in g["detail"]


def test_latency_goals_need_tvm_latency():
    rows = _rows(1.6, 0.0, 2.4, -0.5)
    for r in rows:
        r["latency_backend"] = "torch"
    g = evaluate_goals(tuple(GOALS.values()), rows)
    assert list(g) == list(GOALS)  # in the file's order
    for key in LATENCY_KEYS:
        assert g[key]["status"] == "not evaluated" and g[key]["detail"] == "needs --latency tvm"
    assert g[EXEC_FLOPS.name]["status"] == "missed"  # FLOPs need no latency
    lines = goal_lines(g)
    assert len(lines) == len(GOALS) and sum("not evaluated (needs --latency tvm)" in x
                                            for x in lines) == 3


def test_unequal_or_failed_rows_are_not_compared():
    rows = _rows(1.6, 0.0, 2.4, -0.5)
    rows[2]["latency_comparable"] = False
    rows[3]["latency_ms"] = None
    g = evaluate_goals((INT8, CHANNELS), rows)
    assert g[INT8.name]["status"] == "not evaluated"
    # The only timed channel-pruned variant is 3 pt down.
    assert g[CHANNELS.name]["status"] == "missed"
    lines = goal_lines(g)
    assert lines[0].startswith("- host int8 artifact >= 1.5x faster than fp32, <= 0.5 pt lost: "
                               "not evaluated (int8-sim has no comparable TVM latency")
    assert "**missed**: no channels-* variant within 1 pt" in lines[1]


def test_ratio_across_two_runs_says_so():
    """After ``--refresh-latency --variant int8-sim`` the int8 row and the original were
    timed in different runs: the goal still compares them, and says so."""
    rows = _rows(1.6, 0.0, 2.4, -0.5)
    for r in rows:
        r["latency_run"] = "2026-01-01 10:00 UTC"
    assert "different runs" not in int8_goal(rows, rows[0])["detail"]
    rows[2]["latency_run"] = "2026-01-01 12:00 UTC"
    g = int8_goal(rows, rows[0])
    assert g["status"] == "met" and ("[timed in different runs: original 2026-01-01 10:00 UTC, "
                                     "int8-sim 2026-01-01 12:00 UTC]") in g["detail"]


def test_goals_of_other_kinds_and_titles():
    """Size and model-FLOPs goals need no latency; a goal without a text gets a title that
    says what it checks."""
    rows = _rows(1.6, 0.0, 2.0, -0.4)
    for r in rows:
        r["compression_vs_fp32"] = 600_000 * 4 / r["stored_bytes"]
    g = evaluate_goals(goals_from_dicts([
        {"name": "size", "kind": "smaller", "factor": 8.0, "points": 0.5},
        {"name": "flops", "kind": "fewer_flops", "factor": 1.5, "points": 1.0}]), rows)
    best = max(rows[1:], key=lambda r: r["compression_vs_fp32"]
               if r["accuracy_change_points"] >= -0.5 else 0)
    assert g["size"]["variant"] == best["name"] and g["size"]["met"]
    assert g["size"]["margin"] == pytest.approx(best["compression_vs_fp32"] - 8.0)
    assert g["size"]["goal"] == ("a variant with >= 8x smaller stored weights than fp32, "
                                 "<= 0.5 pt lost")
    assert g["flops"]["variant"] == "channels-b23x0.5+kd" and g["flops"]["met"]


def test_goal_files_refuse_misspelled_keys(tmp_path):
    bad = tmp_path / "goals.toml"
    bad.write_text('[[goal]]\nname = "x"\nkind = "faster"\npoints = 1\nfactr = 2\n')
    with pytest.raises(LprnetEdgeError, match=r"unknown keys \['factr'\]"):
        load_goals(bad)
    with pytest.raises(LprnetEdgeError, match="unknown kind 'quicker'"):
        Goal("x", "quicker", 1.0)


def test_report_command_checks_its_goals_file(cli_runner, tmp_path):
    bad = tmp_path / "goals.toml"
    bad.write_text('[[goal]]\nname = "x"\nkind = "faster"\n')
    assert_user_error(cli_runner("report", "--goals", bad, "--out", tmp_path / "r"),
                      "missing keys ['points']")
