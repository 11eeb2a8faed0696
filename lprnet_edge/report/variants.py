"""Compression report: every variant's test accuracy, stored size, FLOPs and latency.

``lprnet-edge report [--out docs/] [--quick]`` writes ``compression-report.md``, ``.json`` and
``.png`` (accuracy vs latency, marker area ~ stored size).

- Accuracy: exact plate match on ``test/`` at batch-1 semantics (PyTorch; the per-image
  normalisation of :func:`lprnet_edge.model.calib.forward_per_sample`, identical to running images
  one at a time). ``test/`` is only *measured* here: every calibration, distillation and
  selection step reads ``calib/`` through :class:`CalibrationSet`.
- Stored size: bytes of the ``params.npz`` the artifact would ship (BatchNorm folded, as the
  build pipeline does), with the variant's encodings (:func:`prune.params_encodings`).
- FLOPs: :mod:`lprnet_edge.model.flops` (dense; ``sparse_macs`` counts non-zero weights only).
- Latency: host, batch 1, one thread, model only (no preprocessing or decoding), median of
  per-round medians over interleaved rounds (every variant once per round, so load changes
  on a shared host hit all variants alike). Backends: PyTorch eager (``torch``), or TVM
  artifacts built by :mod:`lprnet_edge.pipeline.build` (``--latency tvm``), tuned with a
  MetaSchedule trial budget per workload (``--trials N``, ``tvm-tuned``; databases cached by
  target + workload, so variants running the same graph share one).
- ``--refresh-latency`` re-measures only the latency column of an existing report (the
  accuracy columns take ~40 min); ``--calibrators`` adds the int8 calibrator comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lprnet_edge.compress.configs import PruneConfig, QuantizeConfig, TuneConfig
from lprnet_edge.model.calib import CalibrationSet, EvalSet, accuracy, load_eval_set
from lprnet_edge.model.flops import summary as flops_summary
from lprnet_edge.runtime.artifact import Artifact


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
    from lprnet_edge.model.calib import forward_per_sample
    from lprnet_edge.runtime.timing import summarize

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


# What the report tunes: the convolutions take nearly all of LPRNet's time (docs/tuning.md);
# the other ~25 fused kernels keep TVM's default schedules, as in the original's database.
TUNE_TASKS = ("conv2d",)
LATENCY_THREADS = 1


def tvm_build_options(v: Variant, work: Path, base_weights: str | Path | None,
                      trials: int | None) -> Any:
    """The ``BuildOptions`` of ``v``'s host artifact: its checkpoint (``weights_path``, else
    the original's), unstructured pruning and quantization as configured, and a tuning
    budget of ``trials`` (None: untuned). Verification is skipped: latency only."""
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.pipeline.build import BuildOptions

    prune = v.prune if v.prune is not None and v.prune.kind == "unstructured" else None
    return BuildOptions(target=load_target("host"), out=work / f"artifact-{v.name}",
                        weights=v.weights_path or base_weights, force=True, prune=prune,
                        quantize=v.quant, tune=TuneConfig(trials=trials) if trials else None,
                        verify_images=0)


def pretune(opts: Any, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Tune the convolution tasks of the module ``build_artifact(opts)`` compiles.

    Same stages as the build (so the same workload key): the build's own tune stage then
    finds ``opts.tune.trials`` records and only applies them. A database that already has
    that many records (e.g. the original's, shared by every same-graph variant) is reused
    as is.
    """
    from lprnet_edge.compiler.tune import tune
    from lprnet_edge.pipeline import build as pl

    art = pl.load_stage(opts.weights, opts.charset)
    if opts.prune:
        art = pl.prune_stage(art, opts.prune, opts.calib_dir)
    if opts.quantize:
        art = pl.quantize_stage(art, opts.quantize, opts.calib_dir)
    relax_model = pl.import_stage(art, opts.compile.frontend)
    _db, summary = tune(relax_model.mod, opts.target, opts.tune, log=log,
                        tasks=list(TUNE_TASKS))
    return summary


def build_tvm(v: Variant, work: Path, base_weights: str | Path | None, trials: int | None,
              log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Build (and with ``trials``, tune) ``v``'s host artifact; what was built and applied."""
    from lprnet_edge.pipeline.build import build_artifact

    opts = tvm_build_options(v, work, base_weights, trials)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"trials_budget": trials, "tuned_tasks": list(TUNE_TASKS)
                            if trials else []}
    if opts.tune is not None:
        s = pretune(opts, log=lambda m: log(f"    {m}"))
        info["workload"] = Path(s["db_dir"]).name
        info["tuning"] = {k: s.get(k) for k in ("tasks", "tasks_tuned", "trials_new",
                                                "records_before", "records_total", "skipped",
                                                "tune_s", "est_ms_before", "est_ms_after")}
        info["tuning"]["tasks_with_records"] = tasks_with_records(s["db_dir"])
    res = build_artifact(opts, log=lambda _m: None)
    art = Artifact.open(res.path, check_arch=False)
    m = art.manifest
    rt = m.reports.get("tune")
    info["records_applied"] = int(rt["records_total"]) if rt else 0
    info["manifest_stages_tune"] = m.stages.get("tune")
    info["compile"] = {k: m.reports.get("compile", {}).get(k)
                       for k in ("tuned", "compile_s", "tvm_target")}
    info["artifact"] = str(res.path)
    info["artifact_params_bytes"] = art.params_path.stat().st_size if art.params_path else 0
    info["build_s"] = round(time.perf_counter() - t0, 1)
    return info


def tasks_with_records(db_dir: str | Path) -> int:
    """Tasks (workloads) the database has tuning records for: with a budget below ~16
    candidates x tasks, MetaSchedule's first pass does not reach every task, and the others
    run TVM's default schedules. (Each record line starts with its workload's index.)"""
    from lprnet_edge.compiler.tune import DB_FILES

    p = Path(db_dir) / DB_FILES[1]
    if not p.is_file():
        return 0
    seen = set()
    with open(p, encoding="utf-8") as f:
        for line in f:
            head = line.lstrip()[1:].split(",", 1)[0]
            if head.strip().isdigit():
                seen.add(int(head))
    return len(seen)


def _short_error(e: BaseException, limit: int = 300) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    msg = f"{type(e).__name__}: {first}"
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def _latency_ratios(rows: list[dict[str, Any]]) -> None:
    base = rows[0].get("latency_ms") if rows else None
    for row in rows:
        lat = row.get("latency_ms")
        row["latency_ratio"] = base / lat if base and lat else None


_LATENCY_KEYS = ("latency_ms", "latency_backend", "latency_rounds_ms", "latency_error",
                 "latency_tvm", "artifact_params_bytes")


def tvm_latencies(variants: list[Variant], rows: list[dict[str, Any]], work: Path,
                  base_weights: str | Path | None, trials: int | None, rounds: int = 5,
                  runs: int = 20, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Build every variant's host artifact (tuned with ``trials`` per workload), then time
    them at batch 1 on one thread, model only, in ``rounds`` interleaved rounds of ``runs``.

    A variant that fails to build, tune or run gets ``latency_ms: None`` and
    ``latency_error`` in its row; the others are still measured.
    """
    from lprnet_edge.runtime.recognizer import Recognizer

    backend = "tvm-tuned" if trials else "tvm"
    built: dict[str, str] = {}
    t0 = time.time()
    for v, row in zip(variants, rows, strict=True):
        for k in _LATENCY_KEYS:
            row.pop(k, None)
        row.update(latency_ms=None, latency_backend=backend)
        log(f"  TVM build of {v.name}" + (f" (tuning budget {trials} trials)" if trials
                                          else " (untuned)"))
        try:
            info = build_tvm(v, work, base_weights, trials, log)
        except Exception as e:  # noqa: BLE001 - reported in the row, the others go on
            row["latency_error"] = "build failed: " + _short_error(e)
            log(f"  {v.name}: {row['latency_error']}")
            continue
        row["artifact_params_bytes"] = info.pop("artifact_params_bytes")
        built[v.name] = info.pop("artifact")
        row["latency_tvm"] = info
        log(f"  {v.name}: built in {info['build_s']:.0f}s, {info['records_applied']} tuning "
            "records applied")
    build_s = time.time() - t0
    recs: dict[str, Any] = {}
    by_name = {r["name"]: r for r in rows}
    for name, path in built.items():
        try:
            recs[name] = Recognizer.from_artifact(path, num_threads=LATENCY_THREADS)
        except Exception as e:  # noqa: BLE001
            by_name[name]["latency_error"] = "load failed: " + _short_error(e)
    per: dict[str, list[float]] = {n: [] for n in recs}
    load = [round(x, 2) for x in os.getloadavg()]
    for _ in range(rounds):
        for name, rec in list(recs.items()):
            try:
                stats = rec.benchmark(runs=runs, warmup=3, include_preprocess=False)
            except Exception as e:  # noqa: BLE001
                by_name[name]["latency_error"] = "run failed: " + _short_error(e)
                del recs[name]
                continue
            per[name].append(stats["p50_ms"])
    for name in recs:
        row = by_name[name]
        row["latency_ms"] = float(np.median(per[name]))
        row["latency_rounds_ms"] = per[name]
        log(f"  {name}: {row['latency_ms']:.2f} ms ({backend}, {LATENCY_THREADS} thread)")
    return {"build_s": round(build_s, 1), "loadavg_timing_start": load}


def latency_setup(backend: str, rounds: int, runs: int, trials: int | None = None,
                  command: str | None = None) -> dict[str, Any]:
    """How the latency column was measured (kept in the JSON, described in the Markdown)."""
    import platform

    setup: dict[str, Any] = {
        "backend": backend, "batch": 1, "threads": LATENCY_THREADS, "model_only": True,
        "rounds": rounds, "runs_per_round": runs,
        "statistic": "median over rounds of the per-round median",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": _cpu_name() or platform.machine(), "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if backend.startswith("tvm"):
        setup.update(trials=trials, tuned_tasks=list(TUNE_TASKS) if trials else [],
                     tuning_scheduler="gradient",
                     num_trials_per_iter=TuneConfig().num_trials_per_iter)
    if command:
        setup["command"] = command
    return setup


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _cache_dir() -> Path:
    from lprnet_edge.paths import cache_dir

    d = cache_dir() / "compression"
    d.mkdir(parents=True, exist_ok=True)
    return d


def channel_pruned_distilled(original: nn.Module, calib: CalibrationSet, ratios: dict[str, float],
                             epochs: int, budget_s: float, seed: int = 0,
                             cache: bool = True, log: Callable[[str], None] = _log,
                             require_cached: bool = False
                             ) -> tuple[nn.Module, dict[str, Any], Path]:
    """Channel-prune ``original`` with per-group ``ratios`` (+ dead channels) and distill on the
    training split of ``calib``; cached by configuration (and weights) in the cache dir."""
    from lprnet_edge.compress.distill import DistillConfig, distill
    from lprnet_edge.compress.prune import channel_widths, prune_channels
    from lprnet_edge.model.checkpoint import load_model, save_checkpoint

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
        if require_cached:
            log(f"  WARNING: {path.name} is not in the cache: distilling again, so this is "
                "not the model the report's accuracy was measured on (same widths)")
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
                   log: Callable[[str], None] = _log, require_cached: bool = False
                   ) -> list[Variant]:
    """Every report variant; ``require_cached``: the distilled model should come from the
    cache (a refresh measures the model the accuracy column was measured on), else warn."""
    from lprnet_edge.compress.prune import channel_widths, params_encodings, prune, prune_channels
    from lprnet_edge.compress.quantize import quantize
    from lprnet_edge.model.checkpoint import save_checkpoint
    from lprnet_edge.model.fold import fold_batchnorm

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
        qm = quantize(pm, qf).module
        add(f"{tag}+fp16", f"{s:.0%} sparse, fp16 values (sparse-fp16)", qm,
            "fp32 (weights decoded from fp16)", pcfg, qf)
        qw = QuantizeConfig(mode="int8-weights")
        qm = quantize(pm, qw).module
        add(f"{tag}+int8w", f"{s:.0%} sparse, weight-only int8 (zeros compress)", qm,
            "fp32 (weights decoded from int8)", pcfg, qw)

    log("variant: dense int8 weight-only / fp16")
    qw = QuantizeConfig(mode="int8-weights")
    qm = quantize(original, qw).module
    add("int8w", "weight-only int8 per-channel, dense", qm, "fp32 (weights decoded from int8)",
        None, qw)

    log("variant: simulated int8 (weights + activations)")
    qi = QuantizeConfig(mode="int8", calibrator="percentile", fallback_layers=("container.0",))
    qm = quantize(original, qi, train).module
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
    dm, dinfo, dpath = channel_pruned_distilled(original, calib, ratios, epochs, budget, log=log,
                                                require_cached=require_cached)
    add("channels-b23x0.5+kd", f"dead channels + b2/b3 mid widths halved {dinfo['widths']}, "
        "distilled on calib/", dm, "fp32", weights_path=dpath, info=dinfo)
    qw = QuantizeConfig(mode="int8-weights")
    qm = quantize(dm, qw).module
    add("channels-b23x0.5+kd+int8w", "channel-pruned + distilled, weight-only int8", qm,
        "fp32 (weights decoded from int8)", None, qw, weights_path=dpath, info=dinfo)
    if not quick:
        pcfg = PruneConfig(kind="unstructured", sparsity=0.7)
        sm, _ = prune(dm, pcfg)
        qm = quantize(sm, qw).module
        add("channels-b23x0.5+kd+sparse70+int8w",
            "channel-pruned + distilled, then 70% unstructured, weight-only int8", qm,
            "fp32 (weights decoded from int8)", pcfg, qw, stored=sm, weights_path=dpath,
            info=dinfo)
    return out


def measure(variants: list[Variant], test: EvalSet, latency: str = "torch",
            work: Path | None = None, log: Callable[[str], None] = _log,
            base_weights: str | Path | None = None, trials: int | None = None,
            rounds: int = 5, runs: int = 20, setup: dict[str, Any] | None = None
            ) -> list[dict[str, Any]]:
    """Accuracy on ``test``, stored size and FLOPs of every variant, then the latency of all
    of them in interleaved rounds (PyTorch, or TVM artifacts: :func:`tvm_latencies`, whose
    build time and load go into ``setup``)."""
    from lprnet_edge.compress.prune import stored_size

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
    if latency == "tvm":
        res = tvm_latencies(variants, rows, work or _cache_dir() / "artifacts", base_weights,
                            trials, rounds=rounds, runs=runs, log=log)
        if setup is not None:
            setup.update(res)
    else:
        interleaved_latency(variants, rows, rounds=rounds, runs=runs, log=log)
    _latency_ratios(rows)
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
        for k in _LATENCY_KEYS:
            row.pop(k, None)
        row["latency_ms"] = float(np.median(per[v.name]))
        row["latency_backend"] = "torch"
        row["latency_rounds_ms"] = per[v.name]
        log(f"  {v.name}: {row['latency_ms']:.2f} ms (torch, 1 thread)")


def _load_inputs(weights: str | Path | None, model: nn.Module | None,
                 calib: CalibrationSet | None, calib_dir: str | Path | None,
                 test_dir: str | Path | None = None
                 ) -> tuple[nn.Module, CalibrationSet, Path | None]:
    """The original model, ``calib/`` and the original's checkpoint (None for a model given
    as an object: the TVM path saves it)."""
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.weights import resolve_weights

    path: Path | None = None
    if model is None:
        path = Path(resolve_weights(weights))
        model = load_model(path)
    if calib is None:
        calib = CalibrationSet.load(calib_dir, keep_raw=True, test_dir=test_dir)
    return model, calib, path


def _base_weights(model: nn.Module, path: Path | None, work: Path) -> Path:
    if path is not None:
        return path
    from lprnet_edge.model.checkpoint import save_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    p = work / "original.pth"
    save_checkpoint(model, p)
    return p


def _save(out: Path, rep: dict[str, Any]) -> None:
    (out / "compression-report.json").write_text(
        json.dumps(_jsonable(rep), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_markdown(out / "compression-report.md", rep)
    plot(out / "compression-report.png", rep["variants"], rep.get("latency"))


def refresh_latency(out: str | Path = "docs", quick: bool | None = None,
                    selection: bool = False, latency: str = "torch",
                    trials: int | None = None, rounds: int = 5, runs: int = 20,
                    only: Sequence[str] | None = None, weights: str | Path | None = None,
                    calib_dir: str | Path | None = None, model: nn.Module | None = None,
                    calib: CalibrationSet | None = None, work: Path | None = None,
                    command: str | None = None, log: Callable[[str], None] = _log
                    ) -> dict[str, Any]:
    """Re-measure the latency column of an existing report (interleaved) and rewrite it.

    Rebuilds the variants (the distilled model comes from the cache; ``quick`` defaults to
    the report's own), keeps every other figure of ``compression-report.json``. ``only``:
    re-measure just these variants (the other rows keep their latency and say how it was
    measured). ``latency="tvm"``: tuned TVM artifacts (``trials`` per workload).
    """
    out = Path(out)
    rep = json.loads((out / "compression-report.json").read_text(encoding="utf-8"))
    original, calib, wpath = _load_inputs(weights, model, calib, calib_dir)
    quick = rep.get("quick", False) if quick is None else quick
    variants = build_variants(original, calib, quick=quick, log=log, require_cached=True)
    by_name = {r["name"]: r for r in rep["variants"]}
    keep = [v for v in variants if v.name in by_name]
    if only:
        unknown = sorted(set(only) - {v.name for v in keep})
        if unknown:
            from lprnet_edge.runtime.errors import LprnetEdgeError

            raise LprnetEdgeError(f"unknown variants {unknown}: use some of "
                                  f"{[v.name for v in keep]}")
    todo = [v for v in keep if not only or v.name in only]
    rows = [by_name[v.name] for v in todo]
    if latency == "tvm":
        work = work or _cache_dir() / "artifacts"
        setup = latency_setup("tvm-tuned" if trials else "tvm", rounds, runs, trials, command)
        res = tvm_latencies(todo, rows, work, _base_weights(original, wpath, work), trials,
                            rounds=rounds, runs=runs, log=log)
        setup.update(res)
    else:
        setup = latency_setup("torch", rounds, runs, command=command)
        interleaved_latency(todo, rows, rounds=rounds, runs=runs, log=log)
    setup["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    setup["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    setup["variants"] = [v.name for v in todo]
    rep["variants"] = [by_name[v.name] for v in keep]
    _latency_ratios(rep["variants"])
    rep["latency"] = setup
    if selection:
        from lprnet_edge.compress.select import Candidate, select

        log("selection on the calib/ validation split")
        cands = [Candidate(v.name, v.prune, v.quant, pruned_model=v.stored) for v in keep]
        rep["selection"] = _jsonable(select(original, cands, calib, budget=0.005,
                                            guard="lost"))
    rep["refreshed"] = setup["measured"]
    _save(out, rep)
    return rep


CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


def compare_calibrators(original: nn.Module, calib: CalibrationSet, test: EvalSet,
                        calibrators: Sequence[str] = CALIBRATORS,
                        head_fp32: Sequence[bool] = (True, False),
                        log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Int8 (weights + activations) PyTorch simulation per calibrator, calibrated like the
    report's ``int8-sim`` (first ``calib_images`` of the calib/ train split) and measured on
    ``test`` like every report row: accuracy, and agreement with the original's readings."""
    from lprnet_edge.compress.quantize import quantize
    from lprnet_edge.model.calib import decode_batch, predict_logits

    train, _val = calib.split(0.3, 0)
    ref = decode_batch(predict_logits(original, test.x))
    n = len(test.labels)
    orig_acc = float(np.mean([p == t for p, t in zip(ref, test.labels, strict=True)]))
    rows = []
    for h in head_fp32:
        for c in calibrators:
            t0 = time.time()
            cfg = QuantizeConfig(mode="int8", calibrator=c,
                                 fallback_layers=("container.0",) if h else ())
            q = quantize(original, cfg, train, head_fp32=h)
            qm, qrep = q.module, q.report
            pred = decode_batch(predict_logits(qm, test.x))
            acc = float(np.mean([p == t for p, t in zip(pred, test.labels, strict=True)]))
            agree = float(np.mean([p == q for p, q in zip(pred, ref, strict=True)]))
            ratios = [v["threshold"] / v["amax"] for k, v in qrep["thresholds"].items()
                      if v["amax"] > 0 and k not in cfg.fallback_layers]
            rows.append({"calibrator": c, "head_fp32": h, "test_accuracy": acc,
                         "accuracy_change_points": 100 * (acc - orig_acc),
                         "agreement_with_original": agree,
                         "threshold_over_max_median": float(np.median(ratios)),
                         "seconds": round(time.time() - t0, 1)})
            log(f"  {c:<10} head {'fp32' if h else 'int8'}: acc {acc:.3f} "
                f"({100 * (acc - orig_acc):+.1f} pt), agreement {agree:.3f}, "
                f"median threshold/max {rows[-1]['threshold_over_max_median']:.2f}")
    return {"original_test_accuracy": orig_acc, "test_images": n,
            "calibration": f"first {QuantizeConfig().calib_images} images of the calib/ "
                           f"train split ({len(train)} images, split seed 0)",
            "percentile": QuantizeConfig().percentile,
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


def refresh_calibrators(out: str | Path = "docs", weights: str | Path | None = None,
                        calib_dir: str | Path | None = None, test_dir: str | Path | None = None,
                        model: nn.Module | None = None, calib: CalibrationSet | None = None,
                        test: EvalSet | None = None, head_fp32: Sequence[bool] = (True, False),
                        command: str | None = None, log: Callable[[str], None] = _log
                        ) -> dict[str, Any]:
    """Add (or replace) the calibrator comparison of an existing report and rewrite it."""
    out = Path(out)
    rep = json.loads((out / "compression-report.json").read_text(encoding="utf-8"))
    original, calib, _ = _load_inputs(weights, model, calib, calib_dir, test_dir)
    test = test if test is not None else load_eval_set(test_dir)
    log(f"int8 calibrators on {len(test.labels)} test plates")
    res = compare_calibrators(original, calib, test, head_fp32=head_fp32, log=log)
    if command:
        res["command"] = command
    rep["calibrators"] = res
    _save(out, rep)
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


def _latency_text(setup: dict[str, Any] | None) -> str:
    if not setup:  # a report from before the latency setup was recorded
        return ("- Latency: host, batch 1; backend per row (`torch` = PyTorch eager, 1 thread, "
                "median of 5 interleaved rounds; `tvm` = compiled artifact).")
    load = setup.get("loadavg_timing_start") or setup.get("loadavg_end")
    how = (f"batch {setup['batch']}, {setup['threads']} thread, model only (no preprocessing "
           f"or decoding), median over {setup['rounds']} interleaved rounds of the per-round "
           f"median of {setup['runs_per_round']} runs, finished {setup['measured']} on "
           f"{setup.get('host')} ({setup.get('cpus')} cores"
           + (f", 1-min load average {load[0]:.1f} when "
              + ("the timing started" if setup.get("loadavg_timing_start") else "it ended")
              if load else "") + ")")
    if setup["backend"] == "torch":
        text = f"- Latency (`torch`): PyTorch eager, {how}."
    elif setup["backend"] == "tvm":
        text = (f"- Latency (`tvm`): untuned TVM host artifacts (`lprnet_edge.pipeline.build`), "
                f"{how}. Untuned TVM is far slower than tuned or PyTorch.")
    else:
        text = (f"- Latency (`tvm-tuned`): TVM host artifacts built by `lprnet_edge.pipeline` "
                f"(`{setup.get('command') or 'lprnet-edge report --latency tvm'}`), {how}. "
                f"Tuning budget: **{setup['trials']} MetaSchedule trials per workload**, "
                f"spent on the convolution tasks (`{'`, `'.join(setup['tuned_tasks'])}`; the "
                "other fused kernels keep TVM's default schedules), gradient task scheduler, "
                f"{setup['num_trials_per_iter']} candidates per batch. Databases are cached "
                "by target + workload: variants that run the same graph share one, and a "
                "database that already holds more records than the budget (the original's, "
                "from earlier tuning) is applied whole, so *records applied* below can exceed "
                "the budget.")
    text += (" Sparse / fp16 / int8-weight variants decode their weights at load and run the "
             "same dense float32 graph as their base model: their latency differences are "
             "noise. The host is shared: compare ratios between rows, not absolute figures.")
    return text


def _latency_cell(r: dict[str, Any]) -> str:
    if r.get("latency_ms") is None:
        return f"n/a ({r.get('latency_error') or 'not measured'})"
    return f"{r['latency_ms']:.2f} ({r.get('latency_backend')})"


def _ratio_cell(r: dict[str, Any]) -> str:
    return f"{r['latency_ratio']:.2f}" if r.get("latency_ratio") else "-"


def write_markdown(path: Path, rep: dict[str, Any]) -> None:
    rows = rep["variants"]
    setup = rep.get("latency")
    lines = [
        "# Compression report",
        "",
        f"Generated {rep['generated']} by `lprnet-edge report"
        f"{' --quick' if rep['quick'] else ''}` in {rep['seconds']:.0f} s"
        + (f"; latency column re-measured {rep['refreshed']}"
           + (f" by `{setup['command']}`" if setup and setup.get("command") else "")
           if rep.get("refreshed") else "") + ".",
        "",
        f"- Accuracy: exact plate match on `test/` ({rows[0]['test_images']} plates), batch-1 "
        "semantics, PyTorch. `test/` was only measured; calibration, distillation and "
        "selection used `calib/` (and a fixed-seed validation split of it).",
        f"- Stored size: `params.npz` bytes with the variant's encodings (BatchNorm folded); "
        f"the fp32 reference is {rows[0]['fp32_reference_bytes'] / 1e6:.2f} MB (4 bytes x "
        f"{rows[0]['fp32_reference_bytes'] // 4} parameters of the original).",
        _latency_text(setup),
        "- `int8-sim`: its accuracy is the PyTorch simulation of int8 x int8 -> int32 "
        "convolutions; its TVM artifact runs those convolutions in int8 "
        "(`quantize.relax_int8_rewrite`), calibrated by the build pipeline on `calib/`.",
        "",
        "| variant | test acc | change (pt) | stored | x vs fp32 | MFLOPs | x fewer FLOPs | "
        "latency ms | x faster | executes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['test_accuracy']:.3f} | {r['accuracy_change_points']:+.1f} | "
            f"{r['stored_bytes'] / 1e3:.0f} kB | {r['compression_vs_fp32']:.1f} | "
            f"{r['flops'] / 1e6:.0f} | {r['flops_ratio']:.2f} | {_latency_cell(r)} | "
            f"{_ratio_cell(r)} | {r['executes']} |")
    tvm_rows = [r for r in rows if r.get("latency_backend", "").startswith("tvm")]
    if tvm_rows:
        lines += ["", "TVM builds behind the latency column (`workload` = tuning database "
                  "`<target>-<workload>` in `~/.cache/lprnet-edge/tuning`):", "",
                  "| variant | workload | budget | new trials | records applied | "
                  "conv tasks with records | build + tune s | params.npz |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in tvm_rows:
            t = r.get("latency_tvm")
            if not t:
                lines.append(f"| {r['name']} | - | - | - | - | - | - | "
                             f"{r.get('latency_error', 'not built')} |")
                continue
            tu = t.get("tuning") or {}
            lines.append(
                f"| {r['name']} | {t.get('workload', '-')} | {t.get('trials_budget') or '-'} | "
                f"{tu.get('trials_new', 0)} | {t['records_applied']} | "
                f"{tu.get('tasks_with_records', '-')}/{tu.get('tasks', '-')} | "
                f"{t['build_s']:.0f} | {r['artifact_params_bytes'] / 1e3:.0f} kB |")
        lines += _tuning_caveats(tvm_rows)
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
    if rep.get("calibrators"):
        lines += _calibrator_lines(rep["calibrators"])
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


def _tuning_caveats(rows: list[dict[str, Any]]) -> list[str]:
    """Say so when rows were tuned to different depths: their latency then mixes the model
    with the tuning (a database reused from earlier, longer tuning; tasks left untuned)."""
    tuned = [r["latency_tvm"] for r in rows if r.get("latency_tvm")]
    records = sorted({t["records_applied"] for t in tuned})
    partial = sorted({r["name"] for r in rows if r.get("latency_tvm")
                      and (r["latency_tvm"].get("tuning") or {}).get("tasks_with_records", 0)
                      < (r["latency_tvm"].get("tuning") or {}).get("tasks", 0)})
    out: list[str] = []
    if len(records) > 1:
        out.append(f"Records applied differ between workloads ({records[0]} to {records[-1]}): "
                   "latency ratios between workloads compare tuning depth as well as models.")
    if partial:
        out.append(f"Not every convolution task has records in {', '.join(partial)}: the "
                   "budget ran out in MetaSchedule's first pass (16 candidates per task), and "
                   "those tasks run TVM's default schedule.")
    return ["", " ".join(out)] if out else []


def _calibrator_lines(c: dict[str, Any]) -> list[str]:
    lines = ["", "## int8 calibrators (weights + activations, PyTorch simulation, test/)", "",
             f"Calibrated on the {c['calibration']}; measured on the {c['test_images']} "
             f"`test/` plates at batch-1 semantics like the table above (original "
             f"{c['original_test_accuracy']:.3f}); percentile = {c['percentile']}. "
             + (f"Command: `{c['command']}`, {c['measured']}." if c.get("command")
                else f"Measured {c['measured']}."), "",
             "| calibrator | head (container conv) | test acc | change (pt) | agreement with "
             "original | median threshold / max |",
             "|---|---|---|---|---|---|"]
    for r in c["rows"]:
        lines.append(f"| {r['calibrator']} | {'fp32' if r['head_fp32'] else 'int8'} | "
                     f"{r['test_accuracy']:.3f} | {r['accuracy_change_points']:+.1f} | "
                     f"{r['agreement_with_original']:.3f} | "
                     f"{r['threshold_over_max_median']:.2f} |")
    return lines


def pareto_front(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the variants (fastest first) that no other variant beats: none is faster
    and at least as accurate, or as fast and more accurate. Ties are all kept."""
    pts = [r for r in rows if r.get("latency_ms") is not None]

    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
        la, lb, aa, ab = a["latency_ms"], b["latency_ms"], a["test_accuracy"], b["test_accuracy"]
        return (la < lb and aa >= ab) or (la == lb and aa > ab)

    front = [b for b in pts if not any(beats(a, b) for a in pts if a is not b)]
    return [r["name"] for r in sorted(front, key=lambda r: (r["latency_ms"], r["name"]))]


def _overlap(a: Any, b: Any, pad: float = 1.0) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0) + pad
    h = min(a.y1, b.y1) - max(a.y0, b.y0) + pad
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(ax: Any, points: list[tuple[float, float]], texts: list[str],
                 radii_pt: list[float], obstacles: Sequence[Any] = (),
                 fontsize: float = 7) -> list[Any]:
    """Greedy label placement: each label takes the first offset (growing rings of 16
    directions around its point) whose text box stays inside the axes and overlaps neither
    a placed label, nor a marker, nor an ``obstacle`` (a legend); far labels get a leader
    line. Crowded points are placed first. Returns the text boxes (display coordinates)."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    disp = ax.transData.transform(np.asarray(points, dtype=float))
    marks = [Bbox.from_extents(x - r * px, y - r * px, x + r * px, y + r * px)
             for (x, y), r in zip(disp, radii_pt, strict=True)]
    frame = ax.get_window_extent(renderer)
    blocked = list(obstacles)
    crowd = [sum(np.hypot(*(disp[i] - disp[j])) < 60 * px for j in range(len(disp)))
             for i in range(len(disp))]
    order = sorted(range(len(points)), key=lambda i: (-crowd[i], disp[i][0]))
    boxes: list[Any] = [None] * len(points)
    for i in order:
        r0 = radii_pt[i] + 2
        cands = [(ring, (r0 + ring * 11) * np.array([np.cos(t), np.sin(t)]))
                 for ring in range(10) for t in np.linspace(0, 2 * np.pi, 16, endpoint=False)]
        best: tuple[float, Any, Any] | None = None
        for ring, off in cands:
            ha = "left" if off[0] > 1 else "right" if off[0] < -1 else "center"
            va = "bottom" if off[1] > 1 else "top" if off[1] < -1 else "center"
            far = ring > 0  # away from its marker's edge: draw a leader line
            ann = ax.annotate(texts[i], points[i], xytext=tuple(off), textcoords="offset points",
                              ha=ha, va=va, fontsize=fontsize, zorder=4,
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                    "alpha": 0.8},
                              arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.35",
                                          "shrinkA": 0, "shrinkB": radii_pt[i]}
                              if far else None)
            ann.update_positions(renderer)  # the offset is applied at draw time otherwise
            bb = Text.get_window_extent(ann, renderer)  # the text only, not the leader line
            cost = 0.0
            if not (frame.x0 <= bb.x0 and bb.x1 <= frame.x1 and frame.y0 <= bb.y0
                    and bb.y1 <= frame.y1):
                cost += 1e9
            cost += sum(_overlap(bb, o) for o in boxes if o is not None) * 100
            cost += sum(_overlap(bb, o) for o in blocked) * 100
            cost += sum(_overlap(bb, m) for m in marks) * 10
            if cost == 0:
                if best is not None:
                    best[1].remove()
                best = (0.0, ann, bb)
                break
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, bb)
            else:
                ann.remove()
        assert best is not None
        boxes[i] = best[2]
    return boxes


def plot(path: Path, rows: list[dict[str, Any]], setup: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """Accuracy vs latency (marker area ~ stored size), the Pareto front, and labels placed
    so they do not overlap. Variants without a latency are listed under the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("latency_ms") is not None]
    missing = [r["name"] for r in rows if r.get("latency_ms") is None]
    fig, ax = plt.subplots(figsize=(10, 6.5))
    smax = max(r["stored_bytes"] for r in rows)

    def area(b: float) -> float:
        return 30 + 570 * b / smax

    front = pareto_front(pts)
    boxes: list[Any] = []
    if pts:
        lat = np.array([r["latency_ms"] for r in pts])
        acc = np.array([r["test_accuracy"] for r in pts])
        areas = np.array([area(r["stored_bytes"]) for r in pts])
        on = np.array([r["name"] in front for r in pts])
        ax.scatter(lat[~on], acc[~on], s=areas[~on], alpha=0.45, c="C0", edgecolors="k",
                   linewidths=0.6, zorder=2)
        ax.scatter(lat[on], acc[on], s=areas[on], alpha=0.6, c="C1", edgecolors="k",
                   linewidths=0.9, zorder=3)
        fr = sorted((r["latency_ms"], r["test_accuracy"]) for r in pts if r["name"] in front)
        fx, fy = [p[0] for p in fr], [p[1] for p in fr]
        ax.step(fx + [lat.max() * 1.08], fy + [fy[-1]], where="post", ls="--", lw=1.2,
                color="C3", zorder=1)
        xr = max(lat.max() - lat.min(), 0.1 * lat.max())
        yr = max(acc.max() - acc.min(), 0.01)
        ax.set_xlim(lat.min() - 0.35 * xr, lat.max() + 0.35 * xr)
        ax.set_ylim(acc.min() - 0.45 * yr, acc.max() + 0.45 * yr)
    from matplotlib.lines import Line2D

    kb = [k for k in (50, 200, 600) if k * 1e3 <= smax * 1.05] or [round(smax / 1e3)]
    handles = [ax.scatter([], [], s=area(k * 1e3), c="C0", alpha=0.45, edgecolors="k",
                          label=f"{k} kB stored") for k in kb]
    handles += [ax.scatter([], [], s=60, c="C1", alpha=0.6, edgecolors="k",
                           label="on the Pareto front"),
                Line2D([], [], ls="--", color="C3", label="Pareto front (faster and at least "
                                                          "as accurate)")]
    leg = ax.legend(handles=handles, loc="lower right", fontsize=7, labelspacing=1.2,
                    borderpad=0.8, framealpha=0.9)
    backend = (setup or {}).get("backend") or (pts[0].get("latency_backend") if pts else "")
    extra = f", {setup['trials']} trials/workload" if setup and setup.get("trials") else ""
    ax.set_xlabel(f"latency, ms (host, batch 1, 1 thread, model only; {backend}{extra})")
    ax.set_ylabel("test accuracy (exact plate, batch 1)")
    ax.set_title("LPRNet compression variants (marker area ~ stored size)")
    ax.grid(alpha=0.3)
    if missing:
        fig.text(0.01, 0.01, "not plotted (no latency): " + ", ".join(missing), fontsize=7)
    fig.tight_layout(rect=(0, 0.03 if missing else 0, 1, 1))
    if pts:
        fig.canvas.draw()
        obstacles = [leg.get_window_extent(fig.canvas.get_renderer())]
        boxes = place_labels(ax, [(r["latency_ms"], r["test_accuracy"]) for r in pts],
                             [f"{r['name']} ({r['stored_bytes'] / 1e3:.0f} kB)" for r in pts],
                             [float(np.sqrt(area(r["stored_bytes"])) / 2) for r in pts],
                             obstacles)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"front": front, "missing": missing, "texts": len(ax.texts),
            "labels": {r["name"]: tuple(float(e) for e in b.extents)
                       for r, b in zip(pts, boxes, strict=True)}}


def run_report(out: str | Path = "docs", quick: bool = False, weights: str | None = None,
               calib_dir: str | Path | None = None, test_dir: str | Path | None = None,
               latency: str = "torch", selection: bool | None = None,
               model: nn.Module | None = None, calib: CalibrationSet | None = None,
               test: EvalSet | None = None, trials: int | None = None, rounds: int = 5,
               runs: int = 20, work: Path | None = None, command: str | None = None,
               log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Build every variant, measure it, write the three report files into ``out``."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    original, calib, wpath = _load_inputs(weights, model, calib, calib_dir, test_dir)
    test = test if test is not None else load_eval_set(test_dir)
    variants = build_variants(original, calib, quick=quick, log=log)
    log(f"measuring {len(variants)} variants on {len(test.labels)} test plates")
    work = work or _cache_dir() / "artifacts"
    backend = "torch" if latency != "tvm" else "tvm-tuned" if trials else "tvm"
    setup = latency_setup(backend, rounds, runs, trials, command)
    rows = measure(variants, test, latency, work, log,
                   base_weights=_base_weights(original, wpath, work) if latency == "tvm"
                   else None, trials=trials, rounds=rounds, runs=runs, setup=setup)
    setup["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    setup["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rep: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": quick, "variants": rows, "goals": goals(rows), "latency": setup,
    }
    if selection if selection is not None else not quick:
        from lprnet_edge.compress.select import Candidate, select

        log("selection on the calib/ validation split")
        cands = [Candidate(v.name, v.prune, v.quant, pruned_model=v.stored)
                 for v in variants]
        rep["selection"] = _jsonable(select(original, cands, calib, budget=0.005,
                                            guard="lost"))
    rep["seconds"] = time.time() - t0
    _save(out, rep)
    return rep
