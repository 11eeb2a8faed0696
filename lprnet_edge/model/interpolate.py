"""Weight-space interpolation between the pretrained and the fine-tuned model (WiSE-FT).

``theta(a) = (1 - a) * theta_pretrained + a * theta_finetuned``: fine-tuning on a few hundred
plates moves the weights further than the new plates need, and part of the way back keeps
most of what was learnt on them while giving back much of what the model knew of the plates
it was trained for (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022). Both
end points share the architecture, the frozen BatchNorm (the same running statistics and, when
it is not trained, the same affine map) and the dead filters (zero in both, so zero at every
``a``): every point of the line is a model the toolchain compiles exactly like the others.

``a`` is chosen on the validation split alone (:func:`choose`), never on test/.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lprnet_edge.model.calib import CalibrationSet, decode_batch, predict_logits
from lprnet_edge.model.training import frame_kl
from lprnet_edge.runtime.charset import Charset
from lprnet_edge.runtime.errors import LprnetEdgeError

GRID = tuple(round(i / 20, 2) for i in range(21))
"""The mixing weights swept: 0 (pretrained) to 1 (fine-tuned) by 0.05."""

RULE = ("the smallest a whose validation accuracy is within one plate of the best a's: "
        "the nearest to the pretrained model among the ties")


def interpolate(pretrained: nn.Module, finetuned: nn.Module, a: float) -> nn.Module:
    """A copy of ``finetuned`` whose floating-point tensors (weights, BatchNorm's affine map
    and statistics) are ``(1 - a) * pretrained + a * finetuned``; integer buffers are the
    fine-tuned model's."""
    model = copy.deepcopy(finetuned)
    model.load_state_dict(_mixed(pretrained.state_dict(), finetuned.state_dict(), a))
    return model.eval()


def _mixed(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], a: float
           ) -> dict[str, torch.Tensor]:
    if not 0 <= a <= 1:
        raise LprnetEdgeError(f"--interpolate must be between 0 and 1 (or auto), got {a}")
    mixed = {}
    for name, t in end.items():
        s = start[name]
        if s.shape != t.shape:
            raise LprnetEdgeError(f"cannot interpolate: {name} is {tuple(s.shape)} in the "
                                  f"pretrained weights and {tuple(t.shape)} in the fine-tuned")
        mixed[name] = torch.lerp(s, t, a) if t.is_floating_point() else t.clone()
    return mixed


class Drift:
    """How far a model moved from where it started, on the validation split, without
    looking at any other data: ``kept``, the fraction of the plates the starting model read
    that are still read; ``drift``, the mean frame KL to the starting model's outputs."""

    def __init__(self, start: nn.Module, val: CalibrationSet, cs: Charset) -> None:
        self.x, self.labels, self.cs = val.x, val.labels, cs
        self.ref = torch.from_numpy(predict_logits(start, val.x))
        self.ref_text = decode_batch(self.ref.numpy(), cs)
        self.read = np.array([p == t for p, t in zip(self.ref_text, val.labels, strict=True)],
                             bool)

    def measure(self, model: nn.Module) -> tuple[float | None, float]:
        return self.measure_all(model)[1:]

    def measure_all(self, model: nn.Module) -> tuple[float, float | None, float]:
        """Exact-plate accuracy, ``kept`` and ``drift`` from one pass over the split."""
        logits = torch.from_numpy(predict_logits(model, self.x))
        text = decode_batch(logits.numpy(), self.cs)
        acc = float(np.mean([p == t for p, t in zip(text, self.labels, strict=True)]))
        same = np.array(text) == np.array(self.ref_text)
        kept = float(same[self.read].mean()) if self.read.any() else None
        return acc, kept, round(float(frame_kl(logits, self.ref)), 5)


@dataclass(frozen=True)
class Point:
    """One mixing weight on the validation split."""

    a: float
    val_accuracy: float
    val_kept: float | None
    val_drift: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Interpolation:
    """The sweep on the validation split and the mixing weight kept (``given``: set by the
    user rather than chosen by :data:`RULE`)."""

    a: float
    given: bool
    sweep: tuple[Point, ...]
    finetuned_val_accuracy: float  # a = 1, the fine-tuned end point

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "rule": "given" if self.given else RULE,
                "finetuned_val_accuracy": self.finetuned_val_accuracy,
                "sweep": [p.to_dict() for p in self.sweep]}


def sweep(pretrained: nn.Module, finetuned: nn.Module, drift: Drift,
          grid: tuple[float, ...] = GRID) -> tuple[Point, ...]:
    """Validation accuracy, ``kept`` and ``drift`` of the model at each ``a`` of ``grid``."""
    start, end = pretrained.state_dict(), finetuned.state_dict()
    model = copy.deepcopy(finetuned).eval()  # one copy, reloaded at each point
    points = []
    for a in grid:
        model.load_state_dict(_mixed(start, end, a))
        points.append(Point(a, *drift.measure_all(model)))
    return tuple(points)


def choose(points: tuple[Point, ...], n_val: int) -> float:
    """:data:`RULE`: one plate of a held-out split of a few hundred is noise, and among
    models that read the user's plates equally well, the one nearest the pretrained model
    keeps the most of what it knew."""
    best = max(p.val_accuracy for p in points)
    tol = 1.0 / max(n_val, 1) + 1e-9  # one plate fewer is a tie
    return min(p.a for p in points if p.val_accuracy >= best - tol)


def blend(pretrained: nn.Module, finetuned: nn.Module, val: CalibrationSet, cs: Charset,
          a: float | None = None, grid: tuple[float, ...] = GRID
          ) -> tuple[nn.Module, Interpolation]:
    """The model at ``a`` (``None``: chosen on ``val`` by :data:`RULE`) and the sweep record.
    A given ``a`` is added to the sweep if it is not on the grid."""
    drift = Drift(pretrained, val, cs)
    grid = tuple(sorted({*grid, 1.0} if a is None or a in grid else {*grid, 1.0, a}))
    points = sweep(pretrained, finetuned, drift, grid)
    chosen = choose(points, len(val)) if a is None else a
    at_one = next(p.val_accuracy for p in points if p.a == 1.0)
    return (interpolate(pretrained, finetuned, chosen),
            Interpolation(chosen, a is not None, points, at_one))
