#!/usr/bin/env python
"""LPRNet latency on this machine, batch 1: PyTorch eager, ONNX Runtime, TVM untuned/tuned.

One run measures every variant *interleaved* (round-robin: one call of each variant in
turn, ``--runs`` times after a warm-up), so a shared, noisy machine slows all variants alike;
the figure is the median. Every variant gets the same thread count; each thread count runs
in its own process (TVM's thread pool is sized once per process, from TVM_NUM_THREADS).

    python benchmarks/run.py                      # 1 and 2 threads, tunes to --trials first
    python benchmarks/run.py --no-tune            # apply the tuning records there are
    python benchmarks/run.py --accuracy --artifact int8=build/lprnet-int8

Writes docs/benchmarks.md (``--out``) and prints the table. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The shared reference data beside the repository (weights, test/), unless told otherwise.
os.environ.setdefault("LPRNET_EDGE_DATA", str(REPO.parent / "shared" / "lprnet"))

import numpy as np  # noqa: E402

# ---------------------------------------------------------------- preparation (parent)


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Export / compile / tune every variant once; return what the children load."""
    import torch

    from lprnet_edge.compiler.build import build
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.compiler.tune import count_records, resolve_db_dir, tune
    from lprnet_edge.compress.configs import TuneConfig
    from lprnet_edge.model.channel_fold import fold_all
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.flops import summary as flops_summary
    from lprnet_edge.model.weights import resolve_weights

    work.mkdir(parents=True, exist_ok=True)
    weights = resolve_weights(args.weights)
    model = load_model(weights)
    info: dict[str, Any] = {"weights": str(weights), "variants": {}}
    info["flops"] = flops_summary(model)

    # ONNX Runtime: the exported graph of the same model (ORT fuses BN itself), and of the
    # model with its constant channels folded, so that the table separates what the folding
    # gains (any runtime could run the folded graph) from what TVM's kernels gain.
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

    spec = load_target(args.target)
    mod, params = to_relax(model)
    np.savez(work / "params.npz", **{f"p{i:03d}": v for i, v in enumerate(params.values())})
    builds: dict[str, Any] = {}
    for name, defaults in (("naive", False), ("untuned", True)):
        if not (work / f"{name}.so").is_file() or args.rebuild:
            t0 = time.perf_counter()
            builds[name] = build(mod, spec, work / f"{name}.so", None, defaults=defaults, log=log)
            log(f"TVM {name} build {time.perf_counter() - t0:.1f}s")
            (work / f"{name}.build.json").write_text(json.dumps(builds[name], default=str))
        else:
            builds[name] = json.loads((work / f"{name}.build.json").read_text())

    cfg = TuneConfig(trials=args.trials, num_trials_per_iter=args.trials_per_iter,
                     db_dir=args.tuning_db)
    tasks = [t for t in args.tasks.split(",") if t] or None
    tune_summary: dict[str, Any] | None = None
    if args.no_tune:
        from lprnet_edge.compiler.build import prepare_for_tuning
        from lprnet_edge.compiler.tune import open_database

        db_dir = resolve_db_dir(spec, prepare_for_tuning(mod, spec), cfg)
        database = open_database(db_dir) if count_records(db_dir) else None
    else:
        database, tune_summary = tune(mod, spec, cfg, log=log, tasks=tasks,
                                      time_budget_s=args.tune_minutes * 60
                                      if args.tune_minutes else None)
        db_dir = Path(tune_summary["db_dir"])
        (work / "tune-summary.json").write_text(json.dumps(tune_summary, default=str))
    records = count_records(db_dir)
    info["tuning"] = {"db_dir": str(db_dir), "records": records, "budget": args.trials,
                      "tasks": tasks or "all", "summary": tune_summary,
                      "tuning_time_s": (tune_summary or {}).get("wall_s")
                      if tune_summary and not tune_summary.get("skipped")
                      else _tuning_time(db_dir)}
    if database is not None:
        t0 = time.perf_counter()
        builds["tuned"] = build(mod, spec, work / "tuned.so", None, database=database, log=log)
        log(f"TVM tuned build ({records} records) {time.perf_counter() - t0:.1f}s")
    info["builds"] = {k: {"schedules": v.get("schedules"), "naive": v.get("untuned_kernels"),
                          "kernel_schedules": v.get("kernel_schedules")}
                      for k, v in builds.items()}

    psize = sum(v.nbytes for v in params.values())
    info["variants"]["PyTorch eager fp32"] = {"kind": "torch", "size": weights.stat().st_size}
    info["variants"]["ONNX Runtime fp32"] = {"kind": "ort", "path": str(onnx_path),
                                             "size": onnx_path.stat().st_size}
    info["variants"]["ONNX Runtime fp32, constant channels folded"] = {
        "kind": "ort", "path": str(onnx_folded), "size": onnx_folded.stat().st_size}
    info["variants"]["TVM naive loops (no schedules)"] = {
        "kind": "tvm", "path": str(work / "naive.so"), "build": "naive",
        "size": (work / "naive.so").stat().st_size + psize}
    info["variants"]["TVM untuned (default schedules)"] = {
        "kind": "tvm", "path": str(work / "untuned.so"), "build": "untuned",
        "size": (work / "untuned.so").stat().st_size + psize}
    if database is not None:
        info["variants"][f"TVM tuned ({records} trials)"] = {
            "kind": "tvm", "path": str(work / "tuned.so"), "build": "tuned",
            "size": (work / "tuned.so").stat().st_size + psize}
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
    fns = load_variants(info, work, args.threads)
    res: dict[str, Any] = {"threads": args.threads,
                           "latency": measure(fns, args.runs, args.warmup)}
    res["profile"] = profile_fastest(info, fns, res["latency"], args.threads)
    if args.accuracy and args.test_dir:
        res["accuracy"] = accuracy(fns, Path(args.test_dir),
                                   tuple(x for x in args.accuracy_skip.split(",") if x))
    print("@@RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- report


def cpu_info() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), platform.processor() or "?")
    mhz = [float(ln.split(":", 1)[1]) for ln in text.splitlines() if ln.startswith("cpu MHz")]
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    cores = os.cpu_count() or 1
    ghz = (max(mhz) / 1000) if mhz else None
    # FP32 FLOP/cycle/core: two 256-bit FMA pipes (Zen 4 runs AVX-512 FMAs as two halves;
    # Intel cores with two 512-bit FMA units reach 64, not assumed here).
    fpc = 32 if ("avx2" in flags and "fma" in flags) else 16 if "avx" in flags else 8
    llvm_cpu = None
    try:
        from lprnet_edge.compiler.target import detect_host_cpu

        llvm_cpu = detect_host_cpu()
    except Exception:  # noqa: BLE001
        pass
    return {"model": model, "cores": cores, "ghz": ghz, "flops_per_cycle": fpc,
            "simd": [f for f in ("avx512f", "avx2", "fma", "avx") if f in flags],
            "llvm_cpu": llvm_cpu,
            "peak_gflops_per_core": ghz * fpc if ghz else None}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "onnxruntime", "onnx", "apache-tvm", "apache-tvm-ffi", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def report(info: dict[str, Any], results: list[dict[str, Any]], args: argparse.Namespace
           ) -> str:
    cpu = cpu_info()
    flops = info["flops"]["flops"]
    acc = next((r.get("accuracy") for r in results if r.get("accuracy")), None)
    lines = ["# Benchmarks", "",
             "Generated by `" + f"python benchmarks/run.py {info.get('command') or ''}".strip()
             + "` on "
             f"{info.get('date') or time.strftime('%Y-%m-%d')}. "
             "Do not edit by hand: run it again.", "",
             "LPRNet (sirius-ai weights), batch 1, input 1x3x24x94 float32, model only (no "
             "image decoding or CTC decoding). Variants run **interleaved** in one process "
             f"per thread count (round-robin, {args.runs} runs after {args.warmup} warm-up "
             "calls each); the figure is the median (p50). Lower is better.", ""]
    lines += ["## Machine", "",
              f"- CPU: {cpu['model']} (LLVM: {cpu['llvm_cpu']}), {cpu['cores']} cores, "
              f"{cpu['ghz']:.2f} GHz reported, SIMD: {', '.join(cpu['simd'])}"
              if cpu["ghz"] else f"- CPU: {cpu['model']}",
              f"- Load average when the run started: {info.get('loadavg')} (a shared "
              "machine: absolute figures are noisy, ratios between interleaved variants are "
              "more stable)",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
              f"- TVM target: `{json.dumps(info['target'])}`", ""]
    t = info["tuning"]
    tt = t.get("tuning_time_s")
    lines += ["## Tuning", "",
              f"- Budget: {t['budget']} trials requested; **{t['records']} measured records** "
              f"in the database applied (tasks: {t['tasks']}), "
              + (f"tuning time {tt / 60:.0f} min (sum of the tuning runs' logs)" if tt
                 else "tuning time unknown"),
              f"- Database: `{t['db_dir']}`"]
    summ = t.get("summary") or {}
    if summ and not summ.get("skipped"):
        lines += [f"- This run: {summ.get('trials_new')} new trials in {summ.get('wall_s')} s "
                  f"({summ.get('scheduler')} scheduler); tasks without any record: "
                  + (", ".join(summ.get("untuned") or []) or "none")]
    for k, b in (info.get("builds") or {}).items():
        sc = b.get("schedules") or {}
        lines += [f"- Build `{k}`: kernels by schedule source: "
                  + (", ".join(f"{v} {n}" for n, v in sc.items() if v) or "all naive loops")
                  + (f"; naive loops: {', '.join(b['naive'])}" if b.get("naive") else "")]
    lines += ["", "Schedule sources: *tuned* = this build's tuning database; *default* = the "
              "packaged default schedules (`lprnet_edge/compiler/data/default_schedules`, "
              "made by `python benchmarks/make_default_schedules.py` from tuning runs on an "
              "x86 host; when one of them is the tuned row's database, untuned and tuned "
              "replay the same traces for those kernels); *transferred* = the trace of a "
              "similar kernel re-fitted to the shape; *naive* = TVM's default loops.", ""]
    peak = cpu["peak_gflops_per_core"]
    lines += ["## Work", "",
              f"- FLOPs per plate: {flops / 1e6:.1f} MFLOP ({info['flops']['macs'] / 1e6:.1f} M "
              "conv multiply-accumulates x 2, plus one op per output element of BN/ReLU/pool), "
              f"{info['flops']['params'] / 1e6:.2f} M parameters.",
              f"- Constant channels folded (lossless, every TVM variant here and the second "
              f"ONNX Runtime row; `lprnet_edge/model/channel_fold.py`): {info.get('fold')}; "
              f"{info.get('flops_folded', {}).get('flops', 0) / 1e6:.1f} MFLOP and "
              f"{info.get('flops_folded', {}).get('params', 0) / 1e6:.2f} M parameters left. "
              "The GFLOP/s columns divide the *original* model's FLOPs by the time "
              "(effective throughput).",
              (f"- Nominal peak: {cpu['flops_per_cycle']} FP32 FLOP/cycle/core (2 FMA pipes x "
               f"8 lanes x 2) x {cpu['ghz']:.2f} GHz (the clock /proc/cpuinfo reports; cores "
               "boost above it, so a kernel can exceed this) = "
               f"{peak:.0f} GFLOP/s per core, {peak * cpu['cores']:.0f} GFLOP/s for "
               f"{cpu['cores']} cores.")
              if peak else "- Peak: CPU frequency unknown", ""]
    for r in results:
        n = r["threads"]
        lat = r["latency"]
        torch_ms = next((v["p50_ms"] for k, v in lat.items() if k.startswith("PyTorch")), None)
        ort_ms = next((v["p50_ms"] for k, v in lat.items() if k == "ONNX Runtime fp32"), None)
        rows = []
        for name, v in lat.items():
            size = info["variants"][name]["size"]
            row = [name, f"{v['p50_ms']:.2f}", f"{v['min_ms']:.2f}",
                   f"{torch_ms / v['p50_ms']:.2f}x" if torch_ms else "-",
                   f"{ort_ms / v['p50_ms']:.2f}x" if ort_ms else "-",
                   f"{size / 1e6:.2f} MB",
                   f"{flops / (v['p50_ms'] * 1e-3) / 1e9:.1f}",
                   f"{v['max_abs_diff_vs_first']:.1e}"]
            if acc:
                row.append(f"{acc[name]:.3f}" if name in acc else "-")
            rows.append(row)
        headers = ["variant", "p50 ms", "min ms", "speed vs PyTorch", "speed vs ORT", "size",
                   "GFLOP/s", "max abs logit diff vs PyTorch"]
        headers += ["accuracy (test/, batch 1)"] if acc else []
        lines += [f"## {n} thread{'s' if n > 1 else ''}", "", _md_table(rows, headers), ""]
        best = min(lat.items(), key=lambda kv: kv[1]["p50_ms"])
        if peak:
            # What the fastest variant executes: the folded graph, unless it is one of the
            # two baselines that run the checkpoint as it is.
            unfolded = best[0] in ("ONNX Runtime fp32", "PyTorch eager fp32")
            work = flops if unfolded else info.get("flops_folded", {}).get("flops", flops)
            g = work / (best[1]["p50_ms"] * 1e-3) / 1e9
            lines += [f"Fastest: **{best[0]}** at {best[1]['p50_ms']:.2f} ms: it executes "
                      f"{work / 1e6:.0f} MFLOP, {g:.1f} GFLOP/s, {100 * g / (peak * n):.0f}% "
                      f"of the nominal {peak * n:.0f} GFLOP/s of {n} core"
                      f"{'s' if n > 1 else ''}.", ""]
        lines += ["'speed vs X' = X's p50 / this variant's p50 (above 1: faster than X).", ""]
    lines += ratio_lines(results)
    for r in results:
        pr = r.get("profile")
        if pr:
            lines += [f"## Per-kernel profile: {pr['variant']}, {r['threads']} thread"
                      f"{'s' if r['threads'] > 1 else ''}", "",
                      "`VirtualMachine.set_instrument` around every kernel call (mean of 30 "
                      "inferences), next to the uninstrumented call:", "", "```",
                      pr["text"], "```", ""]
    load1 = float(str(info.get("loadavg", "0")).split()[0] or 0)
    if load1 > cpu["cores"]:
        lines += [f"**Caveat: the machine was oversubscribed** (load average {load1:.1f} on "
                  f"{cpu['cores']} cores, other jobs running). With 2 threads a variant "
                  "competes with those jobs for both cores, and runtimes whose worker threads "
                  "spin-wait (PyTorch's OpenMP pool, ONNX Runtime) lose far more than TVM's "
                  "pool: the 2-thread ratios reflect that contention, not what an idle "
                  "2-core machine would show. The 1-thread table is the fairer comparison.",
                  ""]
    if acc:
        lines += ["Accuracy '-': not evaluated in this run (`--accuracy-skip`); the module "
                  "computes the same logits as the others within the logit-difference "
                  "column.", ""]
    if not acc:
        lines += ["Accuracy: not measured in this run (`--accuracy` evaluates every variant "
                  "on `test/` at batch 1; the PyTorch reference is 0.894).", ""]
    return "\n".join(lines)


def ratio_lines(results: list[dict[str, Any]]) -> list[str]:
    """The goals of the speed issue, measured: tuned vs ORT, untuned vs PyTorch."""
    out = ["## Goals", "", "| threads | goal | measured | reached |", "|---|---|---|---|"]
    for r in results:
        lat = {k: v["p50_ms"] for k, v in r["latency"].items()}
        ort = next((v for k, v in lat.items() if k == "ONNX Runtime fp32"), None)
        ort_folded = next((v for k, v in lat.items() if k.startswith("ONNX Runtime fp32, ")),
                          None)
        pt = next((v for k, v in lat.items() if k.startswith("PyTorch")), None)
        tuned = next((v for k, v in lat.items() if k.startswith("TVM tuned")), None)
        untuned = lat.get("TVM untuned (default schedules)")
        n = r["threads"]
        if ort and tuned:
            out.append(f"| {n} | tuned >= 1.2x ONNX Runtime | {ort / tuned:.2f}x | "
                       f"{'yes' if ort / tuned >= 1.2 else 'no'} |")
        if ort_folded and tuned:
            out.append(f"| {n} | (tuned vs ONNX Runtime on the folded graph) | "
                       f"{ort_folded / tuned:.2f}x | - |")
        if pt and untuned:
            out.append(f"| {n} | untuned >= 1.0x PyTorch eager | {pt / untuned:.2f}x | "
                       f"{'yes' if pt / untuned >= 1.0 else 'no'} |")
        if ort and untuned:
            out.append(f"| {n} | (untuned vs ONNX Runtime) | {ort / untuned:.2f}x | - |")
        out += _int8_lines(n, lat, untuned, tuned)
    return [*out, ""]


def _int8_lines(n: int, lat: dict[str, float], untuned: float | None, tuned: float | None
                ) -> list[str]:
    """The compression issue's int8 goal for each ``--artifact`` named ``int8...``: >= 1.5x
    the fp32 module at the same (zero) tuning budget; the tuned fp32 module for reference."""
    out = []
    for name, ms in lat.items():
        if not name.startswith("int8"):
            continue
        if untuned:
            out.append(f"| {n} | {name} >= 1.5x TVM fp32, both untuned | {untuned / ms:.2f}x | "
                       f"{'yes' if untuned / ms >= 1.5 else 'no'} |")
        if tuned:
            out.append(f"| {n} | ({name} vs TVM fp32 tuned) | {tuned / ms:.2f}x | - |")
    return out


def _md_table(rows: list[list[str]], headers: list[str]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
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
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--rebuild", action="store_true", help="Rebuild the untuned module.")
    ap.add_argument("--report-only", action="store_true",
                    help="Rewrite --out from the last run's info.json/results.json in --work.")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=3,
                    help="--target rpi4|rpi5: qemu runs at a time for the estimates.")
    ap.add_argument("--only-built", action="store_true",
                    help="--target rpi4|rpi5: estimate only the variants already in --work.")
    args = ap.parse_args()
    if args.target in ("rpi4", "rpi5") and not args.child:
        # A board's core without the board: estimated (cost instrument), benchmarks/arm_table.py
        from arm_table import run as arm_run

        from lprnet_edge.paths import cache_dir

        work = Path(args.work) if args.work else cache_dir() / "bench-arm"
        out = args.out if args.out != str(REPO / "docs" / "benchmarks.md") else \
            str(REPO / "docs" / "benchmarks-arm.md")
        print(arm_run(args.target, work, Path(out), args.jobs, build=not args.only_built))
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
        args.runs, args.warmup = info.get("runs", args.runs), info.get("warmup", args.warmup)
        md = report(info, results, args)
        Path(args.out).write_text(md + "\n")
        print(md)
        return
    info = prepare(args, work)
    info["loadavg"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    info["command"] = " ".join(sys.argv[1:])
    info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    info["runs"], info["warmup"] = args.runs, args.warmup
    (work / "info.json").write_text(json.dumps(info, indent=1, default=str))
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
    (work / "results.json").write_text(json.dumps(results, indent=1))
    md = report(info, results, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
