"""The on-device check from image bytes to plate text (numpy + OpenCV only).

``verify.npz`` (:mod:`lprnet_edge.runtime.selfcheck`) holds tensors the host already
preprocessed, so it proves the compiled model but not what the board feeds it: a resize that
rounds differently on the board's CPU passes it and still reads plates differently. So the
artifact also carries ``check_images.npz``: a few raw plate files (encoded bytes, of sizes that
need resizing), with what the host made of each at every stage: the preprocessed tensor, the
reference logits and the decoded text. :func:`check_images` repeats every stage on the device
from the bytes and names the first stage that differs:

- ``preprocess``: the device's tensor is not bit-identical to the host's (decode + resize +
  normalisation; preprocessing is specified to be exact, so no tolerance);
- ``model``: the logits are further from the host's than the build's tolerance;
- ``decode``: the texts differ although the logits are within tolerance.

The file format is numpy only (no pickle): the images as one uint8 blob with offsets, names and
texts as unicode arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.runtime.errors import ArtifactError
from lprnet_edge.runtime.files import read_npz

CHECK_FILE = "check_images.npz"
FORMAT = 1
STAGES = ("preprocess", "model", "decode")


@dataclass(frozen=True)
class ImageCheckSet:
    """Raw plate files and the host's reading of each (tensor, logits, text)."""

    names: tuple[str, ...]
    images: tuple[bytes, ...]
    tensors: np.ndarray  # (N, 3, H, W) float32, the host's preprocessing of each image
    logits: np.ndarray  # (N, C, T) float32, the host's reference model on those tensors
    texts: tuple[str, ...]  # greedy CTC decoding of ``logits``
    preprocess_version: int

    def __post_init__(self) -> None:
        n = len(self.names)
        if not n or not (len(self.images) == len(self.tensors) == len(self.logits)
                         == len(self.texts) == n):
            raise ArtifactError(f"image check set: {n} names, {len(self.images)} images, "
                                f"{len(self.tensors)} tensors, {len(self.logits)} logits, "
                                f"{len(self.texts)} texts (need the same N >= 1)")
        if self.tensors.ndim != 4 or self.logits.ndim != 3:
            raise ArtifactError("image check set: tensors must be (N, 3, H, W) and logits "
                                "(N, C, T)")

    def to_dict(self) -> dict[str, Any]:
        """What the set holds, for the manifest (the arrays stay in the file)."""
        return {"file": CHECK_FILE, "images": list(self.names), "texts": list(self.texts),
                "preprocess_version": self.preprocess_version}


def write_image_check(dest: str | Path, check: ImageCheckSet) -> str:
    """Write ``dest/check_images.npz``; returns the name to list in the manifest's files."""
    offsets = np.cumsum([0] + [len(b) for b in check.images], dtype=np.int64)
    blob = np.frombuffer(b"".join(check.images), dtype=np.uint8)
    with open(Path(dest) / CHECK_FILE, "wb") as f:
        np.savez_compressed(
            f, format=np.array(FORMAT, dtype=np.int32), names=np.array(check.names),
            blob=blob, offsets=offsets, tensors=check.tensors.astype(np.float32),
            logits=check.logits.astype(np.float32), texts=np.array(check.texts),
            preprocess_version=np.array(check.preprocess_version, dtype=np.int32))
    return CHECK_FILE


def read_image_check(path: str | Path) -> ImageCheckSet:
    """Load ``check_images.npz``; :class:`ArtifactError` if it is not one this runtime reads."""
    d, fmt = read_npz(path, "image check set")
    keys = ("names", "blob", "offsets", "tensors", "logits", "texts", "preprocess_version")
    if fmt != FORMAT or any(k not in d for k in keys):
        raise ArtifactError(f"{path}: image check set format {fmt!r} (this runtime reads "
                            f"{FORMAT} with {', '.join(keys)}); rebuild the artifact")
    off, blob = d["offsets"], d["blob"].tobytes()
    images = tuple(blob[int(a):int(b)] for a, b in zip(off[:-1], off[1:], strict=True))
    return ImageCheckSet(names=tuple(str(n) for n in d["names"]), images=images,
                         tensors=d["tensors"].astype(np.float32),
                         logits=d["logits"].astype(np.float32),
                         texts=tuple(str(t) for t in d["texts"]),
                         preprocess_version=int(d["preprocess_version"]))


@dataclass(frozen=True)
class ImageCheckResult:
    """The device's reading of the check images against the host's, stage by stage."""

    status: str  # "passed" or "failed"
    stage: str | None  # the first stage (in STAGES order) where some image differs
    images: int
    tensors_differ: int  # images whose tensor is not bit-identical
    max_abs_logit_diff: float | None  # None: non-finite logits
    logits_past_tolerance: int
    texts_differ: int
    tolerance: float
    first: dict[str, Any] | None  # the first differing image at ``stage``: name, host, device

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "stage": self.stage, "images": self.images,
                "tensors_differ": self.tensors_differ,
                "max_abs_logit_diff": self.max_abs_logit_diff,
                "logits_past_tolerance": self.logits_past_tolerance,
                "texts_differ": self.texts_differ, "tolerance": self.tolerance,
                "first": self.first}


Model = Callable[[np.ndarray], np.ndarray]


def check_images(check: ImageCheckSet, model: Model, tolerance: float,
                 chars: Sequence[str], blank: int, preprocess: Any = None) -> ImageCheckResult:
    """Read every check image from its bytes here (decode, preprocess, ``model``, CTC decode)
    and compare each stage with the host's: tensors exactly, logits within ``tolerance``,
    texts exactly. ``preprocess``: a :class:`~lprnet_edge.runtime.preprocess.Preprocess`
    (default: LPRNet's)."""
    from lprnet_edge.runtime.preprocess import PREPROCESS_VERSION, Preprocess, decode_image

    if check.preprocess_version != PREPROCESS_VERSION:
        raise ArtifactError(f"the image check set was made with preprocess version "
                            f"{check.preprocess_version}, this runtime uses "
                            f"{PREPROCESS_VERSION}; rebuild the artifact")
    pre = preprocess or Preprocess()
    rows = [_read_one(check, i, pre(decode_image(check.images[i], check.names[i])), model,
                      tolerance, chars, blank) for i in range(len(check.names))]
    return _verdict(rows, tolerance)


def _read_one(check: ImageCheckSet, i: int, tensor: np.ndarray, model: Model,
              tolerance: float, chars: Sequence[str], blank: int) -> dict[str, Any]:
    """One image's comparison, stage by stage (the model runs on the device's own tensor)."""
    from lprnet_edge.runtime.decode import decode_text

    host_x = check.tensors[i][None]
    same = tensor.shape == host_x.shape and tensor.tobytes() == host_x.tobytes()
    differing = int(np.count_nonzero(tensor != host_x)) if tensor.shape == host_x.shape else -1
    ref = check.logits[i]
    out = np.asarray(model(np.ascontiguousarray(tensor)), dtype=np.float32).reshape(ref.shape)
    diff = float(np.abs(out - ref).max()) if np.all(np.isfinite(out)) else float("inf")
    text = decode_text(out, tuple(chars), blank)[0]
    return {"name": check.names[i], "tensor_equal": same, "values_differ": differing,
            "logit_diff": diff, "logits_ok": diff <= tolerance,
            "host_text": check.texts[i], "device_text": text,
            "text_equal": text == check.texts[i]}


def _verdict(rows: list[dict[str, Any]], tolerance: float) -> ImageCheckResult:
    fails = {"preprocess": [r for r in rows if not r["tensor_equal"]],
             "model": [r for r in rows if not r["logits_ok"]],
             "decode": [r for r in rows if not r["text_equal"]]}
    stage = next((s for s in STAGES if fails[s]), None)
    worst = max(r["logit_diff"] for r in rows)
    first = None
    if stage is not None:
        r = fails[stage][0]
        first = {"name": r["name"], "values_differ": r["values_differ"],
                 "logit_diff": r["logit_diff"] if np.isfinite(r["logit_diff"]) else None,
                 "host_text": r["host_text"], "device_text": r["device_text"]}
    return ImageCheckResult(
        status="failed" if stage else "passed", stage=stage, images=len(rows),
        tensors_differ=len(fails["preprocess"]),
        max_abs_logit_diff=worst if np.isfinite(worst) else None,
        logits_past_tolerance=len(fails["model"]), texts_differ=len(fails["decode"]),
        tolerance=tolerance, first=first)


def run_image_check(artifact: Any, model: Model, tolerance: float) -> dict[str, Any]:
    """The check of an opened artifact (``status`` ``absent`` if it carries no check set)."""
    m = artifact.manifest
    if CHECK_FILE not in m.files:
        return {"status": "absent",
                "reason": f"the artifact carries no {CHECK_FILE} (built before image checks)"}
    check = read_image_check(artifact.root / CHECK_FILE)
    return check_images(check, model, tolerance, m.charset.chars, m.charset.blank,
                        m.preprocess).to_dict()


def preprocess_digests(folder: str | Path) -> dict[str, dict[str, str]]:
    """File name -> sha256 of its decoded pixels, of OpenCV's candidate resizes to the model's
    size and of the preprocessed tensor: run on two machines, equal digests mean equal bytes
    (how the resize was chosen: ``benchmarks/preprocess_agreement.py``)."""
    import hashlib

    import cv2  # measurement only: the check itself needs no more than preprocess does

    from lprnet_edge.runtime.dataset import IMAGE_SUFFIXES
    from lprnet_edge.runtime.preprocess import Preprocess, read_image

    pre = Preprocess()
    resizes = {"linear": cv2.INTER_LINEAR, "linear_exact": cv2.INTER_LINEAR_EXACT,
               "area": cv2.INTER_AREA}
    out: dict[str, dict[str, str]] = {}
    for p in sorted(Path(folder).iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        img = read_image(p)
        arrays = {"decoded": img, "tensor": pre(img)}
        arrays.update({k: cv2.resize(img, (pre.width, pre.height), interpolation=v)
                       for k, v in resizes.items()})
        out[p.name] = {k: hashlib.sha256(a.tobytes()).hexdigest() for k, a in arrays.items()}
    return out
