"""Accuracy of a Recognizer on a labelled folder, at batch size 1 (runtime side, no torch)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lprnet_edge.runtime.dataset import PlateFolder
from lprnet_edge.runtime.decode import decode_text
from lprnet_edge.runtime.metrics import Accumulator, EvalResult
from lprnet_edge.runtime.recognizer import Recognizer


def evaluate(rec: Recognizer, data: str | Path, skip_bad: bool = False, limit: int | None = None,
             progress: Callable[[int, int], None] | None = None,
             reads: dict[str, str] | None = None) -> EvalResult:
    """Exact-match accuracy and friends of ``rec`` on the plates of ``data``.

    With ``skip_bad`` the result's ``skipped`` lists each skipped file and why. ``reads``, if
    given, receives every file name's text (to compare two machines read for read)."""
    folder = PlateFolder(Path(data), rec.charset, skip_bad=skip_bad, limit=limit)
    acc = Accumulator(rec.charset)
    total = len(folder)
    for i, sample in enumerate(folder, 1):
        text, _ = decode_text(rec.logits(sample.image), rec.charset.chars, rec.charset.blank)
        acc.add(sample.label, text, sample.path.name)
        if reads is not None:
            reads[sample.path.name] = text
        if progress:
            progress(i, total)
    return acc.result(skipped=folder.skipped)
