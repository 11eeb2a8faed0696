"""Where a converted model lives: one cache entry per weights file, converter and format.

ONNX, ncnn and LiteRT exports are each made once per weights file and reused, keyed by the
weights' sha256, so a peer timed beside an artifact is provably the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lprnet_edge.model.weights import resolve_weights
from lprnet_edge.paths import cache_dir
from lprnet_edge.runtime.files import sha256_file


@dataclass(frozen=True)
class ExportedFile:
    """A converted model: its file, the weights it came from and their sha256; ``cached``:
    reused from an earlier conversion."""

    path: Path
    weights: Path
    weights_sha256: str
    cached: bool


@dataclass(frozen=True)
class ExportPlace:
    """The resolved weights and the cache folder and file stem their conversion goes to."""

    weights: Path
    weights_sha256: str
    folder: Path
    stem: str

    def file(self, suffix: str) -> Path:
        return self.folder / f"{self.stem}{suffix}"


def export_place(weights: str | Path | None, cache: str | Path | None, kind: str,
                 num_classes: int, version: str) -> ExportPlace:
    """``weights`` resolved like every command; ``cache`` (default ``cache_dir()/kind``)."""
    src = resolve_weights(weights)
    sha = sha256_file(src)
    folder = Path(cache) if cache else cache_dir() / kind
    return ExportPlace(src, sha, folder, f"lprnet-{sha[:16]}-c{num_classes}-{version}")
