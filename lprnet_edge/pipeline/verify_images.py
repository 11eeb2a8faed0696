"""The host's half of the on-device image check: raw calib/ plates and the host's reading of them.

The device repeats each reading from the same bytes (:mod:`lprnet_edge.runtime.imagecheck`)
and ``deploy`` refuses to switch unless every stage agrees, so the check covers what
``verify.npz`` cannot: decoding and resizing on the board's CPU. Only images whose size is not
the model's are taken (a plate already at 94x24 skips the resize, the step most likely to
differ), and only from ``calib/``: the check decides pass or fail, so never ``test/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.model.calib import check_not_test
from lprnet_edge.paths import data_subdir
from lprnet_edge.runtime.charset import Charset
from lprnet_edge.runtime.dataset import IMAGE_SUFFIXES
from lprnet_edge.runtime.decode import decode_text
from lprnet_edge.runtime.errors import LprnetEdgeError
from lprnet_edge.runtime.imagecheck import ImageCheckSet, write_image_check
from lprnet_edge.runtime.preprocess import PREPROCESS_VERSION, Preprocess, decode_image

CHECK_IMAGES = 8
Logits = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class StoredImageCheck:
    """What went into the artifact: ``files`` to list in the manifest (empty if none)."""

    status: str  # "stored" or "absent"
    files: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    data: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"status": self.status, "files": list(self.files),
                             "images": list(self.images), "texts": list(self.texts),
                             "preprocess_version": PREPROCESS_VERSION}
        d.update({k: v for k, v in (("data", self.data), ("reason", self.reason)) if v})
        return d


def resized_plates(folder: Path, n: int, pre: Preprocess | None = None
                   ) -> list[tuple[str, bytes]]:
    """The first ``n`` readable images of ``folder`` (name order) that need resizing."""
    pre = pre or Preprocess()
    out: list[tuple[str, bytes]] = []
    for p in sorted(folder.iterdir()):
        if len(out) >= n:
            break
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        data = p.read_bytes()
        try:
            shape = decode_image(data, str(p)).shape
        except LprnetEdgeError:
            continue
        if shape[:2] != (pre.height, pre.width):
            out.append((p.name, data))
    return out


def image_check_set(plates: list[tuple[str, bytes]], logits: Logits, charset: Charset,
                    pre: Preprocess | None = None) -> ImageCheckSet:
    """The host's reading of each plate, from its bytes, by the runtime's own functions."""
    pre = pre or Preprocess()
    xs = [pre(decode_image(data, name)) for name, data in plates]
    ys = [np.asarray(logits(x), dtype=np.float32) for x in xs]
    texts = tuple(decode_text(y[0], charset.chars, charset.blank)[0] for y in ys)
    return ImageCheckSet(names=tuple(n for n, _ in plates), images=tuple(d for _, d in plates),
                         tensors=np.concatenate(xs), logits=np.concatenate(ys), texts=texts,
                         preprocess_version=PREPROCESS_VERSION)


def store_image_check(root: Path, logits: Logits, charset: Charset,
                      calib_dir: Path | None = None, n: int = CHECK_IMAGES) -> StoredImageCheck:
    """Write ``check_images.npz`` into the staged artifact ``root`` from ``n`` calib/ plates
    read by ``logits`` (the host's reference model: preprocessed tensor -> logits)."""
    folder = Path(calib_dir) if calib_dir else data_subdir("calib")
    if calib_dir:
        check_not_test(folder)
    plates = resized_plates(folder, n) if folder is not None and folder.is_dir() else []
    if not plates:
        return StoredImageCheck("absent", reason="no calib/ images that need resizing (set "
                                                 "LPRNET_EDGE_DATA or --calib)")
    check = image_check_set(plates, logits, charset)
    name = write_image_check(root, check)
    return StoredImageCheck("stored", (name,), check.names, check.texts, str(folder))
