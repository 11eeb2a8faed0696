"""The on-device API: ``Recognizer.from_artifact(path).recognize(images)``.

Needs numpy, OpenCV and the TVM runtime only. Images run one at a time through the model
(batch 1), which is how LPRNet's batch-wide normalisation is defined and how the accuracy
figures are measured; a list is preprocessed in one vectorised step. Thread-safe (see
:class:`Recognizer`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.runtime.artifact import Artifact, Manifest
from lprnet_edge.runtime.backends import Backend, load_backend
from lprnet_edge.runtime.charset import Charset
from lprnet_edge.runtime.decode import decode_text
from lprnet_edge.runtime.errors import DataError
from lprnet_edge.runtime.preprocess import Preprocess, ValueRange, read_image
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
    """Plate reader: preprocessing + a backend + greedy CTC decoding.

    Thread-safe: one Recognizer may be shared by any number of threads, and concurrent
    ``recognize()`` calls give exactly the sequential results. The TVM backend gives each
    thread its own Relax VM over the one loaded module and the one copy of the weights
    (:class:`~lprnet_edge.runtime.backends.TvmBackend`); preprocessing and decoding keep no
    state. A second thread costs one VM's working memory, not a second model.

    Inputs: an image path, or a numpy image (uint8 BGR HxWx3; grey, BGRA and uint16 are
    converted; float32/float64 only with ``value_range=(0, 1)`` or ``(0, 255)``), or a list or
    tuple of them. See :func:`lprnet_edge.runtime.preprocess.check_image`.
    """

    def __init__(self, backend: Backend, charset: Charset, preprocess: Preprocess | None = None,
                 artifact: Artifact | None = None) -> None:
        self.backend = backend
        self.charset = charset
        self.preprocess = preprocess or Preprocess()
        self.artifact = artifact

    @classmethod
    def from_artifact(cls, path: str | Path | Artifact, num_threads: int | None = None
                      ) -> Recognizer:
        """Load an artifact directory after checking its schema, checksums and architecture
        (an :class:`Artifact` already opened is used as is)."""
        art = path if isinstance(path, Artifact) else Artifact.open(path)
        m = art.manifest
        return cls(load_backend(art, num_threads), m.charset, m.preprocess, art)

    @property
    def path(self) -> Path | None:
        return self.artifact.root if self.artifact else None

    @property
    def manifest(self) -> Manifest | None:
        return self.artifact.manifest if self.artifact else None

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def logits(self, image: ImageLike, value_range: ValueRange | None = None) -> np.ndarray:
        """Raw ``(classes, time)`` logits of one image."""
        return self.backend(self.preprocess(_load(image), value_range))[0]

    def recognize(self, images: ImageLike | Sequence[ImageLike],
                  value_range: ValueRange | None = None) -> PlateResult | list[PlateResult]:
        """Read one image (path or array) or a list/tuple of them; a list gives a list.

        ``value_range``: the range of float images, ``(0, 1)`` or ``(0, 255)`` (required for
        them, refused for integer images).
        """
        if isinstance(images, (str, Path, np.ndarray)):
            return self.recognize_batch([images], value_range)[0]
        if isinstance(images, (list, tuple)):
            return self.recognize_batch(images, value_range)
        raise DataError(f"expected an image path, a numpy image or a list of them, got "
                        f"{type(images).__name__}")

    def recognize_batch(self, images: Sequence[ImageLike],
                        value_range: ValueRange | None = None) -> list[PlateResult]:
        """Read a list of images: loading and checking first (a bad one raises before any
        inference), preprocessing as one vectorised step, then the model per plate (LPRNet's
        global-context normalisation is batch-wide, so batch 1 is its definition)."""
        if not isinstance(images, (list, tuple)):
            raise DataError(f"expected a list of images, got {type(images).__name__}")
        if not images:
            return []
        arrays = [_load(im) for im in images]
        xs = self.preprocess.batch(arrays, value_range)
        return [self._decode(self.backend(xs[i:i + 1])[0], im) for i, im in enumerate(images)]

    def _decode(self, logits: np.ndarray, image: ImageLike) -> PlateResult:
        text, conf = decode_text(logits, self.charset.chars, self.charset.blank)
        return PlateResult(text, conf, str(image) if isinstance(image, (str, Path)) else "")

    def _one(self, image: ImageLike) -> PlateResult:
        return self.recognize_batch([image])[0]

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


def _load(image: Any) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        return image
    raise DataError(f"expected an image path or a numpy image (uint8 BGR HxWx3), got "
                    f"{type(image).__name__}")


def _synthetic_plate(pre: Preprocess) -> np.ndarray:
    """A deterministic plate-sized image, for benchmarks run without a test image."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(pre.height, pre.width, 3), dtype=np.uint8)
