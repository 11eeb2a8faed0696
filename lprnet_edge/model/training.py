"""What every training loop on LPRNet shares (host, torch): frozen BatchNorm, CTC on plate
labels, and the progress display of epochs.

Used by fine-tuning (:mod:`lprnet_edge.model.finetune`) and distillation
(:mod:`lprnet_edge.compress.distill`), so both train the same function the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from lprnet_edge.runtime.charset import Charset


def freeze_bn(model: nn.Module, affine: bool = False) -> None:
    """BatchNorm layers in eval mode (running statistics used, never updated) and, unless
    ``affine``, their scale and shift not trained.

    The published checkpoint's running statistics are the defaults (mean 0, var 1): its
    BatchNorm is only an affine map. Re-estimating them on a few hundred crops replaces that
    map by batch statistics the model never saw, which destroys it.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(affine)


def ctc_targets(labels: Sequence[str], charset: Charset) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated label indices and per-label lengths, as ``F.ctc_loss`` takes them."""
    seqs = [charset.encode(t) for t in labels]
    return (torch.tensor([c for s in seqs for c in s], dtype=torch.long),
            torch.tensor([len(s) for s in seqs], dtype=torch.long))


def frame_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
             ) -> torch.Tensor:
    """Mean over images and time frames of KL(teacher || student) between the per-frame
    class distributions of logits ``(N, classes, time)``, softened by ``temperature`` and
    scaled by its square (so the gradient's size does not depend on it)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                  log_target=True, reduction="none").sum(1).mean()
    return kl * t * t


def ctc_loss(logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor], blank: int
             ) -> torch.Tensor:
    """Mean CTC loss of LPRNet logits ``(N, classes, time)`` against ``targets``."""
    lp = F.log_softmax(logits, dim=1).permute(2, 0, 1)  # (T, N, C)
    n, steps = logits.shape[0], logits.shape[2]
    return F.ctc_loss(lp, targets[0], torch.full((n,), steps, dtype=torch.long), targets[1],
                      blank=blank, reduction="mean", zero_infinity=True)


@dataclass
class EpochRecord:
    """One training epoch, as the progress display and the history keep it."""

    epoch: int
    epochs: int
    steps: int
    loss: float | None
    elapsed_s: float
    val_accuracy: float | None = None
    best_val_accuracy: float | None = None
    val_kept: float | None = None  # of the plates the starting model read, still read
    val_drift: float | None = None  # frame KL to the starting model on the validation split

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        parts = [f"epoch {self.epoch}/{self.epochs}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.val_accuracy is not None:
            parts.append(f"val acc {self.val_accuracy:.3f} (best {self.best_val_accuracy:.3f})")
        if self.val_kept is not None:
            parts.append(f"kept {self.val_kept:.3f}")
        if self.val_drift is not None:
            parts.append(f"drift {self.val_drift:.4f}")
        parts.append(f"{self.elapsed_s:.0f}s")
        return ", ".join(parts)


class ProgressBar:
    """``distill [#######-----] 58% 70/120 steps, epoch 5/8, loss 0.4123, val acc 0.536``.

    Redrawn in place after every step on a terminal; elsewhere (CI, a log file) one line per
    epoch, so a log does not fill with carriage returns.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 24, label: str = "distill"
                 ) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.label = label
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last: EpochRecord | None = None
        self.drawn = False

    def _line(self, step: int, total: int, loss: float | None) -> str:
        frac = step / max(total, 1)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"{self.label} [{bar}] {100 * frac:3.0f}% {step}/{total} steps"
        if self.last is not None:
            text += f", {self.last}"
        elif loss is not None:
            text += f", loss {loss:.4f}"
        return text

    def step(self, step: int, total: int, loss: float) -> None:
        if self.tty:
            self.stream.write("\r" + self._line(step, total, loss) + "\x1b[K")
            self.stream.flush()
            self.drawn = True

    def epoch(self, rec: EpochRecord, total: int) -> None:
        self.last = rec
        if self.tty:
            self.stream.write("\r" + self._line(rec.steps, total, rec.loss) + "\x1b[K")
        else:
            self.stream.write(self._line(rec.steps, total, rec.loss) + "\n")
        self.stream.flush()
        self.drawn = self.tty

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


Progress = ProgressBar | Callable[[EpochRecord], None] | None
