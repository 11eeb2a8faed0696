"""The on-device side of ``lprnet-edge deploy`` / ``remote`` / ``bench --host``.

Run on the device by the host over SSH::

    python -m lprnet_edge.runtime.agent info [--artifact DIR [--load]]
    python -m lprnet_edge.runtime.agent recognize --artifact DIR IMG...
    python -m lprnet_edge.runtime.agent eval --artifact DIR (--data DIR | --data-tar FILE) [--reads]
    python -m lprnet_edge.runtime.agent bench --artifact DIR [--runs N] [--warmup N] [--profile]
        [--onnx FILE [--rounds N] [--compare-only]]

It needs numpy, OpenCV and the TVM runtime only (no torch, no click, no paramiko). It prints one
JSON document on stdout, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...,
"type": ..., "exit_code": ...}`` (and exits with that code); progress goes to stderr as
``PROGRESS done total`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

PROTOCOL = 1


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.buffer.write(json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n")
    sys.stdout.flush()


def _progress(done: int, total: int) -> None:
    sys.stderr.write(f"PROGRESS {done} {total}\n")
    sys.stderr.flush()


def _throttled_progress(total: int, every_s: float = 1.0):
    last = [0.0]

    def cb(done: int, _total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            _progress(done, total)

    return cb


def _versions() -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
    }
    try:
        import cv2

        out["opencv"] = cv2.__version__
    except ImportError as e:
        out["opencv"] = f"missing ({e})"
    try:
        import tvm

        out["tvm"] = getattr(tvm, "__version__", "?")
    except ImportError as e:
        out["tvm"] = f"missing ({e})"
    from lprnet_edge.runtime import __version__

    out["lprnet_edge"] = __version__
    out["torch_imported"] = sys.modules.get("torch") is not None
    return out


def _open(artifact: str, threads: int | None):
    from lprnet_edge.runtime.recognizer import Recognizer

    return Recognizer.from_artifact(artifact, num_threads=threads)


# ---------------------------------------------------------------- commands


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {"protocol": PROTOCOL, **_versions()}
    from lprnet_edge.runtime.artifact import machine_arch

    info["arch"] = machine_arch()
    if args.artifact:
        from lprnet_edge.runtime.artifact import Artifact

        m = Artifact.open(args.artifact).manifest
        info["artifact"] = {"path": str(Path(args.artifact).resolve()),
                            "target": m.target.to_dict(), "backend": m.backend,
                            "files": {k: v.size for k, v in m.files.items()}}
        if args.load:
            t0 = time.perf_counter()
            rec = _open(args.artifact, args.threads)
            t1 = time.perf_counter()
            from lprnet_edge.runtime.recognizer import _synthetic_plate

            rec.recognize(_synthetic_plate(rec.preprocess))
            info["load_s"] = t1 - t0
            info["first_inference_s"] = time.perf_counter() - t1
            info["torch_imported"] = sys.modules.get("torch") is not None
    return info


def cmd_recognize(args: argparse.Namespace) -> list[dict[str, Any]]:
    rec = _open(args.artifact, args.threads)
    return [r.to_dict() for r in rec.recognize(list(args.images))]


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    if not args.compare_only:
        stats = _bench_recognizer(args)
    if args.onnx:  # side by side with ONNX Runtime, when it is installed here
        stats["compare"] = _bench_compare(args)
    return stats


def _bench_recognizer(args: argparse.Namespace) -> dict[str, Any]:
    rec = _open(args.artifact, args.threads)
    stats = rec.benchmark(args.image, runs=args.runs, warmup=args.warmup,
                          include_preprocess=not args.no_preprocess)
    stats.update(threads=args.threads or int(os.environ.get("TVM_NUM_THREADS", "0") or 0)
                 or os.cpu_count(), machine=platform.machine(),
                 target=rec.manifest.target.to_dict() if rec.manifest else {})
    if args.profile:  # per kernel, in this process (the VM instrument cannot cross RPC)
        from lprnet_edge.runtime.profile import profile_artifact

        stats["profile"] = profile_artifact(rec.artifact or args.artifact,
                                            runs=max(1, min(args.runs, 20)),
                                            warmup=min(args.warmup, 5),
                                            threads=args.threads).to_dict()
    return stats


def _bench_compare(args: argparse.Namespace) -> dict[str, Any]:
    """The artifact's model and ONNX Runtime on ``args.onnx``, interleaved in ``args.rounds``
    rounds (``args.runs`` runs each in all), at the artifact's (or ``--threads``) threads."""
    from lprnet_edge.runtime.artifact import Artifact
    from lprnet_edge.runtime.baselines import TORCH, compare_artifact

    art = Artifact.open(args.artifact)
    rounds = max(1, args.rounds)
    comp = compare_artifact(art, onnx=args.onnx, threads=args.threads, rounds=rounds,
                            runs=max(1, args.runs // rounds), warmup=min(args.warmup, 10),
                            missing={TORCH: "not run on the device (its runtime has no "
                                            "PyTorch)"},
                            where=" on the device", probe_ort=True)
    return {**comp.to_dict(), "source": art.manifest.records.get("source"),
            "machine": platform.machine()}


def _extract(tar_path: str) -> Path:
    from lprnet_edge.runtime.files import safe_extractall

    dest = Path(tempfile.mkdtemp(prefix="data-", dir=Path(tar_path).parent))
    with tarfile.open(tar_path) as tar:
        safe_extractall(tar, dest)
    entries = [p for p in dest.iterdir()]
    # A tar of one folder: evaluate that folder.
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


_WORKER_REC: Any = None


def _init_worker(artifact: str, threads: int | None) -> None:
    global _WORKER_REC
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    _WORKER_REC = _open(artifact, threads)


def _eval_shard(paths: list[tuple[int, str]]) -> list[tuple]:
    """Predictions of one worker: ("ok", i, label, pred, name) or ("bad", i, path, why)."""
    from lprnet_edge.runtime.dataset import label_from_name
    from lprnet_edge.runtime.decode import decode_text
    from lprnet_edge.runtime.errors import LprnetEdgeError
    from lprnet_edge.runtime.preprocess import read_image

    rec = _WORKER_REC
    out = []
    for i, p in paths:
        path = Path(p)
        label = label_from_name(path)
        try:
            rec.charset.encode(label)
            image = read_image(path)
        except LprnetEdgeError as e:
            out.append(("bad", i, p, str(e).removeprefix(f"{p}: ")))
            continue
        text, _ = decode_text(rec.logits(image), rec.charset.chars, rec.charset.blank)
        out.append(("ok", i, label, text, path.name))
    return out


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from lprnet_edge.runtime.evaluate import evaluate

    data = Path(args.data) if args.data else _extract(args.data_tar)
    t0 = time.perf_counter()
    workers = max(1, args.workers or 1)
    reads: dict[str, str] = {}
    if workers == 1:
        rec = _open(args.artifact, args.threads)
        n = len([p for p in data.iterdir() if p.is_file()])
        res = evaluate(rec, data, skip_bad=args.skip_bad, limit=args.limit,
                       progress=_throttled_progress(min(n, args.limit or n)), reads=reads)
        backend = rec.backend_name
    else:
        res, backend = _eval_parallel(args, data, workers, reads)
    doc = {"backend": backend, "data": str(data), **res.to_dict(),
           "seconds": time.perf_counter() - t0, "workers": workers,
           "machine": platform.machine()}
    if args.reads:  # file name -> text, for the host to compare read for read
        doc["reads"] = reads
    return doc


def _eval_parallel(args: argparse.Namespace, data: Path, workers: int,
                   reads: dict[str, str]):
    """Shard the images over processes (forked before TVM is imported); merge in file order
    so the figures are exactly those of the single-process evaluation."""
    import multiprocessing as mp

    from lprnet_edge.runtime.artifact import Artifact
    from lprnet_edge.runtime.dataset import PlateFolder
    from lprnet_edge.runtime.errors import DataError
    from lprnet_edge.runtime.metrics import Accumulator

    charset = Artifact.open(args.artifact).manifest.charset
    folder = PlateFolder(data, charset, skip_bad=args.skip_bad, limit=args.limit)
    indexed = list(enumerate(str(p) for p in folder.paths))
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("fork")
    total, done = len(indexed), 0
    results: list[tuple] = []
    step = 20  # small chunks keep the progress lines flowing; each worker loads the model once
    chunks = [indexed[i:i + step] for i in range(0, total, step)]
    with ctx.Pool(workers, initializer=_init_worker, initargs=(args.artifact, threads)) as pool:
        for part in pool.imap_unordered(_eval_shard, chunks):
            results += part
            done += len(part)
            _progress(done, total)
    results.sort(key=lambda r: r[1])
    acc = Accumulator(charset)
    for r in results:
        if r[0] == "bad":
            if not args.skip_bad:
                raise DataError(f"{r[2]}: {r[3]} (use --skip-bad to skip such files)")
            folder.skipped.append((r[2], r[3]))
        else:
            acc.add(r[2], r[3], r[4])
            reads[r[4]] = r[3]
    return acc.result(skipped=folder.skipped), "tvm"


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lprnet_edge.runtime.agent",
                                description="lprnet-edge on-device agent (JSON on stdout)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, artifact_required: bool = True) -> None:
        sp.add_argument("--artifact", required=artifact_required, help="artifact directory")
        sp.add_argument("--threads", type=int, help="TVM runtime threads")

    sp = sub.add_parser("info", help="versions, architecture; verify/load an artifact")
    common(sp, artifact_required=False)
    sp.add_argument("--load", action="store_true", help="load the artifact and run it once")
    sp.set_defaults(fn=cmd_info)

    sp = sub.add_parser("recognize", help="read the plates of images")
    common(sp)
    sp.add_argument("images", nargs="+")
    sp.set_defaults(fn=cmd_recognize)

    sp = sub.add_parser("eval", help="exact-match accuracy on a labelled folder")
    common(sp)
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder of plate images named by their text")
    src.add_argument("--data-tar", help="tar of such a folder (extracted beside it)")
    sp.add_argument("--skip-bad", action="store_true")
    sp.add_argument("--limit", type=int)
    sp.add_argument("--workers", type=int, default=1, help="processes (images sharded)")
    sp.add_argument("--reads", action="store_true", help="also return each file's text")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("bench", help="latency at batch 1 (pre/post-processing included)")
    common(sp)
    sp.add_argument("--runs", type=int, default=100)
    sp.add_argument("--warmup", type=int, default=10)
    sp.add_argument("--image", help="plate image to time (default: a synthetic plate)")
    sp.add_argument("--no-preprocess", action="store_true", help="time the model call only")
    sp.add_argument("--profile", action="store_true",
                    help="add a per-kernel profile (VM instrument): ms, calls, GFLOP/s")
    sp.add_argument("--onnx", help="ONNX file of the fp32 original: time ONNX Runtime on it "
                                   "interleaved with the artifact's model (result.compare)")
    sp.add_argument("--rounds", type=int, default=5, help="interleaved rounds with --onnx")
    sp.add_argument("--compare-only", action="store_true",
                    help="with --onnx: skip the Recognizer benchmark")
    sp.set_defaults(fn=cmd_bench)
    return p


def block_torch() -> None:
    """The device runtime never uses torch; ``tvm_ffi`` imports it when it happens to be
    installed (6 s and 300 MB more). Make ``import torch`` fail fast instead, so the agent
    behaves the same on a board and on a development machine."""
    if os.environ.get("LPRNET_EDGE_AGENT_ALLOW_TORCH") != "1" and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    block_torch()
    if getattr(args, "threads", None):
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    try:
        result = args.fn(args)
    except Exception as e:  # every failure becomes JSON the host can show
        from lprnet_edge.runtime.errors import LprnetEdgeError

        code = e.exit_code if isinstance(e, LprnetEdgeError) else 1
        _emit({"ok": False, "error": str(e) or type(e).__name__, "type": type(e).__name__,
               "exit_code": code})
        return code
    _emit({"ok": True, "protocol": PROTOCOL, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
