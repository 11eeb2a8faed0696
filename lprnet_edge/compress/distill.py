"""Knowledge distillation of a pruned LPRNet from the original, on ``calib/`` only (host, torch).

- Data: a :class:`lprnet_edge.model.calib.CalibrationSet` (which refuses the test split), with
  light augmentation (small affine, brightness/contrast jitter, occasional blur) applied to the
  original-resolution crops before the 94x24 resize; deterministic for a given ``seed``.
- Batch-1 semantics: teacher and student run through
  :func:`lprnet_edge.model.calib.forward_per_sample`, which normalises the context head per image
  (what batch-1 inference computes), so a batch of 32 trains exactly the function that is
  evaluated one image at a time.
- BatchNorm is frozen: the model stays in ``eval()`` (running stats untouched; they are the
  defaults 0/1 and re-estimating them destroys the model) and BN affine parameters are not
  trained. Dropout is therefore off too.
- Loss: ``kd_weight * T^2 * KL(teacher/T || student/T)`` per time step (+ optional MSE on
  logits) ``+ ctc_weight * CTC(student, label)`` with labels from the file names.
- Progress: a bar on stderr (steps, loss, validation accuracy; redrawn in place on a
  terminal, one line per epoch in a log), or any callable taking an :class:`EpochRecord`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lprnet_edge.model.augment import augment_image
from lprnet_edge.model.calib import CalibrationSet, accuracy, forward_per_sample
from lprnet_edge.model.training import (  # noqa: F401  (EpochRecord: part of this API)
    EpochRecord,
    Progress,
    ProgressBar,
    ctc_loss,
    ctc_targets,
    frame_kl,
    freeze_bn,
)
from lprnet_edge.runtime.charset import load_charset
from lprnet_edge.runtime.preprocess import Preprocess


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 2.0
    kd_weight: float = 1.0
    mse_weight: float = 0.0
    ctc_weight: float = 0.1
    augment: bool = True
    seed: int = 0
    max_steps: int | None = None  # stop early (tests, quick runs)
    time_budget_s: float | None = None  # stop after this much wall time (checked per step)
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batch_x(data: CalibrationSet, idx: np.ndarray, rng: np.random.Generator | None
             ) -> torch.Tensor:
    if rng is None or data.raw is None:
        return torch.from_numpy(data.x[idx])
    pre = Preprocess()
    return torch.from_numpy(np.concatenate([pre(augment_image(data.raw[i], rng)) for i in idx]))


def _targets(data: CalibrationSet, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return ctc_targets([data.labels[i] for i in idx], load_charset())


def distill_loss(s: torch.Tensor, t: torch.Tensor, cfg: DistillConfig,
                 targets: tuple[torch.Tensor, torch.Tensor] | None = None, blank: int = 67
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Student logits ``s`` and teacher logits ``t``: (N, classes, time)."""
    parts: dict[str, torch.Tensor] = {}
    if cfg.kd_weight:
        parts["kd"] = cfg.kd_weight * frame_kl(s, t, cfg.temperature)
    if cfg.mse_weight:
        parts["mse"] = cfg.mse_weight * F.mse_loss(s, t)
    if cfg.ctc_weight and targets is not None:
        parts["ctc"] = cfg.ctc_weight * ctc_loss(s, targets, blank)
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def distill(teacher: nn.Module, student: nn.Module, train: CalibrationSet,
            cfg: DistillConfig | None = None, val: CalibrationSet | None = None,
            progress: Progress | str = "bar") -> tuple[nn.Module, dict[str, Any]]:
    """Train a copy of ``student`` to match ``teacher`` on ``train``; returns it + history.

    The best epoch on ``val`` (agreement-free accuracy on its labels) is kept when ``val`` is
    given; otherwise the last one. ``progress``: ``"bar"`` (a :class:`ProgressBar` on
    stderr), a :class:`ProgressBar`, a callable given each :class:`EpochRecord`, or None.
    """
    bar = ProgressBar() if progress == "bar" else progress
    try:
        return _distill(teacher, student, train, cfg or DistillConfig(), val, bar)
    finally:
        if isinstance(bar, ProgressBar):
            bar.close()


@dataclass
class _Run:
    """The state one distillation carries from batch to batch."""

    opt: torch.optim.Optimizer
    sched: Any
    rng: np.random.Generator
    steps_per_epoch: int
    total_steps: int
    blank: int
    step: int = 0
    t0: float = 0.0


def _prepare(teacher: nn.Module, student: nn.Module, train: CalibrationSet,
             cfg: DistillConfig) -> tuple[nn.Module, _Run]:
    """The frozen teacher, a trainable copy of the student with BN frozen, and the run."""
    if cfg.augment:
        train.ensure_raw()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(student)
    student.eval()  # BN frozen, dropout off
    freeze_bn(student)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, (len(train) + cfg.batch_size - 1) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return student, _Run(opt, sched, rng, steps_per_epoch, total_steps, load_charset().blank,
                         t0=time.time())


def _epoch(teacher: nn.Module, student: nn.Module, train: CalibrationSet, cfg: DistillConfig,
           run: _Run, progress: Progress) -> tuple[list[float], bool]:
    """One pass over ``train`` in shuffled batches: (losses, whether a budget stopped it)."""
    perm = run.rng.permutation(len(train))
    losses: list[float] = []
    for b in range(run.steps_per_epoch):
        idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        x = _batch_x(train, idx, run.rng if cfg.augment else None)
        with torch.no_grad():
            t = forward_per_sample(teacher, x)
        s = forward_per_sample(student, x)
        loss, _parts = distill_loss(s, t, cfg, _targets(train, idx), run.blank)
        run.opt.zero_grad()
        loss.backward()
        run.opt.step()
        run.sched.step()
        losses.append(loss.item())
        run.step += 1
        if isinstance(progress, ProgressBar):
            progress.step(run.step, run.total_steps, float(np.mean(losses)))
        if (cfg.max_steps and run.step >= cfg.max_steps) or (
                cfg.time_budget_s and time.time() - run.t0 > cfg.time_budget_s):
            return losses, True
    return losses, False


def _report(progress: Progress, rec: EpochRecord, total_steps: int) -> None:
    if isinstance(progress, ProgressBar):
        progress.epoch(rec, total_steps)
    elif progress is not None:
        progress(rec)


def _distill(teacher: nn.Module, student: nn.Module, train: CalibrationSet,
             cfg: DistillConfig, val: CalibrationSet | None, progress: Progress
             ) -> tuple[nn.Module, dict[str, Any]]:
    student, run = _prepare(teacher, student, train, cfg)
    hist: dict[str, Any] = {"config": cfg.to_dict(), "epochs": []}
    best_state, best_acc = None, -1.0
    if val is not None:
        best_acc = accuracy(student, val)
        best_state = copy.deepcopy(student.state_dict())
        hist["val_accuracy_start"] = best_acc
    run.t0 = time.time()
    for epoch in range(cfg.epochs):
        losses, stop = _epoch(teacher, student, train, cfg, run, progress)
        rec = EpochRecord(epoch + 1, cfg.epochs, run.step,
                          float(np.mean(losses)) if losses else None,
                          round(time.time() - run.t0, 1))
        if val is not None:
            acc = accuracy(student, val)
            if acc >= best_acc:
                best_acc, best_state = acc, copy.deepcopy(student.state_dict())
            rec.val_accuracy, rec.best_val_accuracy = acc, best_acc
        hist["epochs"].append(rec.to_dict())
        _report(progress, rec, run.total_steps)
        if stop:
            break
    if best_state is not None:
        student.load_state_dict(best_state)
        hist["val_accuracy_best"] = best_acc
    for p in student.parameters():
        p.requires_grad_(True)
    return student.eval(), hist
