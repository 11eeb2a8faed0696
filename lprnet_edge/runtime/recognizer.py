"""The on-device API: ``Recognizer.from_artifact(path).recognize(images)``.

Needs numpy, OpenCV and the TVM runtime only. Images run one at a time (batch 1), which is
how LPRNet's batch-wide normalisation is defined and how the accuracy figures are measured.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.runtime.artifact import read_manifest, verify
from lprnet_edge.runtime.backends import Backend, load_backend
from lprnet_edge.runtime.charset import Charset
from lprnet_edge.runtime.decode import decode_text
from lprnet_edge.runtime.errors import DataError
from lprnet_edge.runtime.preprocess import Preprocess, read_image
from lprnet_edge.runtime.timing import summarize

ImageLike = str | Path | np.ndarray


@dataclass(frozen=True)
class PlateResult:
    text: str
    confidence: float  # probability of the least certain character (0 for an empty read)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "confidence": self.confidence, "source": self.source}


class Recognizer:
    """Plate reader: preprocessing + a backend + greedy CTC decoding."""

    def __init__(self, backend: Backend, charset: Charset, preprocess: Preprocess | None = None,
                 manifest: dict[str, Any] | None = None, path: Path | None = None) -> None:
        self.backend = backend
        self.charset = charset
        self.preprocess = preprocess or Preprocess()
        self.manifest = manifest or {}
        self.path = path

    @classmethod
    def from_artifact(cls, path: str | Path, num_threads: int | None = None) -> Recognizer:
        """Load an artifact directory after checking its schema, checksums and architecture."""
        root = Path(path)
        manifest = verify(root, read_manifest(root))
        return cls(
            load_backend(root, manifest, num_threads),
            Charset.from_dict(manifest["charset"]),
            Preprocess.from_dict(manifest["preprocess"]),
            manifest,
            root,
        )

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def logits(self, image: ImageLike) -> np.ndarray:
        """Raw ``(classes, time)`` logits of one image."""
        return self.backend(self.preprocess(_load(image)))[0]

    def recognize(self, images: ImageLike | Sequence[ImageLike]
                  ) -> PlateResult | list[PlateResult]:
        """Read one image (path or BGR array) or a list of them; a list gives a list."""
        if isinstance(images, (str, Path, np.ndarray)):
            return self._one(images)
        return [self._one(im) for im in images]

    def _one(self, image: ImageLike) -> PlateResult:
        text, conf = decode_text(self.logits(image), self.charset.chars, self.charset.blank)
        return PlateResult(text, conf, str(image) if isinstance(image, (str, Path)) else "")

    def benchmark(self, image: ImageLike | None = None, runs: int = 100, warmup: int = 10,
                  include_preprocess: bool = True) -> dict[str, Any]:
        """Latency percentiles and throughput at batch 1 (``include_preprocess``: resize,
        normalise and decode are timed too, as a deployed reader pays them)."""
        if runs < 1 or warmup < 0:
            raise DataError("runs must be >= 1 and warmup >= 0")
        img = _load(image) if image is not None else _synthetic_plate(self.preprocess)
        x = self.preprocess(img)

        def step() -> None:
            if include_preprocess:
                self._one(img)
            else:
                self.backend(x)

        for _ in range(warmup):
            step()
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
        stats = summarize(samples)
        stats.update(backend=self.backend.name, include_preprocess=include_preprocess,
                     warmup=warmup)
        return stats


def _load(image: ImageLike) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        return image
    raise DataError(f"expected an image path or a BGR numpy array, got {type(image).__name__}")


def _synthetic_plate(pre: Preprocess) -> np.ndarray:
    """A deterministic plate-sized image, for benchmarks run without a test image."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(pre.height, pre.width, 3), dtype=np.uint8)
