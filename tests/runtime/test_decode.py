"""Greedy CTC decoding: collapse repeats, drop blanks, confidence of the weakest character."""

from __future__ import annotations

import numpy as np
import pytest

from lprnet_edge.runtime.charset import load_charset
from lprnet_edge.runtime.decode import decode_text, greedy_decode, softmax
from lprnet_edge.runtime.errors import LprnetEdgeError

BLANK = 67


def path_logits(path: list[int], classes: int = 68, high: float = 10.0) -> np.ndarray:
    """(classes, time) logits whose best path is ``path``."""
    x = np.zeros((classes, len(path)), dtype=np.float32)
    x[path, np.arange(len(path))] = high
    return x


def upstream_decode(logits: np.ndarray, blank: int) -> list[int]:
    """The decoding loop of sirius-ai LPRNet_Pytorch's test_LPRNet.py, transcribed."""
    preb_label = list(np.argmax(logits, axis=0))
    out = []
    pre_c = preb_label[0]
    if pre_c != blank:
        out.append(pre_c)
    for c in preb_label:
        if pre_c == c or c == blank:
            if c == blank:
                pre_c = c
            continue
        out.append(c)
        pre_c = c
    return [int(c) for c in out]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ([0, 0, BLANK, 41, 41, 41, BLANK, 31], [0, 41, 31]),
        ([31, BLANK, 31, 31, BLANK, BLANK, 31], [31, 31, 31]),  # blank separates repeats
        ([BLANK] * 18, []),
        ([5], [5]),
        ([5, 6, 5, 6], [5, 6, 5, 6]),
        ([BLANK, 7, BLANK], [7]),
    ],
)
def test_collapse_and_blanks(path, expected):
    labels, confs = greedy_decode(path_logits(path), BLANK)
    assert labels == expected
    assert len(confs) == len(labels)
    assert all(0.99 < c <= 1.0 for c in confs)


def test_matches_upstream_decoding_on_random_logits():
    rng = np.random.default_rng(0)
    for _ in range(300):
        # Few classes and a strong blank: many repeats and blanks, the cases that matter.
        logits = rng.normal(size=(6, 18))
        logits[5] += rng.uniform(0, 1.5)
        labels, _ = greedy_decode(logits, 5)
        assert labels == upstream_decode(logits, 5)


def test_confidence_is_the_weakest_characters_best_step():
    logits = np.full((4, 5), -5.0)
    # time: 0 -> class 1 (weak), 1 -> class 1 (strong), 2 -> blank, 3 -> class 2 (medium)
    logits[1, 0], logits[0, 0] = 1.0, 0.5
    logits[1, 1] = 6.0
    logits[3, 2] = 6.0
    logits[2, 3], logits[0, 3] = 3.0, 2.0
    logits[3, 4] = 6.0
    probs = softmax(logits, axis=0)
    labels, confs = greedy_decode(logits, blank=3)
    assert labels == [1, 2]
    assert confs == pytest.approx([probs[1, 1], probs[2, 3]])
    text, conf = decode_text(logits, ("a", "b", "c", "-"), blank=3)
    assert text == "bc"
    assert conf == pytest.approx(min(probs[1, 1], probs[2, 3]))


def test_softmax_is_a_distribution_and_stable():
    x = np.array([[1000.0, -1000.0], [1001.0, -999.0], [0.0, 0.0]])
    p = softmax(x, axis=0)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=0), 1.0)
    assert p[1, 0] > p[0, 0] > p[2, 0]


def test_decode_text_with_the_packaged_charset():
    cs = load_charset()
    plate = "皖AD12345"
    path = []
    for i in cs.encode(plate):
        path += [i, i, cs.blank]
    text, conf = decode_text(path_logits(path), cs.chars, cs.blank)
    assert text == plate
    assert 0.99 < conf <= 1.0


def test_empty_read_has_zero_confidence():
    text, conf = decode_text(path_logits([BLANK] * 18), load_charset().chars, BLANK)
    assert (text, conf) == ("", 0.0)


def test_no_time_steps():
    assert greedy_decode(np.zeros((68, 0)), BLANK) == ([], [])


@pytest.mark.parametrize("shape", [(68,), (1, 68, 18), (0, 18)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match="logits"):
        greedy_decode(np.zeros(shape), BLANK)


def test_blank_out_of_range():
    with pytest.raises(ValueError, match="blank"):
        greedy_decode(np.zeros((10, 18)), 10)


def test_class_count_must_match_the_charset():
    with pytest.raises(ValueError, match="10 classes"):
        decode_text(np.zeros((10, 18)), load_charset().chars, BLANK)


def test_infinite_logits_decode_and_nan_is_an_error():
    logits = path_logits([3, BLANK, 4], classes=68)
    logits[3, 0] = np.inf
    logits[:, 1] = -np.inf
    logits[BLANK, 1] = 0.0
    labels, confs = greedy_decode(logits, BLANK)
    assert labels == [3, 4]
    assert np.all(np.isfinite(confs)) and confs[0] == pytest.approx(1.0)
    logits[4, 2] = np.nan
    with pytest.raises(LprnetEdgeError, match="NaN"):
        greedy_decode(logits, BLANK)


def test_float16_and_integer_logits():
    path = [1, 1, BLANK, 2]
    expected = greedy_decode(path_logits(path), BLANK)[0]
    assert greedy_decode(path_logits(path).astype(np.float16), BLANK)[0] == expected
    assert greedy_decode(path_logits(path).astype(np.int32), BLANK)[0] == expected
