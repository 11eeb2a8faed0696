"""Labelled plate crops for training: a folder named by plate text, or a ``file,text`` CSV.

Whatever cannot be used (an unreadable image, a label with characters outside the charset) is
skipped and *listed* with the reason in :attr:`CalibrationSet.skipped`; a source with no
usable plate at all is a :class:`DataError` that says what was wrong with its files. Images
are decoded once and kept in memory at their original size (augmentation warps them before
the runtime's 94x24 resize). The evaluation split is refused (:func:`check_not_test`).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lprnet_edge.model.calib import CalibrationSet, check_not_test
from lprnet_edge.runtime.charset import Charset, load_charset
from lprnet_edge.runtime.dataset import PlateFolder
from lprnet_edge.runtime.errors import DataError, LprnetEdgeError
from lprnet_edge.runtime.preprocess import Preprocess, read_image

CSV_HEADER = ("file", "text")


def load_plates(source: str | Path, charset: Charset | None = None,
                test_dir: str | Path | None = None) -> CalibrationSet:
    """The usable plates of ``source`` (a folder, or a ``.csv`` of ``file,text`` rows whose
    paths are relative to the CSV), preprocessed and with their raw crops."""
    src = Path(source)
    cs = charset or load_charset()
    if src.is_file() and src.suffix.lower() == ".csv":
        rows, skipped = _csv_rows(src)
        root = src.parent
        for folder in sorted({(root / f).parent for f, _ in rows}):
            check_not_test(folder, test_dir)
        samples = _read_rows(root, rows, cs, skipped)
    elif src.is_dir():
        root = check_not_test(src, test_dir)
        pf = PlateFolder(root, cs, skip_bad=True)
        samples = [(s.path.name, s.label, s.image) for s in pf]
        skipped = list(pf.skipped)
    else:
        raise DataError(f"{src}: not a folder of plate images nor a .csv of file,text rows")
    if not samples:
        reasons = "; ".join(f"{Path(f).name}: {why}" for f, why in skipped[:3])
        raise DataError(f"{src}: no usable labelled plate image ({len(skipped)} skipped"
                        + (f": {reasons}" if reasons else "") + "). Name each crop by its "
                        "plate text (京PL3N67.jpg) or list them in a CSV of file,text rows")
    names, labels, raw = (list(v) for v in zip(*samples, strict=True))
    x = Preprocess().batch(raw)
    return CalibrationSet(x, labels, names, root, raw, skipped=tuple(skipped))


def _csv_rows(path: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rows, skipped = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for n, row in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in row]
            if not any(cells) or (n == 1 and tuple(c.lower() for c in cells) == CSV_HEADER):
                continue
            if len(cells) != 2 or not all(cells):
                skipped.append((f"{path}:{n}", f"expected 'file,text', got {row!r}"))
                continue
            rows.append((cells[0], cells[1]))
    return rows, skipped


def _read_rows(root: Path, rows: Iterable[tuple[str, str]], cs: Charset,
               skipped: list[tuple[str, str]]) -> list[tuple[str, str, np.ndarray]]:
    out = []
    for name, label in rows:
        try:
            cs.encode(label)
            out.append((name, label, read_image(root / name)))
        except LprnetEdgeError as e:
            skipped.append((str(root / name), str(e).removeprefix(f"{root / name}: ")))
    return out


def files_sha256(data: CalibrationSet) -> str:
    """One digest of the data as trained on: each file's name, label and bytes, in order."""
    h = hashlib.sha256()
    for name, label in zip(data.names, data.labels, strict=True):
        digest = hashlib.sha256(Path(data.root or ".", name).read_bytes()).hexdigest()
        h.update(f"{name}\t{label}\t{digest}\n".encode())
    return h.hexdigest()


def describe_skipped(skipped: Iterable[tuple[str, str]]) -> list[str]:
    """``file: why`` lines for the CLI and the record."""
    return [f"{Path(f).name}: {why}" for f, why in skipped]
