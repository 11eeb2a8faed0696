"""Run the current deployment on the device: recognize, evaluate, benchmark, compare.

Everything here runs *on the board*, through the deployment's own runtime agent: the host
uploads inputs into a job folder (removed afterwards) and reads the agent's JSON answer, so
the figures are the device's, computed by the code that was deployed with the model.
"""

from __future__ import annotations

import tarfile
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lprnet_edge.device.deploy import SPACE_MARGIN
from lprnet_edge.device.device import Device, Progress, format_mb
from lprnet_edge.model.onnx import export_onnx, source_note, torch_missing
from lprnet_edge.runtime.artifact import load_manifest
from lprnet_edge.runtime.dataset import IMAGE_SUFFIXES
from lprnet_edge.runtime.errors import DataError, DeviceError, LprnetEdgeError
from lprnet_edge.runtime.metrics import EvalResult

EVAL_TIMEOUT = 6 * 3600  # s: a full test set under emulation
BENCH_TIMEOUT = 3600
RECOGNIZE_TIMEOUT = 600
DEFAULT_CLASSES = 68  # the pretrained model's charset, when no artifact says otherwise
_REDEPLOY = "deploy the artifact again (`lprnet-edge deploy ARTIFACT --host ...`)"


@dataclass(frozen=True)
class DeviceBench:
    """Latency measured on a device. ``mode`` says what was timed: ``ssh``, the deployed
    Recognizer run by the agent there; ``rpc``, the model of a local artifact with
    ``time_evaluator`` through an SSH tunnel. ``latency``: the runtime's summary
    (``p50_ms`` ... ``runs``) and how it was run (threads, target, pre/post-processing)."""

    host: str
    mode: str
    machine: str
    latency: dict[str, Any]
    deployment: str | None = None
    profile: dict[str, Any] | None = None  # runtime.profile.Profile.to_dict(), per kernel
    compare: dict[str, Any] | None = None  # the deployed model beside ONNX Runtime

    def to_dict(self) -> dict[str, Any]:
        out = {**self.latency, "host": self.host, "mode": self.mode, "machine": self.machine}
        for key in ("deployment", "profile", "compare"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class RemoteEval:
    """Accuracy of the current deployment on a labelled folder, measured on the device."""

    host: str
    deployment: str
    data: str  # the local folder that was uploaded
    machine: str
    backend: str
    workers: int
    seconds: float  # evaluation time on the device
    upload_seconds: float
    metrics: EvalResult
    reads: dict[str, str] | None = None  # file name -> text, when asked for (``reads``)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "data": self.data, **self.metrics.to_dict(),
                "seconds": self.seconds, "workers": self.workers, "machine": self.machine,
                "upload_seconds": self.upload_seconds, "deployment": self.deployment,
                "host": self.host}


def _eval_result(doc: dict[str, Any]) -> EvalResult:
    kw = {f.name: doc[f.name] for f in fields(EvalResult) if f.name in doc}
    kw["skipped"] = [(str(p), str(why)) for p, why in doc.get("skipped") or []]
    return EvalResult(**kw)


def remote_recognize(dev: Device, images: list[str | Path], threads: int | None = None,
                     progress: Progress | None = None) -> list[dict[str, Any]]:
    """Upload images and read their plates on the device: the agent's plate results (text,
    confidence, ...) with ``source``, the local path, added."""
    cur = dev.require_current()
    runtime, art = dev.runtime_of(cur)
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such image file")
    total = sum(p.stat().st_size for p in paths)
    with dev.job_dir() as job:
        remote_names, done = [], 0
        for i, p in enumerate(paths):
            rname = f"{job}/img-{i:05d}{p.suffix.lower() or '.img'}"
            dev.conn.put(p, rname, progress=(lambda d, _t, b=done: progress(b + d, total))
                         if progress else None)
            done += p.stat().st_size
            remote_names.append(rname)
        args = ["recognize", "--artifact", art, *remote_names]
        if threads:
            args += ["--threads", str(threads)]
        results = dev.agent(runtime, args, timeout=RECOGNIZE_TIMEOUT)
    for r, p in zip(results, paths, strict=True):
        r["source"] = str(p)
    return results


def tar_folder(data: Path, out: Path, limit: int | None = None) -> int:
    """The folder's files as one tar (the first ``limit`` images only, when given): one
    upload instead of one per image."""
    files = sorted(p for p in data.iterdir() if p.is_file() and not p.name.startswith("."))
    if limit:
        imgs = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES][:limit]
        files = imgs + [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT, dereference=True) as tar:
        for p in files:
            tar.add(p, arcname=f"data/{p.name}")
    return len(files)


def remote_eval(dev: Device, data: str | Path, skip_bad: bool = False, limit: int | None = None,
                threads: int | None = None, workers: int = 1,
                upload_progress: Progress | None = None, progress: Progress | None = None,
                timeout: float = EVAL_TIMEOUT, reads: bool = False) -> RemoteEval:
    """Upload a labelled folder (one tar) and evaluate the current deployment on it there
    (``reads``: also each file's text, to compare with the host's)."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data}: not a folder of plate images")
    cur = dev.require_current()
    runtime, art = dev.runtime_of(cur)
    args = ["eval", "--artifact", art, "--workers", str(workers)]
    args += (["--skip-bad"] if skip_bad else []) + (["--limit", str(limit)] if limit else [])
    args += (["--threads", str(threads)] if threads else []) + (["--reads"] if reads else [])
    with tempfile.TemporaryDirectory(prefix="lprnet-eval-") as tmpd:
        tar = Path(tmpd) / "data.tar"
        tar_folder(data, tar, limit)
        need = 2 * tar.stat().st_size + SPACE_MARGIN
        with dev.job_dir() as job:
            free = dev.free_bytes(job)
            if free < need:
                raise DeviceError(f"not enough disk space on {dev.spec} for the data: "
                                  f"{format_mb(free)} free, {format_mb(need)} needed")
            t0 = time.perf_counter()
            dev.conn.put(tar, f"{job}/data.tar", progress=upload_progress)
            upload_s = time.perf_counter() - t0
            res = dev.agent(runtime, [*args, "--data-tar", f"{job}/data.tar"], timeout=timeout,
                            progress=progress)
    return RemoteEval(host=dev.spec, deployment=Path(cur).name, data=str(data),
                      machine=res.get("machine", ""), backend=res.get("backend", ""),
                      workers=res.get("workers", workers), seconds=res.get("seconds", 0.0),
                      upload_seconds=upload_s, metrics=_eval_result(res),
                      reads=res.get("reads"))


def _require_deployed(dev: Device, cur: str, artifact: str | Path) -> None:
    """Refuse to time a deployment that is not ``artifact`` (by the files' checksums)."""
    local = {n: e.sha256 for n, e in load_manifest(artifact).files.items()}
    deployed = (dev.record_of(cur) or {}).get("files")
    if deployed != local:
        raise DeviceError(
            f"{dev.spec} runs {Path(cur).name}, not {artifact}: deploy it "
            f"first (`lprnet-edge deploy {artifact} --host ...`)")


def remote_bench(dev: Device, runs: int = 100, warmup: int = 10, threads: int | None = None,
                 image: str | Path | None = None, include_preprocess: bool = True,
                 timeout: float = BENCH_TIMEOUT, expect_artifact: str | Path | None = None,
                 profile: bool = False) -> DeviceBench:
    """Recognizer.benchmark on the device, with the current deployment (which must be
    ``expect_artifact``, when given); ``profile`` adds the agent's per-kernel profile
    (:class:`lprnet_edge.runtime.profile.Profile` as a dict)."""
    cur = dev.require_current()
    runtime, art = dev.runtime_of(cur)
    if expect_artifact is not None:
        _require_deployed(dev, cur, expect_artifact)
    args = ["bench", "--artifact", art, "--runs", str(runs), "--warmup", str(warmup)]
    args += ["--threads", str(threads)] if threads else []
    args += [] if include_preprocess else ["--no-preprocess"]
    args += ["--profile"] if profile else []
    with dev.job_dir() as job:
        if image:
            remote_image = f"{job}/bench{Path(image).suffix}"
            dev.conn.put(Path(image), remote_image)
            args += ["--image", remote_image]
        try:
            stats = dev.agent(runtime, args, timeout=timeout)
        except DeviceError as e:
            if profile and "unrecognized arguments: --profile" in str(e):
                raise DeviceError(f"{dev.spec} runs {Path(cur).name}, deployed by an "
                                  f"lprnet-edge whose agent cannot profile: {_REDEPLOY}"
                                  ) from None
            raise
    prof = stats.pop("profile", None)
    return DeviceBench(host=dev.spec, mode="ssh", machine=stats.pop("machine", ""),
                       latency=stats, deployment=Path(cur).name, profile=prof)


def remote_compare(dev: Device, onnx: str | Path, runs: int = 100, warmup: int = 10,
                   rounds: int = 5, threads: int | None = None, timeout: float = BENCH_TIMEOUT
                   ) -> dict[str, Any]:
    """The current deployment's model next to ONNX Runtime on the device: ``onnx`` (the fp32
    original) is uploaded to a job dir and the agent's ``bench --onnx`` times both interleaved
    (ORT's row says how to install it when the device venv lacks it)."""
    cur = dev.require_current()
    runtime, art = dev.runtime_of(cur)
    args = ["bench", "--artifact", art, "--compare-only", "--runs", str(runs), "--warmup",
            str(warmup), "--rounds", str(rounds)]
    args += ["--threads", str(threads)] if threads else []
    with dev.job_dir() as job:
        dev.conn.put(Path(onnx), f"{job}/model.onnx")
        try:
            res = dev.agent(runtime, [*args, "--onnx", f"{job}/model.onnx"], timeout=timeout)
        except DeviceError as e:
            if "unrecognized arguments" in str(e):
                raise DeviceError(f"{dev.spec} runs {Path(cur).name}, deployed by an "
                                  "lprnet-edge whose agent cannot compare with ONNX Runtime: "
                                  f"{_REDEPLOY}") from None
            raise
    return {**res["compare"], "host": dev.spec, "deployment": Path(cur).name}


def compare_on_device(dev: Device, artifact: str | Path | None = None, runs: int = 100,
                      warmup: int = 10, rounds: int = 5, threads: int | None = None,
                      weights: str | Path | None = None) -> dict[str, Any]:
    """The deployed model and ONNX Runtime fp32, interleaved on the device: the fp32 original
    is exported here (cached ONNX file of ``weights``), uploaded, and timed by the agent; the
    weights are checked against the deployed artifact's source.

    A failure on the device (e.g. a baseline crashing the agent) becomes ``error`` in the
    result, so the latency figures measured before it are still shown."""
    if (why := torch_missing()) is not None:
        raise LprnetEdgeError(f"--compare exports the model to ONNX here, which needs PyTorch "
                              f"on this machine ({why}); or pass --no-compare")
    classes = len(load_manifest(artifact).charset) if artifact else DEFAULT_CLASSES
    exported = export_onnx(weights, classes)
    try:
        comp = remote_compare(dev, exported.path, runs=runs, warmup=warmup, rounds=rounds,
                              threads=threads)
    except DeviceError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        err = lines[0][:300] + (f" ... {lines[-1][:200]}" if len(lines) > 1 else "")
        return {"rows": [], "missing": {}, "speedup": {}, "error": err, "host": dev.spec}
    same, note = source_note(comp.get("source"), exported)
    comp.update(notes=[*(comp.get("notes") or []), note], same_weights=same,
                onnx=str(exported.path), weights=str(exported.weights),
                weights_sha256=exported.weights_sha256)
    return comp

