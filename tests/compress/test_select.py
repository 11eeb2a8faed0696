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
