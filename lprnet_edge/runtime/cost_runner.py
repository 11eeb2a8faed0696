"""The guest side of the cost instrument: run a model N times inside the measured region.

Run under qemu with the counting plugin (``lprnet_edge.compiler.cost``), on the host or on a
board's rootfs::

    python -m lprnet_edge.runtime.cost_runner --artifact DIR [--runs N] [--warmup N]
    python -m lprnet_edge.runtime.cost_runner --onnx FILE [--runs N] [--warmup N]

The input is fixed (seeded), the runtime runs one thread, and warm-up runs happen outside the
region, so two runs execute the same instructions. It prints one JSON document: the runs
counted and the process's executable file mappings (``/proc/self/maps``, which qemu-user
emulates with guest addresses), which the host uses to map counted blocks to ``model.so``
symbols. numpy and the TVM runtime (or ONNX Runtime) only: this module ships to the board.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from lprnet_edge.runtime.cost_marker import measured_region

SEED = 0


def fixed_input(shape: tuple[int, ...]) -> np.ndarray:
    """The same plate-sized input on every run and machine (values in [0, 1))."""
    return np.random.default_rng(SEED).random(shape, dtype=np.float32)


def _tvm_model(artifact: str) -> tuple[Callable[[], Any], str]:
    from lprnet_edge.runtime.artifact import Artifact
    from lprnet_edge.runtime.backends import TvmBackend

    art = Artifact.open(artifact)
    backend = TvmBackend(art, num_threads=1)
    x = fixed_input(art.manifest.input.shape)
    return (lambda: backend(x)), str(art.lib_path.resolve())


def _onnx_model(path: str) -> tuple[Callable[[], Any], str]:
    # onnxruntime is imported here only: the TVM path must not need it on a board.
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = tuple(d if isinstance(d, int) else 1 for d in inp.shape)
    x = fixed_input(shape)
    return (lambda: sess.run(None, {inp.name: x})), ""


def executable_maps() -> list[dict[str, Any]]:
    """The executable file mappings of this process (start, end, file offset, path)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and "x" in parts[1] and parts[5].strip().startswith("/"):
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                out.append({"start": lo, "end": hi, "offset": int(parts[2], 16),
                            "path": parts[5].strip()})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, lib = _tvm_model(args.artifact) if args.artifact else _onnx_model(args.onnx)
    for _ in range(args.warmup):
        model()
    # Python's collector runs when allocation counts since start-up say so, which differs
    # between runs by a few objects: keep it out of the counted region.
    gc.collect()
    gc.disable()
    try:
        with measured_region():
            for _ in range(args.runs):
                model()
    finally:
        gc.enable()
    return {"runs": args.runs, "warmup": args.warmup, "lib": lib, "maps": executable_maps(),
            "threads": os.environ.get("TVM_NUM_THREADS")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="an artifact directory (TVM, 1 thread)")
    src.add_argument("--onnx", help="an ONNX file (ONNX Runtime CPU provider, 1 thread)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    json.dump({"ok": True, "result": run(args)}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
