"""The one accuracy check of a build: plate readings of a changed model against the original's,
in points, on one named split of ``calib/``.

The build's check before compiling (``--prune``/``--quantize``), the search over pruning x
quantization (``--max-accuracy-drop`` alone) and the check of the compiled module during
verification all call :func:`compare` on :data:`VALIDATION`, so a figure in one place means
the same thing in the others. Compression fits on the training part of the split; the
validation part decides, so no image that set a scale or a weight also judges it. ``test/`` is
never used here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lprnet_edge.model.calib import CalibrationSet, decode_batch, predict_logits

MEASURES = ("drop", "lost")
DEFAULT_BUDGET_POINTS = 1.0  # a model-changing build without an explicit --max-accuracy-drop
_SLACK_POINTS = 1e-9  # float rounding of a drop exactly at the budget is not a failure


@dataclass(frozen=True)
class ValidationSplit:
    """A fixed (train, validation) partition of ``calib/``: the same images every run."""

    name: str
    fraction: float
    seed: int

    def of(self, calib: CalibrationSet) -> tuple[CalibrationSet, CalibrationSet]:
        return calib.split(self.fraction, self.seed)

    def to_dict(self, images: int) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "images": images}


VALIDATION = ValidationSplit("calib/ validation split", fraction=0.3, seed=0)


@dataclass(frozen=True)
class Budget:
    """How many points a changed model may lose, and how the loss is counted.

    ``drop``: accuracy(original) - accuracy(changed). ``lost``: the plates the original reads
    and the changed model does not, ignoring plates it gains: a model distilled on ``calib/``
    gains plates there that are not evidence of anything on other data, and would hide what
    it lost in a net drop.
    """

    points: float
    source: str = "--max-accuracy-drop"  # or "default"
    measure: str = "drop"

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"measure {self.measure!r}: use one of {list(MEASURES)}")

    @classmethod
    def of(cls, points: float | None, measure: str = "drop") -> Budget:
        """``--max-accuracy-drop`` as given (None: the default budget)."""
        if points is None:
            return cls(DEFAULT_BUDGET_POINTS, "default", measure)
        return cls(float(points), "--max-accuracy-drop", measure)


@dataclass(frozen=True)
class AccuracyCheck:
    """Readings of a changed model and of the original on the same labelled images."""

    images: int
    original_ok: int
    changed_ok: int
    lost: int  # plates the original reads right and the changed model does not
    gained: int  # the converse
    agree: int  # plates both read the same (right or wrong)
    budget: Budget
    measured_with: str = "pytorch"

    @property
    def original(self) -> float:
        return self.original_ok / self.images

    @property
    def changed(self) -> float:
        return self.changed_ok / self.images

    @property
    def drop_points(self) -> float:
        return 100 * (self.original - self.changed)

    @property
    def lost_points(self) -> float:
        return 100 * self.lost / self.images

    @property
    def gained_points(self) -> float:
        return 100 * self.gained / self.images

    @property
    def agreement(self) -> float:
        return self.agree / self.images

    @property
    def loss_points(self) -> float:
        """The figure the budget is compared with."""
        return self.lost_points if self.budget.measure == "lost" else self.drop_points

    @property
    def ok(self) -> bool:
        return self.loss_points <= self.budget.points + _SLACK_POINTS

    def to_dict(self) -> dict[str, Any]:
        return {"split": VALIDATION.to_dict(self.images), "original": self.original,
                "compressed": self.changed, "drop_points": self.drop_points,
                "budget_points": self.budget.points, "budget_source": self.budget.source,
                "measure": self.budget.measure, "measured_with": self.measured_with,
                "ok": self.ok, "lost_points": self.lost_points,
                "gained_points": self.gained_points}

    def summary(self) -> str:
        return (f"{self.changed:.3f} vs original {self.original:.3f} on {self.images} plates "
                f"({-self.drop_points:+.1f} pt, budget {self.budget.points:g} pt)")


def compare(original: Sequence[str], changed: Sequence[str], labels: Sequence[str],
            budget: Budget, measured_with: str = "pytorch") -> AccuracyCheck:
    """The check from readings: ``original[i]`` and ``changed[i]`` read the plate ``labels[i]``."""
    ok_o = [p == t for p, t in zip(original, labels, strict=True)]
    ok_c = [p == t for p, t in zip(changed, labels, strict=True)]
    pairs = list(zip(ok_o, ok_c, strict=True))
    return AccuracyCheck(
        images=len(labels), original_ok=sum(ok_o), changed_ok=sum(ok_c),
        lost=sum(a and not b for a, b in pairs), gained=sum(b and not a for a, b in pairs),
        agree=sum(a == b for a, b in zip(original, changed, strict=True)), budget=budget,
        measured_with=measured_with)


def readings(model: nn.Module, data: CalibrationSet) -> list[str]:
    """Plate texts of ``model`` at batch-1 semantics."""
    return decode_batch(predict_logits(model, data.x))


def check_model(original: nn.Module, changed: nn.Module, calib: CalibrationSet,
                budget: Budget) -> AccuracyCheck:
    """:func:`compare` of two PyTorch models on the validation part of ``calib``."""
    _train, val = VALIDATION.of(calib)
    with torch_one_thread():
        return compare(readings(original, val), readings(changed, val), val.labels, budget)


@contextmanager
def torch_one_thread() -> Iterator[None]:
    """PyTorch on one thread while it runs beside the TVM runtime or other jobs: at batch 1 its
    worker threads only spin against the others' on a small machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
