"""A folder of plate crops named by their text (``京PL3N67.jpg``, ``京PL3N67_2.jpg``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lprnet_edge.runtime.charset import Charset
from lprnet_edge.runtime.errors import DataError, LprnetEdgeError
from lprnet_edge.runtime.preprocess import read_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
_SUFFIX = re.compile(r"[-_].*$")


def label_from_name(path: Path) -> str:
    """Plate text of a file: its stem, minus anything after the first ``-`` or ``_``."""
    return _SUFFIX.sub("", path.stem)


@dataclass
class PlateSample:
    path: Path
    label: str
    image: np.ndarray


@dataclass
class PlateFolder:
    """Labelled plate images of one folder, in sorted order.

    With ``skip_bad=True`` unreadable images and unknown characters are skipped and counted in
    ``skipped``; otherwise the first one raises a :class:`DataError` naming the file.
    """

    root: Path
    charset: Charset
    skip_bad: bool = False
    limit: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder of plate images")
        files = sorted(p for p in self.root.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        for p in files:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                self._bad(p, f"not an image file (suffix {p.suffix or 'none'})")
        if not images:
            raise DataError(f"{self.root}: no plate images (*.jpg, *.png, ...) found")
        self.paths = images[: self.limit] if self.limit else images
        self._listing_skips = list(self.skipped)

    def _bad(self, path: Path, why: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{path}: {why} (use --skip-bad to skip such files)")
        self.skipped.append((str(path), why))

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[PlateSample]:
        self.skipped = list(self._listing_skips)  # a second pass must not count twice
        for p in self.paths:
            label = label_from_name(p)
            try:
                if not label:
                    raise DataError(f"{p}: no plate text in the file name")
                self.charset.encode(label)
                image = read_image(p)
            except LprnetEdgeError as e:
                self._bad(p, str(e).removeprefix(f"{p}: "))
                continue
            yield PlateSample(p, label, image)
