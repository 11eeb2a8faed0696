"""``build --max-accuracy-drop POINTS``: the accuracy-guarded search over pruning x
quantization on a validation split of calib/, the winner built, and the search in the manifest.
Real weights (accuracy is the point), small calib/ and test/ subsets to stay quick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_user_error, copy_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(data_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("select-data")
    calib = sorted((data_dir / "calib").glob("*.jpg"))[:120]
    test = sorted((data_dir / "test").glob("*.jpg"))[:100]
    return copy_images(calib, root / "calib"), copy_images(test, root / "test")


def test_search_builds_the_smallest_candidate_within_budget(cli_runner, weights_path,
                                                            small_data, tmp_path):
    calib, test = small_data
    out = tmp_path / "sel"
    r = cli_runner("build", "--target", "rpi4", "--weights", str(weights_path),
                   "--max-accuracy-drop", "0.5", "--calib", str(calib), "--test-dir", str(test),
                   "--out", str(out))
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    sel = m["reports"]["selection"]
    rows = {c["name"]: c for c in sel["candidates"]}
    assert sel["budget_points"] == 0.5 and sel["guard"] == "lost"
    assert len(rows) >= 10 and "original" in rows
    won = rows[sel["selected"]]
    ok = [c for c in rows.values() if c["val_lost"] <= 0.005 + 1e-12]
    # Every candidate's figures are kept; the winner is the smallest one within the budget.
    assert won["within_budget"] and won["stored_bytes"] == min(c["stored_bytes"] for c in ok)
    assert all(c["within_budget"] == (c in ok) for c in rows.values())
    # What was built is what was chosen, and its params file is what the search measured.
    assert m["stages"]["prune"] == won["prune"] and m["stages"]["quantize"] == won["quantize"]
    assert m["sizes"]["params.npz"] < rows["original"]["stored_bytes"]
    # Its accuracy on test/ (measured, never tuned on) is reported next to the original's.
    t = sel["test"]
    assert t["images"] == 100 and t["data"] == str(test)
    assert t["change_points"] == pytest.approx(100 * (t["selected"] - t["original"]))
    assert "selected" in r.output and "test accuracy" in r.output


def test_budget_is_in_points(cli_runner):
    r = cli_runner("build", "--target", "rpi4", "--max-accuracy-drop", "150")
    assert_user_error(r, "--max-accuracy-drop")
    r = cli_runner("build", "--target", "rpi4", "--search-channels", "0.5")
    assert_user_error(r, "--search-channels goes with --max-accuracy-drop")


def test_search_optimize_latency_on_the_host(cli_runner, weights_path, small_data, tmp_path):
    """``--optimize latency``: every candidate within budget is built for the target and
    timed (same-graph candidates share one build), the fastest wins (ties: the smallest),
    and the manifest records every figure and why."""
    calib, test = small_data
    out = tmp_path / "fast"
    r = cli_runner("build", "--target", "host", "--weights", str(weights_path),
                   "--max-accuracy-drop", "1", "--optimize", "latency", "--calib", str(calib),
                   "--test-dir", str(test), "--verify-images", "4", "--out", str(out))
    assert r.exit_code == 0, r.output
    sel = json.loads((out / "manifest.json").read_text())["reports"]["selection"]
    assert sel["optimize"] == "latency"
    rows = {c["name"]: c for c in sel["candidates"]}
    ok = [c for c in rows.values() if c["within_budget"]]
    assert ok and all(c["latency_ms"] > 0 and c["latency_where"] == "local" for c in ok)
    assert all(c["latency_ms"] is None for c in rows.values() if not c["within_budget"])
    # Weight encodings decode to the same dense graph: one build timed for all of them.
    dense = [c for c in ok if c["quantize"] is None or c["quantize"]["mode"] != "int8"]
    assert len({c["latency_measured_as"] for c in dense}) == 1
    assert len({c["latency_ms"] for c in dense}) == 1
    won = rows[sel["selected"]]
    best = min((c["latency_ms"], c["stored_bytes"]) for c in ok)
    assert (won["latency_ms"], won["stored_bytes"]) == best
    assert "lowest latency on local" in sel["why"] and sel["selected"] in sel["why"]
    assert "latency ms" in r.output


def test_optimize_needs_the_search(cli_runner):
    r = cli_runner("build", "--target", "host", "--optimize", "latency")
    assert_user_error(r, "--optimize goes with --max-accuracy-drop")
    r = cli_runner("build", "--target", "host", "--quantize", "int8", "--max-accuracy-drop", "1",
                   "--optimize", "latency")
    assert_user_error(r, "--optimize goes with --max-accuracy-drop")
    r = cli_runner("build", "--target", "rpi4", "--max-accuracy-drop", "1", "--optimize",
                   "latency")
    assert_user_error(r, "times the candidates on the board", "--rpc HOST:PORT")
