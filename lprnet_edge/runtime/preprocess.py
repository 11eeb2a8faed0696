"""Image loading and preprocessing shared by every backend (numpy + OpenCV only).

The tensor must be the same, bit for bit, on every CPU the artifact runs on, or the board reads
plates differently from the host that measured the accuracy. Two steps could differ:

- the resize: OpenCV's default ``INTER_LINEAR`` (and ``INTER_AREA``) take different SIMD paths on
  x86 and aarch64 with different rounding; ``INTER_LINEAR_EXACT`` is OpenCV's fixed-point
  bilinear resize, specified to give the same bytes on every platform;
- the normalisation: a 256-entry float32 table indexed by the uint8 pixel, computed once in
  float64 and rounded once, so no CPU's float rounding or fused multiply-add enters.

:data:`PREPROCESS_VERSION` names this recipe in the manifest; an artifact measured with another
recipe is refused (:func:`check_version`), since its recorded accuracy and check tensors no
longer describe what this runtime feeds the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lprnet_edge.runtime.errors import ArtifactError, DataError

# 1: INTER_LINEAR resize, float arithmetic (differs between x86 and aarch64).
# 2: INTER_LINEAR_EXACT resize, float32 lookup table from uint8.
PREPROCESS_VERSION = 2
RESIZE = cv2.INTER_LINEAR_EXACT


@dataclass(frozen=True)
class Preprocess:
    """LPRNet's input convention: BGR, resized to 94x24, ``(x - 127.5) * 0.0078125``, NCHW
    (bit-exact across CPUs: see the module docstring)."""

    width: int = 94
    height: int = 24
    mean: float = 127.5
    scale: float = 0.0078125
    color: str = "BGR"

    def to_dict(self) -> dict:
        return {**asdict(self), "version": PREPROCESS_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(**{k: d[k] for k in ("width", "height", "mean", "scale", "color") if k in d})

    def __call__(self, image: np.ndarray, value_range: ValueRange | None = None) -> np.ndarray:
        """One image (see :func:`check_image`) -> float32 1x3xHxW tensor."""
        return self.batch([image], value_range)

    def batch(self, images: Sequence[np.ndarray], value_range: ValueRange | None = None
              ) -> np.ndarray:
        """Images -> one float32 Nx3xHxW tensor: resized one by one, normalised at once."""
        out = np.empty((len(images), self.height, self.width, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            out[i] = self.resize(check_image(image, value_range))
        x = self.table()[out]
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def resize(self, image: np.ndarray) -> np.ndarray:
        """A uint8 BGR image at the model's size, by the bit-exact fixed-point resize."""
        if image.shape[:2] == (self.height, self.width):
            return image
        return cv2.resize(image, (self.width, self.height), interpolation=RESIZE)

    def table(self) -> np.ndarray:
        """float32 value of each uint8 pixel: ``(v - mean) * scale`` in float64, rounded once."""
        return ((np.arange(256, dtype=np.float64) - self.mean) * self.scale).astype(np.float32)


def check_version(d: dict) -> None:
    """Refuse a manifest's ``preprocess`` block written with another preprocessing recipe."""
    version = d.get("version", 1)
    if version != PREPROCESS_VERSION:
        raise ArtifactError(
            f"manifest: preprocess version {version!r}, this runtime preprocesses with version "
            f"{PREPROCESS_VERSION} (bit-exact resize): the artifact's recorded accuracy and "
            "device check were made with other input tensors; rebuild it with this "
            "lprnet-edge (lprnet-edge build)")


ValueRange = tuple[float, float]
VALUE_RANGES = ((0, 1), (0, 255))
EXPECTED = ("a uint8 BGR image (HxWx3; also HxW or HxWx1 grey, HxWx4 BGRA, uint16, or "
            "float32/float64 with value_range=(0, 1) or (0, 255))")


def check_image(image: Any, value_range: ValueRange | None = None) -> np.ndarray:
    """Any accepted image -> uint8 BGR HxWx3; :class:`DataError` naming what was expected.

    Accepted: uint8 BGR HxWx3 as is; grey HxW or HxWx1 (replicated); BGRA HxWx4 (alpha
    dropped); uint16 (scaled by 1/257, 65535 -> 255). Float images only with their range
    declared, ``value_range=(0, 1)`` or ``(0, 255)``: a float image's scale cannot be guessed
    (a [0, 1] image read as [0, 255] is black and still gives a confident wrong plate). NaN or
    inf, values outside the declared range, other dtypes and shapes are refused.
    """
    if not isinstance(image, np.ndarray):
        raise DataError(f"expected {EXPECTED}, got {type(image).__name__}")
    if image.size == 0:
        raise DataError(f"expected {EXPECTED}, got an empty array of shape {image.shape}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise DataError(f"expected {EXPECTED}, got an array of shape {image.shape}")
    image = _to_uint8(image, value_range)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _to_uint8(image: np.ndarray, value_range: ValueRange | None) -> np.ndarray:
    kind = image.dtype
    if value_range is not None and (kind.kind != "f" and not (kind == np.uint8 and tuple(
            value_range) == (0, 255))):
        raise DataError(f"value_range applies to float images (got {kind} with value_range="
                        f"{value_range!r}): pass uint8/uint16 images without it")
    if kind == np.uint8:
        return image
    if kind == np.uint16:
        return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if kind in (np.float32, np.float64):
        if value_range is None:
            raise DataError(f"a {kind} image needs its value range declared: "
                            "recognize(img, value_range=(0, 1)) or value_range=(0, 255)")
        lo, hi = _range(value_range)
        if not np.isfinite(image).all():
            raise DataError("the image has NaN or infinite values")
        if image.min() < lo or image.max() > hi:
            raise DataError(f"image values span [{image.min():g}, {image.max():g}], outside the "
                            f"declared value_range ({lo:g}, {hi:g})")
        scaled = image.astype(np.float64) * (255.0 / hi)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    raise DataError(f"expected {EXPECTED}, got dtype {kind}")


def _range(value_range: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if (lo, hi) not in VALUE_RANGES:
        raise DataError(f"value_range must be (0, 1) or (0, 255), got {value_range!r}")
    return lo, hi


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as BGR uint8; works with non-ASCII file names (plate texts)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such image file")
    return decode_image(np.fromfile(str(p), dtype=np.uint8), str(p))


def decode_image(data: bytes | np.ndarray, what: str = "image") -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> BGR uint8, as :func:`read_image` reads a file."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is None:
        raise DataError(f"{what}: not a readable image (corrupt or unsupported format)")
    return image
