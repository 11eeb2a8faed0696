"""Greedy CTC decoding of LPRNet logits (numpy only, shared by every backend)."""

from __future__ import annotations

import numpy as np

from lprnet_edge.runtime.errors import LprnetEdgeError


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def greedy_decode(logits: np.ndarray, blank: int) -> tuple[list[int], list[float]]:
    """Best path of one plate's ``(classes, time)`` logits: collapse repeats, drop blanks.

    Returns the label indices and, for each, the highest softmax probability among the time
    steps that produced it (its confidence).
    """
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"expected (classes, time) logits, got shape {logits.shape}")
    if not 0 <= blank < logits.shape[0]:
        raise ValueError(f"blank index {blank} out of range for {logits.shape[0]} classes")
    logits = logits.astype(np.float64)
    if np.isnan(logits).any():
        raise LprnetEdgeError("the model produced NaN logits: the model or artifact is broken")
    # +-inf (an overflowing compiled or quantized model) would make the softmax NaN.
    logits = np.clip(logits, -1e300, 1e300)
    probs = softmax(logits, axis=0)
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
    if logits.ndim == 2 and logits.shape[0] != len(chars):
        raise ValueError(f"logits have {logits.shape[0]} classes but the charset has "
                         f"{len(chars)} characters")
    labels, confs = greedy_decode(logits, blank)
    text = "".join(chars[i] for i in labels)
    return text, (min(confs) if confs else 0.0)
