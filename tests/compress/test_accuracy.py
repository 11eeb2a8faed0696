"""The one accuracy check: counts, points, and the two ways of counting a loss."""

from __future__ import annotations

import pytest

from lprnet_edge.compress.accuracy import DEFAULT_BUDGET_POINTS, VALIDATION, Budget, compare

LABELS = ["A1", "B2", "C3", "D4", "E5", "F6", "G7", "H8"]


def test_drop_nets_gains_and_lost_does_not():
    original = ["A1", "B2", "C3", "D4", "x", "x", "G7", "H8"]  # 6 of 8 right
    changed = ["A1", "B2", "y", "D4", "E5", "F6", "G7", "z"]  # loses C3, H8; gains E5, F6
    c = compare(original, changed, LABELS, Budget.of(10.0))
    assert (c.images, c.original_ok, c.changed_ok, c.lost, c.gained) == (8, 6, 6, 2, 2)
    assert c.drop_points == 0.0 and c.lost_points == 25.0 and c.gained_points == 25.0
    assert c.agreement == 4 / 8
    assert c.ok  # a net drop of 0 points
    lost = compare(original, changed, LABELS, Budget.of(10.0, measure="lost"))
    assert lost.loss_points == 25.0 and not lost.ok  # the plates it lost still count


def test_budget_edge_and_sources():
    original = LABELS[:]
    changed = [*LABELS[:7], "wrong"]  # one plate of eight: 12.5 points
    assert compare(original, changed, LABELS, Budget.of(12.5)).ok
    assert not compare(original, changed, LABELS, Budget.of(12.4)).ok
    assert Budget.of(None) == Budget(DEFAULT_BUDGET_POINTS, "default", "drop")
    assert Budget.of(0.5).source == "--max-accuracy-drop"
    with pytest.raises(ValueError, match="measure"):
        Budget(1.0, measure="net")


def test_to_dict_names_the_split():
    c = compare(LABELS, LABELS, LABELS, Budget.of(None), measured_with="tvm")
    d = c.to_dict()
    assert d["split"] == {"fraction": VALIDATION.fraction, "seed": VALIDATION.seed, "images": 8}
    assert d["budget_source"] == "default" and d["measured_with"] == "tvm" and d["ok"]
    assert d["original"] == d["compressed"] == 1.0 and d["drop_points"] == 0.0
