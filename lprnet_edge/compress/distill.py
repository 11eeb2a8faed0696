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
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lprnet_edge.model.calib import CalibrationSet, accuracy, forward_per_sample
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


def augment_image(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small random affine + brightness/contrast jitter + occasional blur of a BGR crop."""
    h, w = img.shape[:2]
    angle = rng.uniform(-3.0, 3.0)
    scale = rng.uniform(0.95, 1.05)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (rng.uniform(-0.03, 0.03) * w, rng.uniform(-0.06, 0.06) * h)
    out = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    alpha = rng.uniform(0.8, 1.2)
    beta = rng.uniform(-20, 20)
    out = np.clip(out.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (3, 3), rng.uniform(0.3, 1.0))
    return out


def _batch_x(data: CalibrationSet, idx: np.ndarray, rng: np.random.Generator | None
             ) -> torch.Tensor:
    if rng is None or data.raw is None:
        return torch.from_numpy(data.x[idx])
    pre = Preprocess()
    return torch.from_numpy(np.concatenate([pre(augment_image(data.raw[i], rng)) for i in idx]))


def _targets(data: CalibrationSet, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    cs = load_charset()
    seqs = [cs.encode(data.labels[i]) for i in idx]
    return (torch.tensor([c for s in seqs for c in s], dtype=torch.long),
            torch.tensor([len(s) for s in seqs], dtype=torch.long))


def distill_loss(s: torch.Tensor, t: torch.Tensor, cfg: DistillConfig,
                 targets: tuple[torch.Tensor, torch.Tensor] | None = None, blank: int = 67
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Student logits ``s`` and teacher logits ``t``: (N, classes, time)."""
    parts: dict[str, torch.Tensor] = {}
    temp = cfg.temperature
    if cfg.kd_weight:
        kl = F.kl_div(F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1),
                      log_target=True, reduction="none").sum(1).mean()
        parts["kd"] = cfg.kd_weight * temp * temp * kl
    if cfg.mse_weight:
        parts["mse"] = cfg.mse_weight * F.mse_loss(s, t)
    if cfg.ctc_weight and targets is not None:
        lp = F.log_softmax(s, dim=1).permute(2, 0, 1)  # (T, N, C)
        n, steps = s.shape[0], s.shape[2]
        parts["ctc"] = cfg.ctc_weight * F.ctc_loss(
            lp, targets[0], torch.full((n,), steps, dtype=torch.long), targets[1],
            blank=blank, reduction="mean", zero_infinity=True)
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def distill(teacher: nn.Module, student: nn.Module, train: CalibrationSet,
            cfg: DistillConfig | None = None, val: CalibrationSet | None = None,
            progress: Callable[[dict[str, Any]], None] | None = print,
            ) -> tuple[nn.Module, dict[str, Any]]:
    """Train a copy of ``student`` to match ``teacher`` on ``train``; returns it + history.

    The best epoch on ``val`` (agreement-free accuracy on its labels) is kept when ``val`` is
    given; otherwise the last one.
    """
    cfg = cfg or DistillConfig()
    if cfg.augment:
        train.ensure_raw()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(student)
    student.eval()  # BN frozen, dropout off
    freeze_bn(student)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train)
    steps_per_epoch = max(1, (n + cfg.batch_size - 1) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    blank = load_charset().blank
    hist: dict[str, Any] = {"config": cfg.to_dict(), "epochs": []}
    best_state, best_acc = None, -1.0
    if val is not None:
        best_acc = accuracy(student, val)
        best_state = copy.deepcopy(student.state_dict())
        hist["val_accuracy_start"] = best_acc
    step = 0
    t0 = time.time()
    stop = False
    for epoch in range(cfg.epochs):
        perm = rng.permutation(n)
        losses = []
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = _batch_x(train, idx, rng if cfg.augment else None)
            with torch.no_grad():
                t = forward_per_sample(teacher, x)
            s = forward_per_sample(student, x)
            loss, _parts = distill_loss(s, t, cfg, _targets(train, idx), blank)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss))
            step += 1
            if (cfg.max_steps and step >= cfg.max_steps) or (
                    cfg.time_budget_s and time.time() - t0 > cfg.time_budget_s):
                stop = True
                break
        rec: dict[str, Any] = {"epoch": epoch + 1, "steps": step,
                               "loss": float(np.mean(losses)) if losses else None,
                               "elapsed_s": round(time.time() - t0, 1)}
        if val is not None:
            acc = accuracy(student, val)
            rec["val_accuracy"] = acc
            if acc >= best_acc:
                best_acc, best_state = acc, copy.deepcopy(student.state_dict())
        hist["epochs"].append(rec)
        if progress:
            progress(rec)
        if stop:
            break
    if best_state is not None:
        student.load_state_dict(best_state)
        hist["val_accuracy_best"] = best_acc
    for p in student.parameters():
        p.requires_grad_(True)
    return student.eval(), hist
