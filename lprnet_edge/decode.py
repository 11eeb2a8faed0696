"""Greedy CTC decoding of LPRNet logits (numpy only, shared by every backend)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def greedy_decode(logits: np.ndarray, blank: int) -> tuple[list[int], list[float]]:
    """Best path of one plate's ``(classes, time)`` logits: collapse repeats, drop blanks.

    Returns the label indices and, for each, the highest softmax probability among the time
    steps that produced it (its confidence).
    """
    if logits.ndim != 2:
        raise ValueError(f"expected (classes, time) logits, got shape {logits.shape}")
    probs = softmax(logits.astype(np.float64), axis=0)
    best = probs.argmax(axis=0)
    labels: list[int] = []
    confs: list[float] = []
    prev = -1
    for t, c in enumerate(best.tolist()):
        p = float(probs[c, t])
        if c == prev and c != blank and labels:
            confs[-1] = max(confs[-1], p)
        elif c != blank:
            labels.append(c)
            confs.append(p)
        prev = c
    return labels, confs


def decode_text(logits: np.ndarray, chars: tuple[str, ...] | list[str], blank: int
                ) -> tuple[str, float]:
    """Plate text and confidence (the weakest character's probability; 0 for an empty read)."""
    labels, confs = greedy_decode(logits, blank)
    text = "".join(chars[i] for i in labels)
    return text, (min(confs) if confs else 0.0)
