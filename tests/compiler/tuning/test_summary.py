"""What a tuning run reports: the task table, the latency estimate, the summary's JSON form."""

from __future__ import annotations

from lprnet_edge.compiler.tuning.summary import (
    Estimate,
    TuningSummary,
    estimate,
    format_progress,
    task_table,
)


def test_task_table_is_sorted_by_estimated_time():
    rows = task_table(["pool", "conv_a", "conv_b", "reshape"], [1.0, 2.0, 1.0, 3.0],
                      [1e3, 4e8, 3e8, 1e2], [4, 16, 16, 0], [1e-5, 2e-4, 5e-4, None])
    # conv_a: 2 calls x 0.2 ms = 0.4 ms; conv_b: 0.5 ms; pool 0.01 ms; reshape: no time.
    assert [r.task for r in rows] == ["conv_b", "conv_a", "pool", "reshape"]
    assert rows[0].best_ms == 0.5 and rows[-1].best_ms is None


def test_estimate_says_which_tasks_it_covers():
    assert estimate([2.0, 1.0], [None, None]).text() == "n/a (no task has a measured schedule)"
    part = estimate([2.0, 1.0], [1e-3, None])
    assert (part.ms, part.tasks, part.of) == (2.0, 1, 2)
    assert part.text() == "2.00 ms over 1/2 tasks"
    assert estimate([2.0, 1.0], [1e-3, 5e-4]).text() == "2.50 ms"


def test_summary_round_trips_through_the_worker_json():
    rows = task_table(["conv"], [2.0], [4e8], [8], [2e-4])
    worker = {"tasks": 1, "records_before": 0, "est_ms_before": None, "est_tasks_before": 0,
              "scheduler": "balanced", "skipped": False, "trials_new": 8, "tasks_tuned": 1,
              "untuned": [], "tune_s": 12.0, "records_total": 8, "est_ms_after": 0.4,
              "est_tasks_after": 1, "per_task": [r.to_dict() for r in rows],
              "stopped_by_time_budget": False}
    s = TuningSummary.from_worker(worker, db_dir="/tmp/db", runner="local")
    assert s.est_before == Estimate(None, 0, 1) and s.per_task == rows
    d = s.to_dict()
    assert {k: d[k] for k in worker} == worker
    assert d["db_dir"] == "/tmp/db" and d["runner"] == "local"
    text = "\n".join(s.lines())
    assert "n/a (no task has a measured schedule) -> 0.40 ms" in text


def test_progress_lines():
    line = format_progress({"event": "batch", "done": 4, "budget": 8, "task_index": 0,
                            "tasks": 2, "task": "conv", "task_trials": 4, "best_ms": 0.25,
                            "est_ms": None, "eta_s": 75.0, "elapsed_s": 10.0})
    assert line == "[4/8] task 1/2 conv: 4 trials, best 0.250 ms (10s, ETA 1m15s)"
