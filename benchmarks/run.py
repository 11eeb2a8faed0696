#!/usr/bin/env python
"""LPRNet latency on this machine, batch 1: PyTorch eager, ONNX Runtime, TVM untuned/tuned.

At 1 thread, one run measures every variant *interleaved* in one process (round-robin: one
call of each variant in turn, ``--runs`` times after a warm-up), so a shared, noisy machine
slows all variants alike; the figure is the median. At more than one thread, each variant runs
in a process of its own and the processes alternate in rounds (``lprnet_edge.runtime.isolated``):
ONNX Runtime's and TVM's spinning thread pools slow each other when they share a process.
Every variant gets the same thread count; each thread count runs in its own process (TVM's
thread pool is sized once per process, from TVM_NUM_THREADS).

    python benchmarks/run.py                      # 1 and 2 threads, tunes to --trials first
    python benchmarks/run.py --no-tune            # apply the tuning records there are
    python benchmarks/run.py --accuracy --artifact int8=build/lprnet-int8

Writes ./lprnet-edge-report/benchmarks.md (``--out``; the repository's docs/benchmarks*.md
are regenerated on purpose with ``--out docs/...``), records the command, shell-quoted, at
its top, and prints the table. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "lprnet-edge-report/benchmarks.md"  # a folder of the user's, not the checkout's docs/
sys.path.insert(0, str(REPO))
# The shared reference data beside the repository (weights, test/), unless told otherwise.
os.environ.setdefault("LPRNET_EDGE_DATA", str(REPO.parent / "shared" / "lprnet"))

import numpy as np  # noqa: E402
from bench_markdown import report  # noqa: E402  (beside this script)

# ---------------------------------------------------------------- preparation (parent)


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Export / compile / tune every variant once; return what the children load."""
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.flops import summary as flops_summary
    from lprnet_edge.model.weights import resolve_weights

    work.mkdir(parents=True, exist_ok=True)
    weights = resolve_weights(args.weights)
    model = load_model(weights)
    info: dict[str, Any] = {"weights": str(weights), "variants": {}}
    info["flops"] = flops_summary(model)
    onnx_path, onnx_folded = export_onnx(model, work, info)
    spec = load_target(args.target)
    mod, params = to_relax(model)
    np.savez(work / "params.npz", **{f"p{i:03d}": v for i, v in enumerate(params.values())})
    builds, records = build_modules(args, work, mod, spec, info)
    psize = sum(v.nbytes for v in params.values())
    info["variants"]["PyTorch eager fp32"] = {"kind": "torch", "size": weights.stat().st_size}
    info["variants"]["ONNX Runtime fp32"] = {"kind": "ort", "path": str(onnx_path),
                                             "size": onnx_path.stat().st_size}
    info["variants"]["ONNX Runtime fp32, constant channels folded"] = {
        "kind": "ort", "path": str(onnx_folded), "size": onnx_folded.stat().st_size}
    labels = {"naive": "TVM naive loops (no schedules)",
              "untuned": "TVM untuned (default schedules)",
              "tuned": f"TVM tuned ({records} trials)"}
    for name in builds:
        info["variants"][labels[name]] = {
            "kind": "tvm", "path": str(work / f"{name}.so"), "build": name,
            "size": (work / f"{name}.so").stat().st_size + psize}
    for item in args.artifact:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--artifact {item!r}: expected NAME=PATH")
        root = Path(path)
        m = json.loads((root / "manifest.json").read_text())
        info["variants"][name] = {"kind": "artifact", "path": str(root),
                                  "size": sum(f["size"] for f in m["files"].values())}
    info["target"] = spec.tvm
    return info


def export_onnx(model: Any, work: Path, info: dict[str, Any]) -> tuple[Path, Path]:
    """ONNX Runtime's inputs: the exported graph of the model (ORT fuses BN itself), and of
    the model with its constant channels folded, so that the table separates what the
    folding gains (any runtime could run the folded graph) from what TVM's kernels gain."""
    import torch

    from lprnet_edge.model.channel_fold import fold_all
    from lprnet_edge.model.flops import summary as flops_summary

    folded, fold_report = fold_all(model)
    info["flops_folded"] = flops_summary(folded)
    info["fold"] = fold_report.summary() if fold_report else "none"
    onnx_path, onnx_folded = work / "lprnet.onnx", work / "lprnet-folded.onnx"
    t0 = time.perf_counter()
    for m, path in ((model, onnx_path), (folded, onnx_folded)):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (torch.zeros(1, 3, 24, 94),), str(path),
                              input_names=["x"], output_names=["logits"], opset_version=17,
                              dynamo=False, do_constant_folding=True)
    log(f"onnx export {time.perf_counter() - t0:.1f}s")
    return onnx_path, onnx_folded


def build_modules(args: argparse.Namespace, work: Path, mod: Any, spec: Any,
                  info: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The naive and untuned modules (reused unless ``--rebuild``), then tuning (unless
    ``--no-tune``) and the tuned module when the database has records."""
    from lprnet_edge.compiler.compile import build

    builds: dict[str, Any] = {}
    for name, defaults in (("naive", False), ("untuned", True)):
        if not (work / f"{name}.so").is_file() or args.rebuild:
            t0 = time.perf_counter()
            builds[name] = build(mod, spec, work / f"{name}.so", None, defaults=defaults, log=log)
            log(f"TVM {name} build {time.perf_counter() - t0:.1f}s")
            (work / f"{name}.build.json").write_text(json.dumps(builds[name], default=str))
        else:
            builds[name] = json.loads((work / f"{name}.build.json").read_text())
    database, records = tune_or_open(args, work, mod, spec, info)
    if database is not None:
        t0 = time.perf_counter()
        builds["tuned"] = build(mod, spec, work / "tuned.so", None, database=database, log=log)
        log(f"TVM tuned build ({records} records) {time.perf_counter() - t0:.1f}s")
    info["builds"] = {k: {"schedules": v.get("schedules"), "naive": v.get("untuned_kernels"),
                          "kernel_schedules": v.get("kernel_schedules")}
                      for k, v in builds.items()}
    return builds, records


def tune_or_open(args: argparse.Namespace, work: Path, mod: Any, spec: Any,
                 info: dict[str, Any]) -> tuple[Any, int]:
    """The tuning database (None when it has no records) and its record count."""
    from lprnet_edge.compiler.compile import prepare_for_tuning
    from lprnet_edge.compiler.tuning import (
        TuneConfig,
        TuneOptions,
        count_records,
        open_database,
        resolve_db_dir,
        tune,
    )

    cfg = TuneConfig(trials=args.trials, num_trials_per_iter=args.trials_per_iter,
                     db_dir=args.tuning_db)
    tasks = [t for t in args.tasks.split(",") if t] or None
    tune_summary: dict[str, Any] | None = None
    if args.no_tune:
        db_dir = resolve_db_dir(spec, prepare_for_tuning(mod, spec), cfg)
        database = open_database(db_dir) if count_records(db_dir) else None
    else:
        database, summary = tune(mod, spec, cfg, log=log, options=TuneOptions(
            tasks=tasks, time_budget_s=args.tune_minutes * 60 if args.tune_minutes else None))
        tune_summary = summary.to_dict()
        db_dir = Path(tune_summary["db_dir"])
        (work / "tune-summary.json").write_text(json.dumps(tune_summary, default=str))
    records = count_records(db_dir)
    info["tuning"] = {"db_dir": str(db_dir), "records": records, "budget": args.trials,
                      "tasks": tasks or "all", "summary": tune_summary,
                      "tuning_time_s": (tune_summary or {}).get("wall_s")
                      if tune_summary and not tune_summary.get("skipped")
                      else _tuning_time(db_dir)}
    return database, records


def _tuning_time(db_dir: Path) -> float | None:
    """Sum of the tuning workers' logged times (lprnet-edge writes one log per run)."""
    total = 0.0
    for p in sorted((db_dir / "logs").glob("worker-*.log")):
        stamps = [ln[:19] for ln in p.read_text(errors="replace").splitlines()
                  if ln[:4].isdigit() and ln[4:5] == "-"]
        if len(stamps) >= 2:
            fmt = "%Y-%m-%d %H:%M:%S"
            total += (time.mktime(time.strptime(stamps[-1], fmt))
                      - time.mktime(time.strptime(stamps[0], fmt)))
    return round(total, 1) if total else None


# ---------------------------------------------------------------- measuring (child)


def load_variants(info: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    """name -> callable(x) -> logits, every one limited to ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    from lprnet_edge.compiler.session import load_host
    from lprnet_edge.model.checkpoint import load_model

    fns: dict[str, Any] = {}
    params = dict(np.load(work / "params.npz"))
    plist = [params[k] for k in sorted(params)]
    for name, v in info["variants"].items():
        if v["kind"] == "torch":
            model = load_model(info["weights"])

            def run_torch(x: np.ndarray, model: Any = model) -> np.ndarray:
                # Denormals flushed, set again before every call: creating an ORT session or
                # running TVM on this thread can reset the FPU mode (34% of the checkpoint's
                # weights are denormal: 10x slower on Intel without it).
                torch.set_flush_denormal(True)
                with torch.inference_mode():
                    return model(torch.from_numpy(x)).numpy()

            fns[name] = run_torch
        elif v["kind"] == "ort":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            sess = ort.InferenceSession(v["path"], so, providers=["CPUExecutionProvider"])
            fns[name] = lambda x, sess=sess: sess.run(None, {"x": x})[0]
        elif v["kind"] == "tvm":
            fns[name] = load_host(v["path"], plist)
        else:
            from lprnet_edge.runtime.recognizer import Recognizer

            fns[name] = Recognizer.from_artifact(v["path"], num_threads=threads).backend
    return fns


def measure(fns: dict[str, Any], runs: int, warmup: int) -> dict[str, dict[str, float]]:
    from lprnet_edge.runtime.preprocess import Preprocess
    from lprnet_edge.runtime.recognizer import _synthetic_plate

    pre = Preprocess()
    x = np.ascontiguousarray(pre(_synthetic_plate(pre)), dtype=np.float32)
    ref = None
    out: dict[str, dict[str, float]] = {}
    for name, fn in fns.items():  # warm-up, and every variant computes the same logits
        for _ in range(warmup):
            y = fn(x)
        ref = y if ref is None else ref
        out[name] = {"max_abs_diff_vs_first": float(np.abs(np.asarray(y) - ref).max())}
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    for name, s in samples.items():
        a = np.asarray(s)
        out[name].update(p50_ms=float(np.median(a)), p90_ms=float(np.percentile(a, 90)),
                         min_ms=float(a.min()), runs=len(a))
    return out


ISOLATED_ROUNDS = 10  # blocks per variant at more than one thread


def variant_fn(info: dict[str, Any], work: str, name: str, threads: int) -> Any:
    """Worker factory: one variant alone in its process (``measure_isolated``)."""
    return load_variants({**info, "variants": {name: info["variants"][name]}}, Path(work),
                         threads)[name]


def measure_isolated(info: dict[str, Any], work: Path, threads: int, runs: int, warmup: int
                     ) -> dict[str, dict[str, float]]:
    """Every variant in a process of its own, ``ISOLATED_ROUNDS`` alternating blocks of
    ``runs / ISOLATED_ROUNDS`` calls; the same figures as :func:`measure`."""
    from lprnet_edge.runtime.isolated import WorkerSpec, run_isolated, thread_env
    from lprnet_edge.runtime.peers import fixed_input

    specs = [WorkerSpec(name, name, variant_fn, {"info": info, "work": str(work), "name": name,
                                                 "threads": threads}, thread_env(threads))
             for name in info["variants"]]
    res = run_isolated(specs, fixed_input(), rounds=ISOLATED_ROUNDS,
                       runs=max(1, runs // ISOLATED_ROUNDS), warmup=warmup)
    if res.errors:
        raise SystemExit(f"variants failed in their own process: {res.errors}")
    ref = next(iter(res.outputs.values()))
    out: dict[str, dict[str, float]] = {}
    for name, blocks in res.blocks.items():
        a = np.asarray([t for b in blocks for t in b]) * 1e3
        out[name] = {"max_abs_diff_vs_first": float(np.abs(res.outputs[name] - ref).max()),
                     "p50_ms": float(np.median([np.median(b) * 1e3 for b in blocks])),
                     "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min()),
                     "runs": len(a)}
    return out


def profile_fastest(info: dict[str, Any], fns: dict[str, Any],
                    lat: dict[str, dict[str, float]], threads: int) -> dict[str, Any] | None:
    """Per-kernel profile (``VirtualMachine.set_instrument``) of the fastest TVM variant."""
    from lprnet_edge.runtime.preprocess import Preprocess
    from lprnet_edge.runtime.recognizer import _synthetic_plate

    tvm_names = [n for n, v in info["variants"].items() if v["kind"] == "tvm"]
    if not tvm_names:
        return None
    name = min(tvm_names, key=lambda n: lat[n]["p50_ms"])
    fn = fns[name]
    if not hasattr(fn, "profile"):
        return None
    pre = Preprocess()
    x = np.ascontiguousarray(pre(_synthetic_plate(pre)), dtype=np.float32)
    from lprnet_edge.runtime.profile import KernelSchedules

    ks = ((info.get("builds") or {}).get(info["variants"][name].get("build")) or {}).get(
        "kernel_schedules")
    prof = fn.profile(x, runs=30, warmup=5, threads=threads,
                      schedules=KernelSchedules(dict(ks)) if ks else None)
    return {"variant": name, "text": prof.format(top=12), "kernels_ms": prof.kernels_ms}


def accuracy(fns: dict[str, Any], test_dir: Path, skip: tuple[str, ...] = ()
             ) -> dict[str, float]:
    from lprnet_edge.runtime.charset import load_charset
    from lprnet_edge.runtime.evaluate import evaluate
    from lprnet_edge.runtime.recognizer import Recognizer

    cs = load_charset()
    res = {}
    for name, fn in fns.items():
        if name in skip:
            continue
        backend = fn

        class _B:
            def __init__(self, f: Any, n: str) -> None:
                self.f, self.name = f, n

            def __call__(self, x: np.ndarray) -> np.ndarray:
                return np.asarray(self.f(x))

        rec = Recognizer(_B(backend, name), cs)
        t0 = time.perf_counter()
        res[name] = evaluate(rec, test_dir).accuracy
        log(f"accuracy {name}: {res[name]:.3f} ({time.perf_counter() - t0:.0f}s)")
    return res


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    info = json.loads((work / "info.json").read_text())
    if args.threads > 1:
        lat = measure_isolated(info, work, args.threads, args.runs, args.warmup)
        tvm = [n for n, v in info["variants"].items() if v["kind"] == "tvm"]
        fastest = min(tvm, key=lambda n: lat[n]["p50_ms"]) if tvm else None
        fns = load_variants({**info, "variants": {fastest: info["variants"][fastest]}}, work,
                            args.threads) if fastest else {}
    else:
        fns = load_variants(info, work, args.threads)
        lat = measure(fns, args.runs, args.warmup)
    res: dict[str, Any] = {"threads": args.threads, "latency": lat,
                           "isolated": args.threads > 1}
    res["profile"] = profile_fastest(info, fns, lat, args.threads)
    if args.accuracy and args.test_dir:
        res["accuracy"] = accuracy(fns, Path(args.test_dir),
                                   tuple(x for x in args.accuracy_skip.split(",") if x))
    print("@@RESULT " + json.dumps(res), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="Thread counts, comma-separated.")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--trials", type=int, default=600, help="Tuning budget (records reused).")
    ap.add_argument("--trials-per-iter", type=int, default=16)
    ap.add_argument("--tune-minutes", type=float, default=None,
                    help="Start no new tuning round after this many minutes.")
    ap.add_argument("--tasks", default="",
                    help="Tune only tasks whose name contains one of these (comma-separated; "
                         "empty: all, with the balanced scheduler).")
    ap.add_argument("--no-tune", action="store_true",
                    help="Do not tune: apply the records the database already has.")
    ap.add_argument("--tuning-db", help="Tuning database directory (default: the cache).")
    ap.add_argument("--target", default="host")
    ap.add_argument("--weights")
    ap.add_argument("--artifact", action="append", default=[], metavar="NAME=PATH",
                    help="Also time an lprnet-edge artifact (e.g. a pruned or int8 build).")
    ap.add_argument("--accuracy", action="store_true", help="Evaluate on test/ (batch 1).")
    ap.add_argument("--test-dir", default=None)
    ap.add_argument("--accuracy-skip", default="TVM naive loops (no schedules)",
                    help="Variants not evaluated (comma-separated; default: the untuned "
                         "module, slow and numerically the same as the tuned one: see the "
                         "logit-difference column).")
    ap.add_argument("--work", default=None,
                    help="Where exported/compiled variants go (default: $LPRNET_EDGE_CACHE/bench).")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="Markdown file to write (default: a folder of yours, never the "
                         "checkout's docs/ unless asked).")
    ap.add_argument("--rebuild", action="store_true", help="Rebuild the untuned module.")
    ap.add_argument("--report-only", action="store_true",
                    help="Rewrite --out from the last run's info.json/results.json in --work.")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=3,
                    help="--target rpi4|rpi5: qemu runs at a time for the estimates.")
    ap.add_argument("--only-built", action="store_true",
                    help="--target rpi4|rpi5: estimate only the variants already in --work.")
    return ap.parse_args()


def run_arm(args: argparse.Namespace) -> None:
    """A board's core without the board: estimated by the cost instrument (arm_table.py)."""
    from arm_table import run as arm_run

    from lprnet_edge.paths import cache_dir

    work = Path(args.work) if args.work else cache_dir() / "bench-arm"
    out = (args.out if args.out != DEFAULT_OUT
           else str(Path(DEFAULT_OUT).with_name("benchmarks-arm.md")))
    test_dir = None
    if args.accuracy:
        from lprnet_edge.model.calib import default_test_dir

        test_dir = Path(args.test_dir) if args.test_dir else default_test_dir()
    print(arm_run(args.target, work, Path(out), args.jobs, build=not args.only_built,
                  test_dir=test_dir))


def main() -> None:
    args = parse_args()
    if args.target in ("rpi4", "rpi5") and not args.child:
        run_arm(args)
        return
    if args.child:
        args.threads = int(args.threads)
        child(args)
        return

    if args.work is None:
        from lprnet_edge.paths import cache_dir

        args.work = str(cache_dir() / "bench")
    work = Path(args.work)
    if args.report_only:
        info = json.loads((work / "info.json").read_text())
        results = json.loads((work / "results.json").read_text())
        write_report(info, results, info.get("runs", args.runs), info.get("warmup", args.warmup),
                     Path(args.out))
        return
    info = prepare(args, work)
    info["loadavg"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    info["command"] = shlex.join(sys.argv[1:])  # runs again as written (labels quoted)
    info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    info["runs"], info["warmup"] = args.runs, args.warmup
    (work / "info.json").write_text(json.dumps(info, indent=1, default=str))
    results = measure_all(args, work)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    write_report(info, results, args.runs, args.warmup, Path(args.out))


def measure_all(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """One child process per thread count (TVM sizes its pool once per process)."""
    test_dir = args.test_dir
    if args.accuracy and not test_dir:
        data = os.environ.get("LPRNET_EDGE_DATA") or str(REPO.parent / "shared" / "lprnet")
        test_dir = str(Path(data) / "test")
    results = []
    for i, n in enumerate(int(t) for t in args.threads.split(",")):
        env = dict(os.environ, TVM_NUM_THREADS=str(n), OMP_NUM_THREADS=str(n))
        cmd = [sys.executable, __file__, "--child", "--work", str(work), "--threads", str(n),
               "--runs", str(args.runs), "--warmup", str(args.warmup)]
        if args.accuracy and i == 0:  # accuracy does not depend on the thread count
            cmd += ["--accuracy", "--test-dir", test_dir, "--accuracy-skip",
                    args.accuracy_skip]
        log(f"measuring with {n} thread(s)...")
        out = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, check=True).stdout
        res = json.loads(next(ln for ln in out.splitlines()
                              if ln.startswith("@@RESULT "))[len("@@RESULT "):])
        results.append(res)
    return results


def write_report(info: dict[str, Any], results: list[dict[str, Any]], runs: int, warmup: int,
                 out: Path) -> None:
    md = report(info, results, runs, warmup, ISOLATED_ROUNDS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
