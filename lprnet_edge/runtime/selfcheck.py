"""Verification on the board: run a few stored inputs and compare with the host's PyTorch logits.

A cross-compiled artifact cannot be compared with PyTorch where it is built (the host cannot run
an aarch64 ``model.so``), and tuned kernels can be wrong. So the artifact carries
``verify.npz``: a few preprocessed ``calib/`` inputs with the logits the PyTorch model gives for
them on the host (and the tolerance the build used). ``deploy`` runs this module on the device
before it switches to a new deployment and refuses to switch past the tolerance.

The file is written at package time by :func:`write_verify_set` (numpy only, so the pipeline
and the device read and write one format) and listed in the manifest's ``files`` with its
checksum, like ``model.so``. The artifact's raw check images (:mod:`lprnet_edge.runtime.imagecheck`)
run in the same pass, from their bytes, under ``result["images"]``. On the device::

    python -m lprnet_edge.runtime.selfcheck --artifact DIR [--info] [--threads N]

prints one JSON line, ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": ...}``, the
protocol of :mod:`lprnet_edge.runtime.agent`. A failed comparison is a result (``status``
``"failed"`` with the figures), not an error: the host decides and says why.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.runtime.errors import ArtifactError
from lprnet_edge.runtime.files import read_npz
from lprnet_edge.runtime.imagecheck import run_image_check

VERIFY_FILE = "verify.npz"
FORMAT = 1


def write_verify_set(dest: str | Path, inputs: Sequence[np.ndarray] | np.ndarray,
                     logits: Sequence[np.ndarray] | np.ndarray,
                     tolerance: float | None = None) -> str:
    """Write ``dest/verify.npz`` from model inputs and the reference logits for them.

    ``inputs``: N preprocessed tensors of shape ``(1, 3, H, W)`` (or one ``(N, 3, H, W)``
    array), float32, exactly what the compiled model's entry takes. ``logits``: the reference
    (host PyTorch) output for each, ``(1, C, T)`` each or ``(N, C, T)``. ``tolerance``: the
    max |logit diff| the build accepts (also read from ``manifest["verification"]``).
    Returns the file name to list in the manifest's ``files``.
    """
    x = _stack(inputs, "inputs")
    y = _stack(logits, "logits")
    if len(x) != len(y) or len(x) == 0:
        raise ArtifactError(f"verify set: {len(x)} inputs but {len(y)} logits (need N >= 1 "
                            "of each)")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ArtifactError("verify set: inputs and logits must be finite")
    arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT, dtype=np.int32),
                                     "inputs": x.astype(np.float32),
                                     "logits": y.astype(np.float32)}
    if tolerance is not None:
        arrays["tolerance"] = np.array(float(tolerance), dtype=np.float64)
    path = Path(dest) / VERIFY_FILE
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return VERIFY_FILE


def _stack(arrays: Sequence[np.ndarray] | np.ndarray, what: str) -> np.ndarray:
    """N arrays of shape (1, ...) or one (N, ...) array -> one (N, ...) float32 array."""
    if isinstance(arrays, np.ndarray):
        return np.ascontiguousarray(arrays, dtype=np.float32)
    parts = [np.asarray(a, dtype=np.float32) for a in arrays]
    if not parts:
        raise ArtifactError(f"verify set: no {what}")
    return np.ascontiguousarray(np.concatenate(
        [p if p.ndim >= 2 and p.shape[0] == 1 else p[None] for p in parts]))


def read_verify_set(path: str | Path) -> dict[str, Any]:
    """Load and check ``verify.npz``: ``inputs`` (N, 3, H, W), ``logits`` (N, C, T),
    ``tolerance`` (float or None)."""
    data, fmt = read_npz(path, "verify set")
    if fmt != FORMAT:
        raise ArtifactError(f"{path}: verify set format {fmt!r}, this runtime reads {FORMAT}; "
                            "rebuild the artifact")
    x, y = data.get("inputs"), data.get("logits")
    if x is None or y is None or x.ndim != 4 or y.ndim != 3 or len(x) != len(y) or not len(x):
        raise ArtifactError(f"{path}: verify set needs inputs (N, 3, H, W) and logits "
                            "(N, C, T) with the same N >= 1")
    tol = data.get("tolerance")
    return {"inputs": x.astype(np.float32), "logits": y.astype(np.float32),
            "tolerance": float(tol) if tol is not None and tol.size == 1 else None}


def tolerance_of(verification: Any, stored: float | None) -> float:
    """The manifest's ``verification.tolerance``, else the one stored in the verify set."""
    tol = verification.get("tolerance") if isinstance(verification, dict) else None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        tol = stored
    if tol is None or not math.isfinite(tol) or tol < 0:
        raise ArtifactError("the artifact's verify set has no valid tolerance (manifest "
                            "verification.tolerance or verify.npz 'tolerance'); rebuild it")
    return float(tol)


def compare(outputs: Sequence[np.ndarray], reference: np.ndarray, tolerance: float,
            chars: Sequence[str] | None = None, blank: int = 0) -> dict[str, Any]:
    """Max / mean |logit diff| of ``outputs`` against ``reference``, plate agreement, verdict."""
    n = len(reference)
    max_diff, mean_sum, worst, agree = 0.0, 0.0, -1, 0
    for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        out = np.asarray(out, dtype=np.float32).reshape(ref.shape)
        if not np.all(np.isfinite(out)):
            max_diff, worst = math.inf, i
            break
        d = np.abs(out - ref)
        if float(d.max()) > max_diff:
            max_diff, worst = float(d.max()), i
        mean_sum += float(d.mean())
        if chars is not None:
            from lprnet_edge.runtime.decode import decode_text

            agree += decode_text(out, chars, blank)[0] == decode_text(ref, chars, blank)[0]
    res: dict[str, Any] = {
        "status": "passed" if max_diff <= tolerance else "failed",
        "inputs": n, "tolerance": tolerance,
        "max_abs_logit_diff": max_diff if math.isfinite(max_diff) else None,
        "mean_abs_logit_diff": mean_sum / max(n, 1), "worst_input": worst,
        "reference": "pytorch (host, stored in verify.npz)",
    }
    if not math.isfinite(max_diff):
        res["reason"] = f"non-finite logits for input {worst}"
    if chars is not None:
        res["plate_agreement"] = agree / max(n, 1)
    return res


def run_selfcheck(artifact: str | Path, num_threads: int | None = None) -> dict[str, Any]:
    """Load the artifact with the runtime, run every stored input, compare with the stored
    logits. ``status``: ``passed``, ``failed`` or ``absent`` (no verify set listed)."""
    from lprnet_edge.runtime.artifact import Artifact
    from lprnet_edge.runtime.backends import load_backend

    art = Artifact.open(artifact)
    m = art.manifest
    if VERIFY_FILE not in m.files:
        return {"status": "absent",
                "reason": f"the artifact carries no {VERIFY_FILE} (built before device checks)"}
    vs = read_verify_set(art.root / VERIFY_FILE)
    tol = tolerance_of(m.verification, vs["tolerance"])
    backend = load_backend(art, num_threads)
    t0 = time.perf_counter()
    outputs = [backend(np.ascontiguousarray(x[None])) for x in vs["inputs"]]
    seconds = time.perf_counter() - t0
    res = compare(outputs, vs["logits"], tol, m.charset.chars, m.charset.blank)
    res.update(seconds=round(seconds, 3), machine=platform.machine())
    res["images"] = run_image_check(art, backend, tol)  # raw bytes -> text, stage by stage
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m lprnet_edge.runtime.selfcheck``: the agent's JSON protocol on stdout."""
    from lprnet_edge.runtime import agent

    p = argparse.ArgumentParser(prog="python -m lprnet_edge.runtime.selfcheck",
                                description="compare the artifact's model with the stored "
                                            "PyTorch logits (JSON on stdout)")
    p.add_argument("--artifact", required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--info", action="store_true",
                   help="also load and run the model once and report versions (agent info)")
    args = p.parse_args(argv)
    agent.block_torch()
    try:
        result: dict[str, Any] = {}
        if args.info:
            result["info"] = agent.cmd_info(argparse.Namespace(
                artifact=args.artifact, load=True, threads=args.threads))
        result["selfcheck"] = run_selfcheck(args.artifact, args.threads)
    except Exception as e:  # every failure becomes JSON the host can show
        from lprnet_edge.runtime.errors import LprnetEdgeError

        code = e.exit_code if isinstance(e, LprnetEdgeError) else 1
        agent._emit({"ok": False, "error": str(e) or type(e).__name__,
                     "type": type(e).__name__, "exit_code": code})
        return code
    agent._emit({"ok": True, "protocol": agent.PROTOCOL, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
