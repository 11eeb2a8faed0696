"""Peer runtimes on the board: LPRNet in ONNX Runtime, ncnn or LiteRT, as a guest program.

What a user could run on a Pi instead of our artifact, loaded the way its own documentation
says, fp32, at a given thread count. The cost instrument runs this module under qemu with its
counting plugin; the inferences it counts are bracketed by
:func:`lprnet_edge.runtime.cost_marker.measured_region`. It runs with the board venv's python
(numpy and OpenCV only; no torch): the host converts the models (``model/onnx.py``,
``model/ncnn.py``) and uploads the files.

Command lines (``python -m lprnet_edge.runtime.peers ...``, one JSON line on stdout)::

    run      --runtime onnxruntime|ncnn|litert --model FILE [--runs 10] [--warmup 1]
             [--threads 1] [--input X.npy]
        load, ``--warmup`` untimed inferences, then ``--runs`` inferences of the fixed input
        inside ``measured_region()``: {"runtime", "version", "threads", "runs", "wall_s"}
    logits   --runtime R --model FILE [--threads 1] [--input X.npy] [--out Y.npy]
        the logits (1, classes, 18) of the fixed input, or (K, classes, 18) of a (K, 3, 24, 94)
        ``--input`` (one inference per row): {"runtime", "version", "shape", "logits"}
        (written to ``--out`` as .npy instead of inline when given)
    evaluate --runtime R --model FILE --data DIR [--limit N] [--threads 1]
        exact-plate accuracy on a labelled folder at batch 1: {"runtime", "accuracy", ...}

The fixed input is the Recognizer's synthetic plate, preprocessed (what every timing path of
lprnet-edge uses), or ``--input``: a float32 (1, 3, 24, 94) .npy. ``--model`` is an ``.onnx``
file (onnxruntime), an ncnn ``.param`` with its ``.bin`` beside it (ncnn), or a ``.tflite``
file (litert).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.runtime.cost_marker import measured_region
from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError

ONNXRUNTIME, NCNN, LITERT = "onnxruntime", "ncnn", "litert"
RUNTIMES = (ONNXRUNTIME, NCNN, LITERT)
# Blob names pnnx gives a single-input, single-output graph.
NCNN_INPUT, NCNN_OUTPUT = "in0", "out0"


@dataclass(frozen=True)
class PeerModel:
    """A loaded peer: ``fn(x) -> logits`` for a (1, 3, 24, 94) float32 input."""

    runtime: str
    version: str
    threads: int
    fn: Callable[[np.ndarray], np.ndarray]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "version": self.version, "threads": self.threads}


def _missing(runtime: str, package: str, err: ImportError) -> ToolchainError:
    return ToolchainError(f"{runtime} is not installed here ({err}): pip install {package} "
                          f"in {sys.prefix} (on the emulated Pi: scripts/emulated-pi peers)")


def load_onnxruntime(model: Path, threads: int) -> PeerModel:
    """ONNX Runtime's CPU provider, every graph optimisation, ``threads`` intra-op threads."""
    # Imported here: this module ships to boards that may lack onnxruntime.
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise _missing(ONNXRUNTIME, "onnxruntime", e) from e
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return PeerModel(ONNXRUNTIME, str(ort.__version__), threads,
                     lambda x: sess.run(None, {name: x})[0])


def load_ncnn(model: Path, threads: int) -> PeerModel:
    """ncnn on the CPU in fp32: its fp16/bf16 storage and arithmetic switched off (on by
    default where the core has them, e.g. a Cortex-A76), so that it computes what the others
    compute; ``threads`` threads, no Vulkan."""
    # Imported here: this module ships to boards that may lack ncnn.
    try:
        import ncnn
    except ImportError as e:
        raise _missing(NCNN, "ncnn", e) from e
    weights = model.with_suffix(".bin")
    if not weights.is_file():
        raise LprnetEdgeError(f"{weights}: missing (ncnn needs the .bin beside {model.name})")
    net = ncnn.Net()
    opt = net.opt
    opt.num_threads = threads
    opt.use_vulkan_compute = False
    for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic",
                 "use_bf16_storage"):
        setattr(opt, flag, False)
    if net.load_param(str(model)) != 0 or net.load_model(str(weights)) != 0:
        raise LprnetEdgeError(f"{model}: ncnn cannot load it (a layer it does not register?)")

    def run(x: np.ndarray) -> np.ndarray:
        with net.create_extractor() as ex:
            ex.input(NCNN_INPUT, ncnn.Mat(np.ascontiguousarray(x[0])))
            ret, out = ex.extract(NCNN_OUTPUT)
        if ret != 0:
            raise LprnetEdgeError(f"{model}: ncnn extract failed ({ret})")
        return np.array(out)[None]

    return PeerModel(NCNN, str(ncnn.__version__), threads, run)


def load_litert(model: Path, threads: int) -> PeerModel:
    """LiteRT's interpreter (XNNPACK, its default CPU delegate) on ``threads`` threads; an
    NHWC model's input is transposed from NCHW here, outside the measured work."""
    # Imported here: this module ships to boards that may lack ai-edge-litert.
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise _missing(LITERT, "ai-edge-litert", e) from e
    from importlib.metadata import version

    interp = Interpreter(model_path=str(model), num_threads=threads)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    nhwc = tuple(inp["shape"]) == (1, 24, 94, 3)

    def run(x: np.ndarray) -> np.ndarray:
        interp.set_tensor(inp["index"], x.transpose(0, 2, 3, 1).copy() if nhwc else x)
        interp.invoke()
        return interp.get_tensor(out["index"])

    return PeerModel(LITERT, version("ai-edge-litert"), threads, run)


LOADERS = {ONNXRUNTIME: load_onnxruntime, NCNN: load_ncnn, LITERT: load_litert}


def load_peer(runtime: str, model: str | Path, threads: int = 1) -> PeerModel:
    """Load ``model`` in ``runtime`` (one of :data:`RUNTIMES`) on ``threads`` threads."""
    if runtime not in LOADERS:
        raise LprnetEdgeError(f"unknown peer runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
    path = Path(model)
    if not path.is_file():
        raise LprnetEdgeError(f"{path}: no such model file")
    return LOADERS[runtime](path, int(threads))


def fixed_input(path: str | Path | None = None) -> np.ndarray:
    """The input every timing path uses (the Recognizer's synthetic plate, preprocessed), or
    a float32 (1, 3, 24, 94) array saved with ``np.save``."""
    if path is not None:
        return np.ascontiguousarray(np.load(path), dtype=np.float32)
    from lprnet_edge.runtime.preprocess import Preprocess
    from lprnet_edge.runtime.recognizer import _synthetic_plate

    pre = Preprocess()
    return np.ascontiguousarray(pre(_synthetic_plate(pre)), dtype=np.float32)


def run_measured(peer: PeerModel, x: np.ndarray, runs: int, warmup: int = 1) -> dict[str, Any]:
    """``warmup`` untimed inferences, then ``runs`` inside the instrument's measured region."""
    for _ in range(warmup):
        peer(x)
    t0 = time.perf_counter()
    with measured_region():
        for _ in range(runs):
            peer(x)
    return {**peer.to_dict(), "runs": runs, "wall_s": time.perf_counter() - t0}


def evaluate_peer(peer: PeerModel, data: str | Path, limit: int | None = None) -> dict[str, Any]:
    """Exact-plate accuracy of ``peer`` on a labelled folder, batch 1, with the Recognizer's
    preprocessing and CTC decoding (what an artifact is evaluated with)."""
    from lprnet_edge.runtime.charset import load_charset
    from lprnet_edge.runtime.evaluate import evaluate
    from lprnet_edge.runtime.recognizer import Recognizer

    backend = _NamedBackend(peer.runtime, peer)

    def progress(i: int, total: int) -> None:  # emulated boards take seconds per plate
        if i % 50 == 0 or i == total:
            print(f"{peer.runtime}: {i}/{total} plates", file=sys.stderr, flush=True)

    res = evaluate(Recognizer(backend, load_charset()), data, limit=limit, progress=progress)
    return {**peer.to_dict(), "data": str(data), **res.to_dict()}


class _NamedBackend:
    """A peer as a Recognizer backend (which wants a ``name``)."""

    def __init__(self, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.name, self.fn = name, fn

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(np.ascontiguousarray(x, dtype=np.float32)))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lprnet_edge.runtime.peers",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "logits", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument("--runtime", required=True, choices=RUNTIMES)
        p.add_argument("--model", required=True)
        p.add_argument("--threads", type=int, default=1)
        if name != "evaluate":
            p.add_argument("--input", default=None, help="float32 (1, 3, 24, 94) .npy")
    sub.choices["run"].add_argument("--runs", type=int, default=10)
    sub.choices["run"].add_argument("--warmup", type=int, default=1)
    sub.choices["logits"].add_argument("--out", default=None, help="write the logits here")
    sub.choices["evaluate"].add_argument("--data", required=True)
    sub.choices["evaluate"].add_argument("--limit", type=int, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        peer = load_peer(args.runtime, args.model, args.threads)
        if args.cmd == "run":
            res = run_measured(peer, fixed_input(args.input), args.runs, args.warmup)
        elif args.cmd == "logits":
            x = fixed_input(args.input)
            y = np.concatenate([np.asarray(peer(x[i:i + 1]), dtype=np.float32)
                                for i in range(len(x))])
            res = {**peer.to_dict(), "shape": list(y.shape)}
            if args.out:
                np.save(args.out, y)
                res["out"] = args.out
            else:
                res["logits"] = y.tolist()
        else:
            res = evaluate_peer(peer, args.data, args.limit)
    except LprnetEdgeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
