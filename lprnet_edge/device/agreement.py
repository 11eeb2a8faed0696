"""Does the board read what the host reads? Read-for-read comparison, and the deploy's verdict.

Accuracy is measured on the host; a board is only as good as that figure if it gives the same
text for the same image. ``remote eval/recognize --compare-host`` pair each device read with
the host's (:func:`compare_reads`); ``deploy`` refuses a board whose reading of the artifact's
raw check images differs from the host's at any stage (:func:`require_images_agree`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lprnet_edge.runtime.errors import ArtifactError
from lprnet_edge.runtime.evaluate import evaluate
from lprnet_edge.runtime.recognizer import Recognizer


@dataclass(frozen=True)
class Read:
    """One image's text on the host and on the device (None: not read there)."""

    name: str
    host: str | None
    device: str | None

    @property
    def same(self) -> bool:
        return self.host is not None and self.host == self.device

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "device": self.device, "same": self.same}


@dataclass(frozen=True)
class Agreement:
    """Every image's pair of reads, and how many differ."""

    reads: tuple[Read, ...]
    host_reader: str  # what read on the host (backend name)

    @property
    def differ(self) -> int:
        return sum(not r.same for r in self.reads)

    def to_dict(self) -> dict[str, Any]:
        return {"images": len(self.reads), "differ": self.differ,
                "host_reader": self.host_reader, "reads": [r.to_dict() for r in self.reads]}


def compare_reads(host: Mapping[str, str], device: Mapping[str, str],
                  host_reader: str) -> Agreement:
    """Pair reads by image name (in name order); an image read on one side only differs."""
    names = sorted(set(host) | set(device))
    return Agreement(tuple(Read(n, host.get(n), device.get(n)) for n in names), host_reader)


def host_folder_reads(rec: Recognizer, folder: str | Path, skip_bad: bool = False,
                      limit: int | None = None) -> dict[str, str]:
    """File name -> text of every plate of ``folder`` read here, as ``remote eval`` reads it
    there (same folder walk, same skipping)."""
    reads: dict[str, str] = {}
    evaluate(rec, folder, skip_bad=skip_bad, limit=limit, reads=reads)
    return reads


def host_file_reads(rec: Recognizer, paths: Sequence[str | Path]) -> dict[str, str]:
    """Path -> text of each image read here, keyed as ``remote recognize`` keys its results
    (``str(Path(p))``)."""
    return {str(Path(p)): rec.recognize(str(p)).text for p in paths}


def require_images_agree(images: dict[str, Any] | None, where: str,
                         previous: str | None) -> None:
    """Raise unless the device read the artifact's raw check images as the host did
    (:mod:`lprnet_edge.runtime.imagecheck`), naming the first stage that differs."""
    if not images or images.get("status") != "failed":
        return
    stage, first = images.get("stage"), images.get("first") or {}
    name, host, dev = first.get("name"), first.get("host_text"), first.get("device_text")
    why = {
        "preprocess": f"the board's preprocessing differs from the host's: {name} gives a "
                      f"different input tensor ({first.get('values_differ')} values differ; "
                      f"{images.get('tensors_differ')} of {images.get('images')} images), "
                      "so the board would not read plates as the host measured them. Its "
                      "OpenCV or numpy decodes or resizes differently: compare their versions "
                      "(lprnet-edge remote info) with the build host's",
        "model": f"the compiled model is wrong on this device: |logit diff| "
                 f"{first.get('logit_diff')} > tolerance {images.get('tolerance')} on {name} "
                 "(a bad tuning record or toolchain); rebuild it (e.g. without --tune)",
        "decode": f"the text differs although the logits agree within tolerance: {name} "
                  f"reads {dev!r} on the device, {host!r} on the host",
    }.get(str(stage), f"unknown stage {stage!r}")
    stays = f"{Path(previous).name} stays current" if previous else "Nothing was deployed"
    raise ArtifactError(f"check on {where} failed at stage '{stage}' (raw image -> text, "
                        f"host {host!r}, device {dev!r}): {why}. {stays}")
