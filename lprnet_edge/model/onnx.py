"""The fp32 original as ONNX (for ONNX Runtime) and the host's side-by-side of an artifact with
ONNX Runtime and PyTorch eager.

The export runs once per weights file: it is cached in ``cache_dir()/onnx`` under the weights'
sha256 (the device bench uploads the same file). The model is the export-friendly LPRNet
(``ChannelStridedMaxPool`` instead of the original ``MaxPool3d``, which ONNX importers
reject), exported like ``compiler.frontend``'s ONNX import: TorchScript exporter, opset 17.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

from lprnet_edge.model.exports import ExportedFile, export_place
from lprnet_edge.runtime.artifact import Artifact
from lprnet_edge.runtime.baselines import (
    ONNXRUNTIME,
    TORCH,
    Baseline,
    Comparison,
    compare_artifact,
)
from lprnet_edge.runtime.errors import LprnetEdgeError
from lprnet_edge.runtime.isolated import WorkerSpec, thread_env

OPSET = 17
INPUT_NAME = "x"
INPUT_SHAPE = (1, 3, 24, 94)
_FORMAT = 1  # bump when the export changes, so cached files are not reused


def export_onnx(weights: str | Path | None = None, num_classes: int = 68,
                cache: str | Path | None = None) -> ExportedFile:
    """The ONNX file of ``weights`` (resolved like every command), exported on first use and
    then reused from the cache (keyed by the weights' sha256)."""
    place = export_place(weights, cache, "onnx", num_classes, f"opset{OPSET}-v{_FORMAT}")
    src, sha, out = place.weights, place.weights_sha256, place.file(".onnx")
    if out.is_file():
        return ExportedFile(out, src, sha, cached=True)
    place.folder.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _export(src, num_classes, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportedFile(out, src, sha, cached=False)


def _export(weights: Path, num_classes: int, dest: Path) -> None:
    import torch

    from lprnet_edge.model.checkpoint import load_model

    model = load_model(weights, num_classes)
    x = torch.zeros(INPUT_SHAPE, dtype=torch.float32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(dest), input_names=[INPUT_NAME],
                              output_names=["logits"], opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
        except Exception as e:  # the exporter raises many types
            raise LprnetEdgeError(f"{weights}: cannot export the model to ONNX "
                                  f"({type(e).__name__}: {e})") from e


def source_note(source: Any, exported: ExportedFile) -> tuple[bool | None, str]:
    """Whether the baselines' weights are an artifact's source (``source``: the manifest's
    ``source`` record, with ``weights_sha256``; None when it does not say), and a line saying
    so."""
    src = source if isinstance(source, dict) else {}
    want = src.get("weights_sha256")
    got = f"{exported.weights} (sha256 {exported.weights_sha256[:12]}...)"
    if not want:
        return None, f"baselines from {got}; the artifact does not record its source weights"
    if want == exported.weights_sha256:
        return True, f"baselines from {got}, the artifact's source weights (fp32 original)"
    return False, (f"baselines from {got}, NOT the artifact's source weights "
                   f"({src.get('weights', '?')}, sha256 {want[:12]}...): pass --weights with "
                   "that file to compare like with like")


def torch_baseline(weights: str | Path, num_classes: int, threads: int) -> Baseline:
    """PyTorch eager on ``threads`` threads, denormals flushed: set again right before every
    timed block, since loading ONNX Runtime or TVM can reset the FPU mode."""
    import torch

    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.reference import TorchBackend, flush_denormals_mode

    backend = TorchBackend(load_model(weights, num_classes))

    def before() -> None:
        torch.set_num_threads(threads)
        flush_denormals_mode()

    label = f"PyTorch eager {torch.__version__.split('+')[0]} (denormals flushed)"
    spec = WorkerSpec(TORCH, label, torch_model,
                      {"weights": str(weights), "num_classes": num_classes, "threads": threads},
                      thread_env(threads))
    return Baseline(TORCH, label, backend, before, spec)


def torch_model(weights: str, num_classes: int, threads: int) -> Any:
    """Worker factory (:mod:`lprnet_edge.runtime.isolated`): PyTorch eager alone in its
    process, ``threads`` threads, denormals flushed (nothing else there resets the FPU mode)."""
    import torch

    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.reference import TorchBackend, flush_denormals_mode

    torch.set_num_threads(threads)
    flush_denormals_mode()
    return TorchBackend(load_model(weights, num_classes))


def torch_missing() -> str | None:
    """None when PyTorch imports here, else why the PyTorch row is absent."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "not installed: pip install 'lprnet-edge[host]' (PyTorch)"
    return None


def compare_on_host(artifact: str | Path | Artifact, threads: int | None = None,
                    rounds: int = 5, runs: int = 20, warmup: int = 5,
                    weights: str | Path | None = None, with_ort: bool = True,
                    with_torch: bool = True) -> dict[str, Any]:
    """The artifact beside ONNX Runtime fp32 and PyTorch eager (the fp32 original), here, at
    one thread count (default: the artifact's), ``rounds`` interleaved rounds of ``runs``
    calls each; ``--json``-ready (:meth:`Comparison.to_dict` plus the weights used).

    Rows that cannot run (a package missing) are listed in ``missing`` with the fix."""
    from lprnet_edge.runtime.profile import apply_threads, configured_threads

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    apply_threads(threads, art)
    n = configured_threads(threads)
    num_classes = len(art.manifest.charset)
    missing: dict[str, str] = {}
    exported = None
    if (why := torch_missing()) is not None:
        missing.update({TORCH: why, ONNXRUNTIME: "not run: exporting the model to ONNX needs "
                                                 "PyTorch (pip install 'lprnet-edge[host]')"})
    else:
        exported = export_onnx(weights, num_classes)
    baselines = ([torch_baseline(exported.weights, num_classes, n)]
                 if exported is not None and with_torch else [])
    onnx = exported.path if exported is not None and with_ort else None
    with _torch_threads(n) if baselines else contextlib.nullcontext():
        comp: Comparison = compare_artifact(art, onnx=onnx, threads=n, rounds=rounds, runs=runs,
                                            warmup=warmup, baselines=baselines, missing=missing)
    res = comp.to_dict()
    if exported is not None:
        same, note = source_note(art.manifest.records.get("source"), exported)
        res.update(notes=[*comp.notes, note], onnx=str(exported.path),
                   weights=str(exported.weights), weights_sha256=exported.weights_sha256,
                   same_weights=same)
    return res


def _torch_threads(n: int) -> Any:
    from lprnet_edge.model.reference import torch_threads

    return torch_threads(n)
