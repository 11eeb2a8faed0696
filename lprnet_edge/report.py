"""Compression report: every variant's test accuracy, stored size, FLOPs and latency.

``lprnet-edge report [--out docs/] [--quick]`` writes ``compression-report.md``, ``.json`` and
``.png`` (accuracy vs latency, marker area ~ stored size).

- Accuracy: exact plate match on ``test/`` at batch-1 semantics (PyTorch; the per-image
  normalisation of :func:`lprnet_edge.calib.forward_per_sample`, identical to running images
  one at a time). ``test/`` is only *measured* here: every calibration, distillation and
  selection step reads ``calib/`` through :class:`CalibrationSet`.
- Stored size: bytes of the ``params.npz`` the artifact would ship (BatchNorm folded, as the
  build pipeline does), with the variant's encodings (:func:`prune.params_encodings`).
- FLOPs: :mod:`lprnet_edge.flops` (dense; ``sparse_macs`` counts non-zero weights only).
- Latency: host, batch 1, PyTorch eager with one thread (``latency_backend: torch``), or
  compiled TVM artifacts via :mod:`lprnet_edge.pipeline` (``--latency tvm``; untuned unless a
  tuning database is used, so slower than tuned figures). The host is shared: figures are
  medians and indicative.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lprnet_edge.calib import CalibrationSet, EvalSet, accuracy, load_eval_set
from lprnet_edge.configs import PruneConfig, QuantizeConfig
from lprnet_edge.flops import summary as flops_summary


@dataclass
class Variant:
    name: str
    description: str
    model: nn.Module  # what is evaluated (fake-quant for int8 activations)
    stored: nn.Module  # whose weights are stored (BN folded)
    encodings: dict[str, str]
    executes: str  # what actually computes at run time
    prune: PruneConfig | None = None
    quant: QuantizeConfig | None = None
    weights_path: Path | None = None  # checkpoint for a TVM build (pruned architectures)
    info: dict[str, Any] = field(default_factory=dict)


def _log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def torch_latency(model: nn.Module, runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Batch-1 PyTorch eager latency on one thread (median ms)."""
    from lprnet_edge.calib import forward_per_sample
    from lprnet_edge.timing import summarize

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 24, 94)
    samples = []
    try:
        with torch.inference_mode():
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                forward_per_sample(model, x)
                if i >= warmup:
                    samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(prev)
    return summarize(samples)


def tvm_latency(v: Variant, work: Path, runs: int = 30) -> dict[str, Any]:
    """Build a host TVM artifact for ``v`` with the build pipeline and benchmark it."""
    from lprnet_edge.pipeline import BuildOptions, build_artifact
    from lprnet_edge.recognizer import Recognizer
    from lprnet_edge.target import load_target

    out = work / f"artifact-{v.name}"
    opts = BuildOptions(target=load_target("host"), out=out, weights=v.weights_path,
                        force=True, prune=v.prune if v.weights_path is None else None,
                        quantize=v.quant, verify_images=0)
    res = build_artifact(opts, log=lambda _m: None)
    rec = Recognizer.from_artifact(res.path, num_threads=1)
    stats = rec.benchmark(runs=runs, warmup=5, include_preprocess=False)
    params = res.path / res.manifest["runtime"]["params"]
    stats["artifact_params_bytes"] = params.stat().st_size
    return stats


def _cache_dir() -> Path:
    from lprnet_edge.weights import cache_dir

    d = cache_dir() / "compression"
    d.mkdir(parents=True, exist_ok=True)
    return d


def channel_pruned_distilled(original: nn.Module, calib: CalibrationSet, ratios: dict[str, float],
                             epochs: int, budget_s: float, seed: int = 0,
                             cache: bool = True, log: Callable[[str], None] = _log
                             ) -> tuple[nn.Module, dict[str, Any], Path]:
    """Channel-prune ``original`` with per-group ``ratios`` (+ dead channels) and distill on the
    training split of ``calib``; cached by configuration (and weights) in the cache dir."""
    from lprnet_edge.distill import DistillConfig, distill
    from lprnet_edge.model_io import load_model, save_checkpoint
    from lprnet_edge.prune import channel_widths, prune_channels

    train, val = calib.split(0.3, seed)
    widths = channel_widths(original, ratios)
    wsum = float(sum(float(p.detach().abs().sum()) for p in original.parameters()))
    key_src = json.dumps({"w": widths, "e": epochs, "b": budget_s, "s": seed, "sd": wsum,
                          "n": len(calib)}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    path = _cache_dir() / f"channels-{key}.pth"
    info: dict[str, Any] = {"widths": widths}
    pruned, pinfo = prune_channels(original, widths, train.x)
    info["head_factor"] = pinfo["head_factor"]
    info["val_accuracy_original"] = accuracy(original, val)
    info["val_accuracy_pruned"] = accuracy(pruned, val)
    if cache and path.is_file():
        log(f"  using cached distilled model {path}")
        model = load_model(path, check_sha=False)
        meta = torch.load(path, map_location="cpu", weights_only=True)
        info["distill"] = json.loads(meta.get("history", "{}"))
    elif epochs > 0:
        log(f"  distilling {widths} for up to {epochs} epochs / {budget_s:.0f}s")
        model, hist = distill(original, pruned, train,
                              DistillConfig(epochs=epochs, seed=seed, time_budget_s=budget_s),
                              val=val, progress=lambda r: log(f"    {r}"))
        info["distill"] = hist
        save_checkpoint(model, path, history=json.dumps(hist))
    else:
        model = pruned
        save_checkpoint(model, path)
    info["val_accuracy_final"] = accuracy(model, val)
    return model, info, path


def build_variants(original: nn.Module, calib: CalibrationSet, quick: bool = False,
                   log: Callable[[str], None] = _log) -> list[Variant]:
    from lprnet_edge.compile import fold_batchnorm
    from lprnet_edge.model_io import save_checkpoint
    from lprnet_edge.prune import channel_widths, params_encodings, prune, prune_channels
    from lprnet_edge.quantize import quantize

    train, _val = calib.split(0.3, 0)
    out: list[Variant] = []

    def add(name: str, desc: str, model: nn.Module, executes: str, pcfg: PruneConfig | None = None,
            qcfg: QuantizeConfig | None = None, stored: nn.Module | None = None,
            weights_path: Path | None = None, info: dict | None = None) -> None:
        st = fold_batchnorm(stored if stored is not None else model)
        enc = params_encodings(st, pcfg, quant=qcfg)
        out.append(Variant(name, desc, model, st, enc, executes, pcfg, qcfg, weights_path,
                           info or {}))

    log("variant: original")
    add("original", "pretrained LPRNet, fp32", original, "fp32")

    sparsities = (0.8,) if quick else (0.8, 0.9)
    for s in sparsities:
        log(f"variant: unstructured {s:.0%}")
        pcfg = PruneConfig(kind="unstructured", sparsity=s)
        pm, rep = prune(original, pcfg)
        tag = f"sparse{int(s * 100)}"
        if s == sparsities[0]:
            add(tag, f"global L1 magnitude pruning {s:.0%}, sparse fp32 storage", pm,
                "fp32 (dense kernels)", pcfg, info={"global_sparsity": rep["global_sparsity"]})
        qf = QuantizeConfig(mode="fp16")
        qm, _ = quantize(pm, qf)
        add(f"{tag}+fp16", f"{s:.0%} sparse, fp16 values (sparse-fp16)", qm,
            "fp32 (weights decoded from fp16)", pcfg, qf)
        qw = QuantizeConfig(mode="int8-weights")
        qm, _ = quantize(pm, qw)
        add(f"{tag}+int8w", f"{s:.0%} sparse, weight-only int8 (zeros compress)", qm,
            "fp32 (weights decoded from int8)", pcfg, qw)

    log("variant: dense int8 weight-only / fp16")
    qw = QuantizeConfig(mode="int8-weights")
    qm, _ = quantize(original, qw)
    add("int8w", "weight-only int8 per-channel, dense", qm, "fp32 (weights decoded from int8)",
        None, qw)

    log("variant: simulated int8 (weights + activations)")
    qi = QuantizeConfig(mode="int8", calibrator="percentile", fallback_layers=("container.0",))
    qm, qrep = quantize(original, qi, train)
    add("int8-sim", "int8 weights + activations (percentile 99.99, per-channel), head fp32 "
        "(simulated)", qm, "int8 x int8 -> int32 convs (simulated in PyTorch; "
        "see relax_int8_rewrite)", None, qi, stored=fold_batchnorm(original))

    log("variant: channel pruning (dead channels only, no training)")
    widths = channel_widths(original, 0.0)
    cm, cinfo = prune_channels(original, widths, train.x)
    p = _cache_dir() / "channels-dead.pth"
    save_checkpoint(cm, p)
    add("channels-dead", f"remove dead channels {widths}", cm, "fp32", weights_path=p,
        info={"widths": widths, "head_factor": cinfo["head_factor"]})

    ratios = {"b2_mid": 0.5, "b3_mid": 0.5}
    epochs, budget = (2, 60.0) if quick else (8, 420.0)
    log(f"variant: channel pruning {ratios} + distillation")
    dm, dinfo, dpath = channel_pruned_distilled(original, calib, ratios, epochs, budget, log=log)
    add("channels-b23x0.5+kd", f"dead channels + b2/b3 mid widths halved {dinfo['widths']}, "
        "distilled on calib/", dm, "fp32", weights_path=dpath, info=dinfo)
    qw = QuantizeConfig(mode="int8-weights")
    qm, _ = quantize(dm, qw)
    add("channels-b23x0.5+kd+int8w", "channel-pruned + distilled, weight-only int8", qm,
        "fp32 (weights decoded from int8)", None, qw, weights_path=dpath, info=dinfo)
    if not quick:
        pcfg = PruneConfig(kind="unstructured", sparsity=0.7)
        sm, _ = prune(dm, pcfg)
        qm, _ = quantize(sm, qw)
        add("channels-b23x0.5+kd+sparse70+int8w",
            "channel-pruned + distilled, then 70% unstructured, weight-only int8", qm,
            "fp32 (weights decoded from int8)", pcfg, qw, stored=sm, info=dinfo)
    return out


def measure(variants: list[Variant], test: EvalSet, latency: str = "torch",
            work: Path | None = None, log: Callable[[str], None] = _log) -> list[dict[str, Any]]:
    from lprnet_edge.prune import stored_size

    rows = []
    base: dict[str, Any] | None = None
    fp32_ref = 4 * sum(p.numel() for p in variants[0].model.parameters())
    for v in variants:
        t0 = time.time()
        acc = accuracy(v.model, test)
        fl = flops_summary(v.stored)
        size = stored_size(v.stored, v.encodings)
        row: dict[str, Any] = {
            "name": v.name, "description": v.description, "executes": v.executes,
            "test_accuracy": acc, "test_images": len(test.labels),
            "stored_bytes": size, "fp32_reference_bytes": fp32_ref,
            "compression_vs_fp32": fp32_ref / size,
            "flops": fl["flops"], "macs": fl["macs"], "sparse_macs": fl["sparse_macs"],
            "params": fl["params"], "nonzero_params": fl["nonzero_params"],
            "encodings": dict(sorted({e: sum(1 for x in v.encodings.values() if x == e)
                                      for e in set(v.encodings.values())}.items())),
            "prune": v.prune.to_dict() if v.prune else None,
            "quantize": v.quant.to_dict() if v.quant else None,
            "info": _jsonable(v.info),
        }
        lat_backend = "torch"
        if latency == "tvm":
            try:
                stats = tvm_latency(v, work or _cache_dir())
                lat_backend = "tvm"
                row["artifact_params_bytes"] = stats.get("artifact_params_bytes")
            except Exception as e:  # a failed build falls back to PyTorch, and says so
                log(f"  TVM build for {v.name} failed ({type(e).__name__}: {e}); using PyTorch")
                stats = torch_latency(v.model)
        else:
            stats = {"p50_ms": float("nan")}  # measured below, interleaved across variants
        row["latency_ms"] = stats["p50_ms"]
        row["latency_backend"] = lat_backend
        if base is None:
            base = row
        row["accuracy_change_points"] = 100 * (acc - base["test_accuracy"])
        row["size_ratio"] = base["stored_bytes"] / size
        row["flops_ratio"] = base["flops"] / fl["flops"]
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        log(f"  {v.name}: acc {acc:.3f} ({row['accuracy_change_points']:+.1f} pt), "
            f"{size / 1e3:.1f} kB ({row['compression_vs_fp32']:.1f}x vs fp32), "
            f"{fl['flops'] / 1e6:.0f} MFLOPs")
    if latency != "tvm":
        interleaved_latency(variants, rows, log=log)
    for row in rows:
        row["latency_ratio"] = rows[0]["latency_ms"] / row["latency_ms"]
    return rows


def interleaved_latency(variants: list[Variant], rows: list[dict[str, Any]], rounds: int = 5,
                        runs: int = 20, log: Callable[[str], None] = _log) -> None:
    """PyTorch latency of every variant, measured in interleaved rounds (the median of the
    per-round medians), so that load changes on a shared host hit all variants alike."""
    per: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            per[v.name].append(torch_latency(v.model, runs=runs, warmup=2)["p50_ms"])
    for v, row in zip(variants, rows, strict=True):
        row["latency_ms"] = float(np.median(per[v.name]))
        row["latency_backend"] = "torch"
        row["latency_rounds_ms"] = per[v.name]
        log(f"  {v.name}: {row['latency_ms']:.2f} ms (torch, 1 thread)")


def refresh_latency(out: str | Path = "docs", quick: bool = False, selection: bool = False,
                    log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Re-measure the latency column of an existing report (interleaved) and rewrite it.

    Rebuilds the variants (the distilled model comes from the cache), keeps every other
    figure of ``compression-report.json``.
    """
    from lprnet_edge.calib import data_root
    from lprnet_edge.model_io import load_model

    out = Path(out)
    rep = json.loads((out / "compression-report.json").read_text(encoding="utf-8"))
    root = data_root()
    original = load_model(root / "weights" / "Final_LPRNet_model.pth")
    calib = CalibrationSet.load(root / "calib", keep_raw=True)
    variants = build_variants(original, calib, quick=quick, log=log)
    by_name = {r["name"]: r for r in rep["variants"]}
    keep = [v for v in variants if v.name in by_name]
    rows = [by_name[v.name] for v in keep]
    interleaved_latency(keep, rows, log=log)
    for row in rows:
        row["latency_ratio"] = rows[0]["latency_ms"] / row["latency_ms"]
    rep["variants"] = rows
    if selection:
        from lprnet_edge.select import Candidate, select

        log("selection on the calib/ validation split")
        cands = [Candidate(v.name, v.prune, v.quant, pruned_model=v.stored) for v in keep]
        rep["selection"] = _jsonable(select(original, cands, calib, budget=0.005,
                                            guard="lost"))
    rep["refreshed"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "compression-report.json").write_text(
        json.dumps(_jsonable(rep), indent=2, ensure_ascii=False), encoding="utf-8")
    write_markdown(out / "compression-report.md", rep)
    plot(out / "compression-report.png", rows)
    return rep


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The two targets of the compression work, and the best variant for each."""
    small = [r for r in rows if r["compression_vs_fp32"] >= 8.0]
    g1 = [r for r in small if r["accuracy_change_points"] >= -0.5]
    fast = [r for r in rows if r["flops_ratio"] >= 1.5 and "sim" not in r["name"]]
    g2 = [r for r in fast if r["accuracy_change_points"] >= -1.0]
    return {
        "size_8x_within_0.5pt": {
            "met": bool(g1),
            "variants": [r["name"] for r in g1],
            "best_small": max(small, key=lambda r: r["test_accuracy"])["name"] if small else None,
        },
        "flops_1.5x_within_1pt": {
            "met": bool(g2),
            "variants": [r["name"] for r in g2],
            "best_fast": max(fast, key=lambda r: r["test_accuracy"])["name"] if fast else None,
        },
    }


def write_markdown(path: Path, rep: dict[str, Any]) -> None:
    rows = rep["variants"]
    lines = [
        "# Compression report",
        "",
        f"Generated {rep['generated']} by `lprnet-edge report"
        f"{' --quick' if rep['quick'] else ''}` in {rep['seconds']:.0f} s.",
        "",
        f"- Accuracy: exact plate match on `test/` ({rows[0]['test_images']} plates), batch-1 "
        "semantics, PyTorch. `test/` was only measured; calibration, distillation and "
        "selection used `calib/` (and a fixed-seed validation split of it).",
        f"- Stored size: `params.npz` bytes with the variant's encodings (BatchNorm folded); "
        f"the fp32 reference is {rows[0]['fp32_reference_bytes'] / 1e6:.2f} MB (4 bytes x "
        f"{rows[0]['fp32_reference_bytes'] // 4} parameters of the original).",
        "- Latency: host, batch 1; backend per row (`torch` = PyTorch eager, 1 thread, median "
        "of 5 interleaved rounds; `tvm` = compiled artifact). Sparse / fp16 / int8-weight "
        "variants run the same dense float32 graph as the original (their differences are "
        "noise); `int8-sim` in PyTorch runs the fake-quant simulation, not int8 kernels. The "
        "host was shared with other jobs (load ~10 on 2 cores): indicative only.",
        "",
        "| variant | test acc | change (pt) | stored | x vs fp32 | MFLOPs | x fewer FLOPs | "
        "latency ms | executes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['test_accuracy']:.3f} | {r['accuracy_change_points']:+.1f} | "
            f"{r['stored_bytes'] / 1e3:.0f} kB | {r['compression_vs_fp32']:.1f} | "
            f"{r['flops'] / 1e6:.0f} | {r['flops_ratio']:.2f} | {r['latency_ms']:.2f} "
            f"({r['latency_backend']}) | {r['executes']} |")
    g = rep["goals"]
    lines += ["", "## Goals", ""]
    a, b = g["size_8x_within_0.5pt"], g["flops_1.5x_within_1pt"]
    lines.append(f"- >= 8x smaller stored weights with <= 0.5 pt lost on test: "
                 f"**{'met' if a['met'] else 'not met'}**"
                 + (f" by {', '.join(a['variants'])}" if a["met"]
                    else f" (best >= 8x variant: {a['best_small']})"))
    lines.append(f"- >= 1.5x fewer FLOPs with <= 1 pt lost on test: "
                 f"**{'met' if b['met'] else 'not met'}**"
                 + (f" by {', '.join(b['variants'])}" if b["met"]
                    else f" (best >= 1.5x variant: {b['best_fast']})"))
    lines += ["", "Descriptions:", ""]
    lines += [f"- `{r['name']}`: {r['description']}" for r in rows]
    if rep.get("selection"):
        s = rep["selection"]
        lines += ["", "## Accuracy-guarded selection (calib/ validation split)", "",
                  f"Guard `{s.get('guard', 'drop')}`, budget {100 * s['budget']:.1f} pt vs the "
                  "original "
                  f"({s['original_val_accuracy']:.3f} on {s['val_split']['images']} images, "
                  f"seed {s['val_split']['seed']}); selected: **{s['selected']}**.", "",
                  "| candidate | val acc | drop (pt) | lost (pt) | gained (pt) | agreement | "
                  "stored | MFLOPs | within budget |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in s["candidates"]:
            lines.append(f"| {c['name']} | {c['val_accuracy']:.3f} | {100 * c['val_drop']:+.1f} "
                         f"| {100 * c.get('val_lost', 0):.1f} | "
                         f"{100 * c.get('val_gained', 0):.1f} "
                         f"| {c['val_agreement']:.3f} | {c['stored_bytes'] / 1e3:.0f} kB | "
                         f"{c['flops'] / 1e6:.0f} | {'yes' if c['within_budget'] else 'no'} |")
    lines += ["", "![accuracy vs latency](compression-report.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    sizes = np.array([r["stored_bytes"] for r in rows], dtype=float)
    area = 40 + 600 * sizes / sizes.max()
    lat = [r["latency_ms"] for r in rows]
    acc = [r["test_accuracy"] for r in rows]
    ax.scatter(lat, acc, s=area, alpha=0.55, edgecolors="k")
    for r, x, y in zip(rows, lat, acc, strict=True):
        ax.annotate(f"{r['name']}\n{r['stored_bytes'] / 1e3:.0f} kB", (x, y), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"latency, ms (host, batch 1, {rows[0]['latency_backend']})")
    ax.set_ylabel("test accuracy (exact plate, batch 1)")
    ax.set_title("LPRNet compression variants (marker area ~ stored size)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_report(out: str | Path = "docs", quick: bool = False, weights: str | None = None,
               calib_dir: str | Path | None = None, test_dir: str | Path | None = None,
               latency: str = "torch", selection: bool | None = None,
               model: nn.Module | None = None, calib: CalibrationSet | None = None,
               test: EvalSet | None = None, log: Callable[[str], None] = _log
               ) -> dict[str, Any]:
    """Build every variant, measure it, write the three report files into ``out``."""
    from lprnet_edge.model_io import load_model
    from lprnet_edge.weights import resolve_weights

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None and weights is None:
        from lprnet_edge.calib import data_root

        root = data_root()
        cand = root / "weights" / "Final_LPRNet_model.pth" if root is not None else None
        weights = str(cand) if cand is not None and cand.is_file() else None
    original = model if model is not None else load_model(resolve_weights(weights))
    calib = calib if calib is not None else CalibrationSet.load(calib_dir, keep_raw=True,
                                                                test_dir=test_dir)
    test = test if test is not None else load_eval_set(test_dir)
    variants = build_variants(original, calib, quick=quick, log=log)
    log(f"measuring {len(variants)} variants on {len(test.labels)} test plates")
    rows = measure(variants, test, latency, out / ".artifacts" if latency == "tvm" else None,
                   log)
    rep: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": quick, "variants": rows, "goals": goals(rows),
    }
    if selection if selection is not None else not quick:
        from lprnet_edge.select import Candidate, select

        log("selection on the calib/ validation split")
        cands = [Candidate(v.name, v.prune, v.quant, pruned_model=v.stored)
                 for v in variants]
        rep["selection"] = _jsonable(select(original, cands, calib, budget=0.005,
                                            guard="lost"))
    rep["seconds"] = time.time() - t0
    (out / "compression-report.json").write_text(
        json.dumps(_jsonable(rep), indent=2, ensure_ascii=False), encoding="utf-8")
    write_markdown(out / "compression-report.md", rep)
    plot(out / "compression-report.png", rows)
    return rep
