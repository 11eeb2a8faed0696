"""Photometric and geometric augmentation of plate crops, before the 94x24 resize (host side).

Applied to the original-resolution BGR crop, so a warp or blur sees the pixels a camera gave
and the resize that follows is the runtime's own. Every draw comes from the caller's
``numpy.random.Generator``: a seed makes a whole training run reproducible. Effects that are
off draw nothing, so :data:`LIGHT` (what distillation uses) keeps its exact random stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each effect; 0 (or a probability of 0) turns it off."""

    rotate_deg: float = 3.0  # small affine: rotation, scale, shift
    scale: float = 0.05
    shift_x: float = 0.03  # fraction of the width
    shift_y: float = 0.06  # fraction of the height
    contrast: float = 0.2  # x in [1 - c, 1 + c]
    brightness: float = 20.0  # +- grey levels
    blur_p: float = 0.3  # Gaussian blur, sigma in [0.3, 1.0]
    perspective: float = 0.0  # corner displacement, fraction of each side
    noise_sigma: float = 0.0  # Gaussian noise, up to this many grey levels
    colour: float = 0.0  # per-channel gain in [1 - c, 1 + c]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


LIGHT = AugmentConfig()
PLATES = AugmentConfig(rotate_deg=4.0, scale=0.06, shift_x=0.04, shift_y=0.08, contrast=0.3,
                       brightness=30.0, blur_p=0.3, perspective=0.06, noise_sigma=6.0,
                       colour=0.12)


def augment_image(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = LIGHT
                  ) -> np.ndarray:
    """A randomly altered copy of the BGR crop ``img`` (same size, uint8)."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-cfg.rotate_deg, cfg.rotate_deg),
                                rng.uniform(1 - cfg.scale, 1 + cfg.scale))
    m[:, 2] += (rng.uniform(-cfg.shift_x, cfg.shift_x) * w,
                rng.uniform(-cfg.shift_y, cfg.shift_y) * h)
    out = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    if cfg.perspective:
        out = _perspective(out, rng, cfg.perspective)
    alpha = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    beta = rng.uniform(-cfg.brightness, cfg.brightness)
    f = out.astype(np.float32) * alpha + beta
    if cfg.colour:
        f *= rng.uniform(1 - cfg.colour, 1 + cfg.colour, size=3).astype(np.float32)
    if cfg.noise_sigma:
        f += rng.normal(0, rng.uniform(0, cfg.noise_sigma), size=f.shape).astype(np.float32)
    out = np.clip(f, 0, 255).astype(np.uint8)
    if rng.random() < cfg.blur_p:
        out = cv2.GaussianBlur(out, (3, 3), rng.uniform(0.3, 1.0))
    return out


def _perspective(img: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Each corner moved by up to ``amount`` of the side: a plate seen slightly off-axis."""
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
    jitter = rng.uniform(-amount, amount, size=(4, 2)) * np.float32([w, h])
    m = cv2.getPerspectiveTransform(src, (src + jitter).astype(np.float32))
    return cv2.warpPerspective(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
