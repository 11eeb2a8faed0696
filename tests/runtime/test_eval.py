"""`lprnet-edge eval`: the reference accuracy on test/ and the figures it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from conftest import copy_images  # noqa: E402

from lprnet_edge.model.reference import reference_recognizer  # noqa: E402
from lprnet_edge.runtime.evaluate import evaluate  # noqa: E402
from lprnet_edge.runtime.metrics import edit_distance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_cache")

# The one mandated figure: the original PyTorch model on test/ at batch 1 (shared README).
REFERENCE_CORRECT, REFERENCE_COUNT = 894, 1000


@pytest.mark.slow
def test_reference_accuracy_through_the_cli(cli_runner, test_dir, weights_path):
    r = cli_runner("eval", "--data", test_dir, "--weights", weights_path, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["backend"] == "torch"
    assert res["count"] == REFERENCE_COUNT and res["skipped"] == []
    assert res["correct"] == REFERENCE_CORRECT
    assert res["accuracy"] == pytest.approx(0.894, abs=5e-4)
    assert f"{res['accuracy']:.3f}" == "0.894"
    # The other figures are consistent with each other.
    assert res["accuracy"] < res["char_accuracy"] < 1
    assert 0 < res["mean_edit_distance"]
    assert sum(v["count"] for v in res["per_region"].values()) == REFERENCE_COUNT
    assert sum(v["correct"] for v in res["per_region"].values()) == REFERENCE_CORRECT
    for v in res["per_region"].values():
        assert v["accuracy"] == pytest.approx(v["correct"] / v["count"])
    for e in res["errors"]:
        assert e["label"] != e["prediction"] and e["file"].startswith(e["label"])


def test_evaluate_agrees_with_the_recognizer(weights_path, test_images, tmp_path):
    rec = reference_recognizer(weights_path)
    root = copy_images(test_images, tmp_path / "plates")
    res = evaluate(rec, root)
    reads = {p.stem: rec.recognize(p).text for p in test_images}
    assert res.count == len(test_images)
    assert res.correct == sum(label == text for label, text in reads.items())
    assert res.mean_edit_distance == pytest.approx(
        sum(edit_distance(label, text) for label, text in reads.items()) / len(reads))
    assert sum(v["count"] for v in res.per_region.values()) == len(test_images)
    assert {e["file"] for e in res.errors} == {
        f"{label}.jpg" for label, text in reads.items() if label != text}


def test_eval_cli_text_and_limit(cli_runner, weights_path, test_images, tmp_path, monkeypatch):
    root = copy_images(test_images[:6], tmp_path / "plates")
    monkeypatch.setenv("LPRNET_EDGE_DATA", str(weights_path.parents[1]))  # weights found here
    r = cli_runner("eval", "--data", root)
    assert r.exit_code == 0, r.output
    for field in ("backend", "plates            6", "accuracy", "char accuracy",
                  "mean edit dist", "province"):
        assert field in r.stdout, r.stdout
    assert test_images[0].name[0] in r.stdout  # the province of the first plate is listed
    r = cli_runner("eval", "--data", root, "--limit", "2", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["count"] == 2 and res["data"] == str(root)
    assert set(res) >= {"accuracy", "char_accuracy", "mean_edit_distance", "count",
                        "per_region", "correct", "skipped"}


def test_evaluate_lists_each_skipped_file_and_why(weights_path, test_images, tmp_path):
    """`eval --skip-bad` can say which files it left out and why (issue 12 defect 5)."""
    rec = reference_recognizer(weights_path)
    root = copy_images(test_images[:3], tmp_path / "plates")
    (root / "README.txt").write_text("not an image")
    (root / "京A12345.jpg").write_bytes(b"\xff\xd8\xff broken")
    (root / "京AB#123.jpg").write_bytes(test_images[0].read_bytes())
    res = evaluate(rec, root, skip_bad=True)
    assert res.count == 3 and res.skipped_count == 3
    why = {Path(p).name: reason for p, reason in res.skipped}
    assert set(why) == {"README.txt", "京A12345.jpg", "京AB#123.jpg"}
    assert "not an image file" in why["README.txt"]
    assert "not a readable image" in why["京A12345.jpg"]
    assert "'#'" in why["京AB#123.jpg"] and "charset" in why["京AB#123.jpg"]
    assert all(Path(p).parent == root for p, _ in res.skipped)
    d = json.loads(json.dumps(res.to_dict(), ensure_ascii=False))
    assert sorted(Path(p).name for p, _ in d["skipped"]) == sorted(why)
