"""Exact-match accuracy, per-character accuracy, edit distance and per-province figures."""

from __future__ import annotations

import itertools
import json

import pytest

from lprnet_edge.runtime.charset import load_charset
from lprnet_edge.runtime.metrics import Accumulator, edit_distance


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("", "", 0),
        ("abc", "abc", 0),
        ("abc", "", 3),
        ("", "abc", 3),
        ("kitten", "sitting", 3),
        ("皖A12345", "皖A1234", 1),
        ("皖A12345", "苏A12345", 1),
        ("皖A12345", "皖A1Z2345", 1),
        ("皖A12345", "A12345皖", 2),
    ],
)
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d
    assert edit_distance(b, a) == d


def test_edit_distance_is_a_metric():
    words = ["", "a", "ab", "ba", "abc", "acb", "皖A1", "皖B1"]
    for x, y, z in itertools.product(words, repeat=3):
        assert edit_distance(x, z) <= edit_distance(x, y) + edit_distance(y, z)
        assert (edit_distance(x, y) == 0) == (x == y)


def test_accumulator_summary():
    acc = Accumulator(load_charset())
    pairs = [
        ("皖A12345", "皖A12345"),  # right
        ("皖A12345", "皖A12346"),  # one substitution
        ("苏B99999", "苏B99999"),  # right
        ("苏B99999", ""),  # nothing read
        ("AB12345", "AB12345"),  # no province
    ]
    for i, (label, pred) in enumerate(pairs):
        acc.add(label, pred, f"{i}.jpg")
    skipped = [("a/x.txt", "not an image file"), ("a/京A.jpg", "not a readable image")]
    r = acc.result(skipped=skipped)
    assert (r.count, r.correct, r.skipped, r.skipped_count) == (5, 3, skipped, 2)
    assert r.to_dict()["skipped"] == [list(s) for s in skipped]
    assert r.accuracy == pytest.approx(3 / 5)
    chars = sum(len(lbl) for lbl, _ in pairs)
    assert r.char_accuracy == pytest.approx((chars - 1 - 7) / chars)
    assert r.mean_edit_distance == pytest.approx((0 + 1 + 0 + 7 + 0) / 5)
    assert r.per_region["皖"] == {"count": 2, "correct": 1, "accuracy": 0.5}
    assert r.per_region["苏"] == {"count": 2, "correct": 1, "accuracy": 0.5}
    assert r.per_region["?"] == {"count": 1, "correct": 1, "accuracy": 1.0}
    assert r.errors == [
        {"file": "1.jpg", "label": "皖A12345", "prediction": "皖A12346"},
        {"file": "3.jpg", "label": "苏B99999", "prediction": ""},
    ]
    # JSON-ready (the CLI's --json prints this).
    assert json.loads(json.dumps(r.to_dict(), ensure_ascii=False))["count"] == 5


def test_per_region_sorted_by_count_and_errors_capped():
    acc = Accumulator(load_charset(), keep_errors=3)
    for i in range(10):
        acc.add("皖A12345", "x", str(i))
    acc.add("苏A12345", "苏A12345")
    r = acc.result()
    assert list(r.per_region) == ["皖", "苏"]
    assert len(r.errors) == 3 and r.correct == 1


def test_char_accuracy_never_negative():
    acc = Accumulator(load_charset())
    acc.add("皖A1", "苏B2345678")
    r = acc.result()
    assert r.char_accuracy == 0.0
    assert r.mean_edit_distance == 9


def test_empty_result():
    r = Accumulator(load_charset()).result()
    assert (r.count, r.correct, r.accuracy, r.char_accuracy, r.mean_edit_distance) == (
        0, 0, 0.0, 0.0, 0.0)
    assert r.per_region == {}
