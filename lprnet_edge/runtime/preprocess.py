"""Image loading and preprocessing shared by every backend (numpy + OpenCV only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from lprnet_edge.runtime.errors import DataError


@dataclass(frozen=True)
class Preprocess:
    """LPRNet's input convention: BGR, resized to 94x24, ``(x - 127.5) * 0.0078125``, NCHW."""

    width: int = 94
    height: int = 24
    mean: float = 127.5
    scale: float = 0.0078125
    color: str = "BGR"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(**{k: d[k] for k in ("width", "height", "mean", "scale", "color") if k in d})

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One BGR uint8 HxWx3 image -> float32 1x3xHxW tensor."""
        image = check_image(image)
        if image.shape[:2] != (self.height, self.width):
            image = cv2.resize(image, (self.width, self.height))
        x = (image.astype(np.float32) - np.float32(self.mean)) * np.float32(self.scale)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def check_image(image: np.ndarray) -> np.ndarray:
    """Accept HxWx3 BGR (or HxW grey) arrays; reject anything else with a clear message."""
    if not isinstance(image, np.ndarray):
        raise DataError(f"expected a numpy image array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)) \
            or image.size == 0:
        raise DataError(f"expected an HxWx3 BGR image, got an array of shape {image.shape}")
    if image.dtype.kind not in "iuf":
        raise DataError(f"expected an image of numbers, got dtype {image.dtype}")
    if image.dtype != np.uint8:
        # OpenCV's colour conversions do not take every dtype: convert first.
        image = np.clip(np.nan_to_num(image), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as BGR uint8; works with non-ASCII file names (plate texts)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such image file")
    data = np.fromfile(str(p), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise DataError(f"{p}: not a readable image (corrupt or unsupported format)")
    return image
