"""The per-kernel thread plan (compiler/threads.py), timed where wall time is real.

    python benchmarks/thread_plan.py [--threads 2] [--rounds 20] [--runs 200] [--out FILE]

Builds the checkpoint for this host twice with the packaged default schedules: as a build
does (small kernels on one core) and with every parallel loop kept, then times both, and
ONNX Runtime fp32 on the exported graph, at ``--threads`` threads, each in its own process
(two spinning thread pools in one process slow each other), alternating round by round;
prints a markdown table (and writes it to ``--out`` when given). A board's cores are another
machine: this says whether the choice pays on one machine's thread pool, not by how much on
a Pi.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LPRNET_EDGE_DATA", str(REPO.parent / "shared" / "lprnet"))

PLANS = {"small kernels on one core (the build's plan)": None,
         "every parallel loop kept": 0.0}
ORT = "ONNX Runtime fp32 (the exported graph)"  # the peer, timed the same way


def build_both(work: Path, threads: int) -> dict[str, dict]:
    """Each plan's library and build info in ``work`` (params saved beside them)."""
    import numpy as np

    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.compiler.threads import MIN_WORK_PER_THREAD, ThreadConfig
    from lprnet_edge.compiler.toolchain import find_compiler
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.weights import resolve_weights

    mod, params = to_relax(load_model(resolve_weights(None)))
    np.savez(work / "params.npz", *params.values())
    host = load_target("host")
    out = {}
    for i, (name, min_work) in enumerate(PLANS.items()):
        cfg = ThreadConfig(threads, MIN_WORK_PER_THREAD if min_work is None else min_work)
        lib = work / f"plan{i}.so"
        info = build(mod, host, lib, find_compiler(host), thread_config=cfg)
        serial = sorted(k for k, v in info["threads"].items() if v["extents"] and not v["parallel"])
        out[name] = {"lib": str(lib), "serial": serial}
    from lprnet_edge.model.onnx import export_onnx

    out[ORT] = {"lib": str(export_onnx().path), "serial": None}
    return out


def child(lib: str, params: str, runs: int) -> None:
    """Time one library (or the ONNX file) in this process: the minimum and median of
    ``runs`` calls (ms)."""
    import numpy as np

    model = _onnx_runtime(lib) if lib.endswith(".onnx") else _tvm(lib, params)
    x = np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 24, 94)).astype(np.float32)
    for _ in range(20):
        model(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    print(json.dumps({"min": times[0], "median": times[len(times) // 2]}))


def _tvm(lib: str, params: str) -> Any:
    import numpy as np

    from lprnet_edge.compiler.session import load_host

    with np.load(params) as z:
        weights = [z[f"arr_{i}"] for i in range(len(z.files))]
    return load_host(Path(lib), weights)


def _onnx_runtime(path: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ["TVM_NUM_THREADS"])
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def time_round(lib: str, params: Path, runs: int, threads: int) -> dict[str, float]:
    r = subprocess.run([sys.executable, __file__, "--child", lib, str(params), str(runs)],
                       capture_output=True, text=True, check=True,
                       env={**os.environ, "TVM_NUM_THREADS": str(threads),
                            "PYTHONPATH": str(REPO)})
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lprnet-thread-plan-") as tmp:
        work = Path(tmp)
        plans = build_both(work, args.threads)
        res: dict[str, list[dict[str, float]]] = {name: [] for name in plans}
        for i in range(args.rounds):
            order = list(plans) if i % 2 == 0 else list(reversed(plans))
            for name in order:
                res[name].append(time_round(plans[name]["lib"], work / "params.npz",
                                            args.runs, args.threads))
            print(f"round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
    text = render(plans, res, args)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def render(plans: dict[str, dict], res: dict[str, list[dict[str, float]]],
           args: argparse.Namespace) -> str:
    def best(name: str) -> float:
        return min(r["min"] for r in res[name])

    def median(name: str) -> float:
        return sorted(r["median"] for r in res[name])[len(res[name]) // 2]

    ref = list(PLANS)[1]
    lines = ["# The per-kernel thread plan, timed on this host", "",
             f"Generated by `python benchmarks/thread_plan.py --threads {args.threads} "
             f"--rounds {args.rounds} --runs {args.runs}` on {time.strftime('%Y-%m-%d')}. "
             "Do not edit by hand.", "",
             f"The checkpoint built for this host (packaged default schedules), run at "
             f"{args.threads} threads, each build in its own process, alternating for "
             f"{args.rounds} rounds of {args.runs} calls; the model alone, batch 1. Speed-ups "
             "are against the build that keeps every parallel loop (above 1: faster); ONNX "
             "Runtime fp32 on the exported graph runs beside them at the same threads, each "
             "round in its own process too.", "",
             "| build | kernels on one core | min ms (best round) | speed-up, min | median ms "
             "(median round) | speed-up, median |", "|---|---:|---:|---:|---:|---:|"]
    for name in plans:
        serial = plans[name]["serial"]
        lines.append(f"| {name} | {'-' if serial is None else len(serial)} | {best(name):.3f} | "
                     f"{best(ref) / best(name):.3f}x | {median(name):.3f} | "
                     f"{median(ref) / median(name):.3f}x |")
    serial = plans[list(PLANS)[0]]["serial"]
    lines += ["", "Kernels the plan runs on one core: " + ", ".join(f"`{k}`" for k in serial)
              + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())
