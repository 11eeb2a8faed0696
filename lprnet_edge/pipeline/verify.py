"""Numeric verification of a compiled module against PyTorch, and the check it carries to the
device.

On the host the staged ``model.so`` + ``params.npz`` run through the runtime (``TvmBackend``, as
on the device) on ``calib/`` images; logits must match the PyTorch reference within the
tolerance, else no artifact is written. With an explicit accuracy budget, the compiled module's
readings also go through the build's one accuracy check
(:mod:`lprnet_edge.compress.accuracy`). A cross build cannot run here: ``verify.npz`` carries
inputs and host logits for ``deploy`` to compare on the board.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lprnet_edge.compiler.config import CompileConfig
from lprnet_edge.compress.accuracy import (
    VALIDATION,
    AccuracyCheck,
    Budget,
    compare,
    readings,
    torch_one_thread,
)
from lprnet_edge.model.bn_fold import fold_batchnorm
from lprnet_edge.model.calib import check_not_test
from lprnet_edge.paths import data_subdir
from lprnet_edge.pipeline import steps
from lprnet_edge.pipeline.steps import norm_name
from lprnet_edge.pipeline.values import CompiledModule, Log, TorchModel
from lprnet_edge.pipeline.verify_images import StoredImageCheck, store_image_check
from lprnet_edge.runtime.backends import TvmBackend
from lprnet_edge.runtime.charset import Charset
from lprnet_edge.runtime.dataset import PlateFolder
from lprnet_edge.runtime.decode import decode_text
from lprnet_edge.runtime.errors import ArtifactError, DataError, LprnetEdgeError
from lprnet_edge.runtime.evaluate import evaluate
from lprnet_edge.runtime.params_codec import load_params
from lprnet_edge.runtime.preprocess import Preprocess
from lprnet_edge.runtime.recognizer import Recognizer
from lprnet_edge.runtime.selfcheck import write_verify_set

RUNTIME = "tvm (model.so + params.npz, as deployed)"
DEVICE_CHECK_IMAGES = 8


@dataclass(frozen=True)
class DeviceCheck:
    """``verify.npz``: inputs and host PyTorch logits ``deploy`` compares on the board."""

    status: str  # "stored", or "absent" (``reason``)
    file: str | None = None
    inputs: int = 0
    tolerance: float | None = None
    data: str | None = None
    reason: str | None = None
    images: StoredImageCheck | None = None  # raw plates: bytes -> tensor -> logits -> text

    def to_dict(self) -> dict[str, Any]:
        if self.status != "stored":
            return {"status": self.status, "reason": self.reason}
        return {"status": self.status, "file": self.file, "inputs": self.inputs,
                "tolerance": self.tolerance, "data": self.data,
                "images": self.images.to_dict() if self.images else None}


@dataclass(frozen=True)
class LogitComparison:
    """Compiled logits against the PyTorch reference's, over the verification images."""

    max_abs: float
    mean_abs: float
    plate_agreement: float
    decoded: bool  # the reference's weights were decoded from params.npz (lossy encodings)
    reference_accuracy: float | None  # the reference's calib accuracy (labelled images)


@dataclass(frozen=True)
class Verification:
    """What verification found; ``skipped`` with a ``reason`` when it could not run here."""

    status: str  # "passed" or "skipped"
    reason: str | None = None
    images: int = 0
    data: str = ""
    encodings: tuple[str, ...] = ()
    tolerance: float = 0.0
    seconds: float = 0.0
    logits: LogitComparison | None = None
    calib_accuracy: float | None = None
    accuracy_check: AccuracyCheck | None = None
    device_check: DeviceCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.status == "skipped":
            d: dict[str, Any] = {"status": self.status, "reason": self.reason}
        else:
            d = {"status": self.status, "images": self.images, "data": self.data,
                 "runtime": RUNTIME, "encodings": list(self.encodings),
                 "tolerance": self.tolerance, "seconds": self.seconds}
            d.update(_logits_dict(self.logits))
            if self.calib_accuracy is not None:
                d["calib_accuracy"] = self.calib_accuracy
                if self.logits is not None:
                    d["calib_accuracy_reference"] = self.logits.reference_accuracy
            if self.accuracy_check is not None:
                d["accuracy_check"] = self.accuracy_check.to_dict()
        if self.device_check is not None:
            d["device_check"] = self.device_check.to_dict()
        return d

    def summary(self) -> str:
        check = self.device_check
        on_device = (f"; {check.inputs} inputs ({check.data}) with PyTorch logits stored "
                     "for the check on the device at deploy"
                     if check is not None and check.status == "stored" else "")
        if self.status == "skipped":
            return f"skipped here ({self.reason}){on_device}"
        parts = [f"{self.status} on {self.images} images"]
        if self.logits is not None:
            parts.append(f"max |logit diff| {self.logits.max_abs:.2e} (tol {self.tolerance:g})")
            parts.append(f"plate agreement {self.logits.plate_agreement:.4f}")
        if self.calib_accuracy is not None:
            parts.append(f"calib accuracy {self.calib_accuracy:.3f}")
        if self.accuracy_check is not None:
            parts.append(f"compiled {self.accuracy_check.summary()}")
        return ", ".join(parts) + on_device


def _logits_dict(c: LogitComparison | None) -> dict[str, Any]:
    if c is None:
        return {"reference": None}
    return {"max_abs_logit_diff": c.max_abs, "mean_abs_logit_diff": c.mean_abs,
            "plate_agreement": c.plate_agreement,
            "reference": "pytorch" + (" (weights decoded from params.npz)" if c.decoded
                                      else "")}


@dataclass(frozen=True)
class VerificationImages:
    xs: list[np.ndarray]
    labels: list[str | None]
    source: str


def verification_images(calib_dir: Path | None, charset: Charset, limit: int | None,
                        log: Log | None = None) -> VerificationImages:
    """Preprocessed ``calib/`` images (never ``test/``); random inputs if there is none."""
    folder = Path(calib_dir) if calib_dir else data_subdir("calib")
    if calib_dir:
        check_not_test(folder)  # --calib decides pass/fail: never the test split
    if folder is not None and folder.is_dir():
        pre = Preprocess()
        samples = list(PlateFolder(folder, charset, skip_bad=True, limit=limit))
        if samples:
            return VerificationImages([pre(s.image) for s in samples],
                                      [s.label for s in samples], str(folder))
    n = limit or 32
    if log:
        log(f"  no calib/ images (set LPRNET_EDGE_DATA or --calib): verifying on {n} random "
            "inputs (logits only)")
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-1, 1, size=(1, 3, 24, 94)).astype(np.float32) for _ in range(n)]
    return VerificationImages(xs, [None] * n, "random")


def skipped(reason: str) -> Verification:
    return Verification(status="skipped", reason=reason)


def cross_build(compiled: CompiledModule) -> Verification:
    return skipped(f"cross-compiled for {compiled.target.arch}; verify on the device with "
                   "`lprnet-edge deploy`")


def verify_compiled(tm: TorchModel, compiled: CompiledModule, config: CompileConfig,
                    calib_dir: Path | None = None, limit: int | None = None,
                    budget: Budget | None = None, log: Log | None = None) -> Verification:
    """Run the staged module on the calib images and compare with PyTorch; raise past the
    tolerance, or (``budget``) when its readings lose more than the budget allows."""
    if not compiled.target.is_native:
        return cross_build(compiled)
    t0 = time.perf_counter()
    images = verification_images(calib_dir, tm.charset, limit, log)
    backend = TvmBackend(compiled.artifact(tm.charset))
    reference = tm.reference
    if reference is not None and compiled.lossy:
        reference = decoded_reference(reference, compiled)
    tol = tm.tolerance(config.verify_tolerance)
    with torch_one_thread():
        texts, logits, worst = _run(backend, reference, images, tm.charset,
                                    decoded=compiled.lossy)
        check = (compiled_accuracy(backend, tm, calib_dir, budget) if budget is not None
                 else None)
    labelled = [(t, y) for t, y in zip(texts, images.labels, strict=True) if y is not None]
    result = Verification(
        status="passed", images=len(images.xs), data=images.source,
        encodings=tuple(sorted(set(compiled.encodings.values()))), tolerance=tol,
        logits=logits, accuracy_check=check,
        calib_accuracy=sum(t == y for t, y in labelled) / len(labelled) if labelled else None,
        seconds=round(time.perf_counter() - t0, 2))
    _raise_if_failed(result, worst, images.source)
    return result


def _run(backend: TvmBackend, reference: Any, images: VerificationImages, charset: Charset,
         decoded: bool) -> tuple[list[str], LogitComparison | None, int]:
    """The compiled module's readings of ``images`` and its logits against ``reference``'s;
    the index of the image with the largest difference."""
    chars, blank = charset.chars, charset.blank
    texts, diffs, means, agree, ref_ok = [], [], [], 0, 0
    for x, label in zip(images.xs, images.labels, strict=True):
        out = backend(x)
        if not np.all(np.isfinite(out)):
            raise ArtifactError("verification failed: the compiled model produced NaN/inf "
                                "logits; no artifact written")
        texts.append(decode_text(out[0], chars, blank)[0])
        if reference is not None:
            ref = _torch_logits(reference, x)
            d = np.abs(out - ref)
            diffs.append(float(d.max()))
            means.append(float(d.mean()))
            ref_text = decode_text(ref[0], chars, blank)[0]
            agree += texts[-1] == ref_text
            ref_ok += label is not None and ref_text == label
    if reference is None:
        return texts, None, -1
    n = max(len(texts), 1)
    labelled = sum(y is not None for y in images.labels)
    worst = int(np.argmax(diffs)) if diffs and max(diffs) > 0 else -1
    return texts, LogitComparison(
        max_abs=max([0.0, *diffs]), mean_abs=sum(means) / n, plate_agreement=agree / n,
        decoded=decoded,
        reference_accuracy=ref_ok / labelled if labelled else None), worst


def _raise_if_failed(v: Verification, worst: int, source: str) -> None:
    c = v.logits
    if c is not None and c.max_abs > v.tolerance:
        agree = round(c.plate_agreement * v.images)
        raise ArtifactError(
            f"verification failed: max |logit diff| vs PyTorch {c.max_abs:.3g} > tolerance "
            f"{v.tolerance:g} (image {worst} of {source}); plate agreement "
            f"{agree}/{v.images}. No artifact written")
    a = v.accuracy_check
    if a is not None and not a.ok:
        raise ArtifactError(
            f"accuracy of the compiled model: {a.loss_points:.1f} points {a.budget.measure} on "
            f"the {VALIDATION.name} ({a.images} plates: original {a.original:.3f}, compiled "
            f"{a.changed:.3f}) exceeds --max-accuracy-drop {a.budget.points:g}. "
            "No artifact written")


def compiled_accuracy(backend: TvmBackend, tm: TorchModel, calib_dir: Path | None,
                      budget: Budget) -> AccuracyCheck:
    """The accuracy check on the compiled module's readings of the validation split."""
    _train, val = VALIDATION.of(steps.calibration_set(calib_dir, tm))
    cs = tm.charset
    texts = [decode_text(backend(val.x[i:i + 1])[0], cs.chars, cs.blank)[0]
             for i in range(len(val))]
    return compare(readings(tm.original, val), texts, val.labels, budget, measured_with="tvm")


def _torch_logits(model: Any, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def decoded_reference(reference: Any, compiled: CompiledModule) -> Any:
    """``reference`` with BatchNorm folded and its weights replaced by what ``params.npz``
    decodes to, so a lossy storage encoding is not mistaken for a compiler error."""
    if not isinstance(reference, torch.nn.Module):
        return reference
    folded = fold_batchnorm(reference)
    decoded = {norm_name(k): v for k, v in load_params(compiled.params_path).items()}
    with torch.no_grad():
        for name, t in folded.state_dict().items():
            v = decoded.get(norm_name(name))
            if v is not None and tuple(v.shape) == tuple(t.shape):
                t.copy_(torch.from_numpy(v))
    return folded


def device_check(tm: TorchModel, compiled: CompiledModule, config: CompileConfig,
                 calib_dir: Path | None = None, n: int = DEVICE_CHECK_IMAGES) -> DeviceCheck:
    """Store ``n`` calib/ inputs with the host PyTorch logits in the artifact (``verify.npz``):
    ``deploy`` runs them on the board and refuses to switch past the tolerance, so a cross
    build is compared with PyTorch too, where it runs."""
    reference = tm.reference
    if reference is None:
        return DeviceCheck("absent", reason="no PyTorch reference for this model")
    if compiled.lossy:
        reference = decoded_reference(reference, compiled)
    tol = tm.tolerance(config.verify_tolerance)
    images = verification_images(calib_dir, tm.charset, n)
    with torch_one_thread():
        logits = [_torch_logits(reference, x) for x in images.xs]
    name = write_verify_set(compiled.root, images.xs, logits, tol)
    compiled.extra_files.append(name)
    with torch_one_thread():  # raw plates -> tensor, logits, text, for the device to repeat
        raw = store_image_check(compiled.root, lambda x: _torch_logits(reference, x),
                                tm.charset, calib_dir)
    compiled.extra_files.extend(raw.files)
    return DeviceCheck("stored", file=name, inputs=len(images.xs), tolerance=tol,
                       data=images.source, images=raw)


@dataclass(frozen=True)
class TestAccuracy:
    """The staged artifact's accuracy on ``test/``: measured, never tuned on."""

    __test__ = False  # a "Test*" name, not a test class (pytest would try to collect it)

    data: str
    images: int
    accuracy: float
    char_accuracy: float
    mean_edit_distance: float

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "split": "test", "images": self.images,
                "accuracy": self.accuracy, "char_accuracy": self.char_accuracy,
                "mean_edit_distance": self.mean_edit_distance, "batch": 1}


def eval_test(tm: TorchModel, compiled: CompiledModule, test_dir: Path | None) -> TestAccuracy:
    """Accuracy of the staged artifact on ``test/`` at batch 1."""
    if not compiled.target.is_native:
        raise LprnetEdgeError("--eval-test needs a build for this machine (--target host); "
                              "for a device run `lprnet-edge eval` there")
    folder = Path(test_dir) if test_dir else data_subdir("test")
    if folder is None or not folder.is_dir():
        raise DataError("--eval-test: no test/ folder (set LPRNET_EDGE_DATA or --test-dir)")
    backend = TvmBackend(compiled.artifact(tm.charset))
    res = evaluate(Recognizer(backend, tm.charset, Preprocess()), folder)
    return TestAccuracy(str(folder), res.count, res.accuracy, res.char_accuracy,
                        res.mean_edit_distance)
