"""Compression report: every variant's test accuracy, stored size, FLOPs and latency.

``lprnet-edge report [--out DIR] [--quick]`` writes ``compression-report.md``, ``.json`` and
``.png`` (accuracy vs latency, marker area ~ stored size).

- Accuracy: exact plate match on ``test/`` at batch-1 semantics (PyTorch; the per-image
  normalisation of :func:`lprnet_edge.model.calib.forward_per_sample`, identical to running images
  one at a time). ``test/`` is only *measured* here: every calibration, distillation and
  selection step reads ``calib/`` through :class:`CalibrationSet`.
- Stored size: bytes of the ``params.npz`` the artifact would ship (BatchNorm folded, as the
  build pipeline does), with the variant's encodings (:func:`prune.params_encodings`).
- FLOPs: :mod:`lprnet_edge.model.flops` of the variant's architecture (dense; ``sparse_macs``
  counts non-zero weights only), and ``flops_executed``: what the compiled artifact computes
  after the compiler's exact constant-channel fold (:func:`executed_flops`).
- Latency (:mod:`lprnet_edge.report.latency`): host, batch 1, one thread, model only, median
  of per-round medians over interleaved rounds. Backends: PyTorch eager (``torch``), or TVM
  host artifacts built by :func:`lprnet_edge.pipeline.build.build_artifact` from the
  variant's compression configs (``--latency tvm``), tuned by the build's own tune stage with
  the same MetaSchedule budget per workload (``--trials N``, ``tvm-tuned``) and timed with
  :func:`lprnet_edge.compiler.session.time_artifact` (the code of ``bench``), with a
  per-kernel profile of each variant in the JSON.
  ``--trials 0``: no tuning for any variant (packaged default schedules, transferred to new
  shapes): the same budget for all.
- Goals (``--goals FILE``, :mod:`lprnet_edge.report.goals`): targets given as data, each
  met / missed by how much, from the rows; kept in the JSON so a refresh re-checks them.
- ``--refresh-latency`` re-measures only the latency column (and the profiles, and the
  goals) of an existing report; ``--calibrators`` adds the int8 calibrator comparison
  (:mod:`lprnet_edge.report.calibrators`).
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

import torch
from torch import nn

from lprnet_edge.compress.accuracy import Budget
from lprnet_edge.compress.api import compress
from lprnet_edge.compress.configs import ChannelPruneConfig, PruneConfig, QuantizeConfig
from lprnet_edge.compress.distill import DistillConfig, distill
from lprnet_edge.compress.prune import (
    channel_widths,
    params_encodings,
    prune_channels,
    stored_size,
)
from lprnet_edge.compress.quantize import fold_for_storage
from lprnet_edge.compress.select import Candidate, select
from lprnet_edge.model.bn_fold import fold_batchnorm
from lprnet_edge.model.calib import CalibrationSet, EvalSet, accuracy, load_eval_set
from lprnet_edge.model.channel_fold import fold_all
from lprnet_edge.model.checkpoint import load_model, save_checkpoint
from lprnet_edge.model.flops import summary as flops_summary
from lprnet_edge.model.weights import resolve_weights
from lprnet_edge.paths import cache_dir
from lprnet_edge.report.goals import Goal, evaluate_goals, goals_from_dicts
from lprnet_edge.report.latency import (
    _log,
    interleaved_latency,
    latency_ratios,
    latency_setup,
    tvm_latencies,
)
from lprnet_edge.report.render import plot, write_markdown

# A folder of the user's: the repository's docs/ are regenerated on purpose (``--out docs``).
DEFAULT_OUT = "lprnet-edge-report"


@dataclass
class Variant:
    """A report variant: its compression configs (``prune``, ``quant``: what the build
    pipeline applies to ``weights_path``, else the original's checkpoint) and the PyTorch
    models the accuracy and size columns measure. Channel pruning is distilled once and
    cached as a checkpoint (``weights_path``), which the build loads as is."""

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
    # The BN-folded float LPRNet whose architecture the variant runs (weight-quantized
    # models are stored channel-folded, so their own FLOPs would already be the executed ones).
    arch: nn.Module | None = None


def _cache_dir() -> Path:
    d = cache_dir() / "compression"
    d.mkdir(parents=True, exist_ok=True)
    return d


def channel_pruned_distilled(original: nn.Module, calib: CalibrationSet, ratios: dict[str, float],
                             epochs: int, budget_s: float, seed: int = 0,
                             cache: bool = True, log: Callable[[str], None] = _log,
                             require_cached: bool = False, round_to: int = 1
                             ) -> tuple[nn.Module, dict[str, Any], Path]:
    """Channel-prune ``original`` with per-group ``ratios`` (+ dead channels, widths rounded
    up to ``round_to`` like :class:`ChannelPruneConfig`) and distill on the training split of
    ``calib``; cached by configuration (and weights) in the cache dir."""
    train, val = calib.split(0.3, seed)
    widths = channel_widths(original, ratios, round_to=round_to)
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


# The aggressive channel variant (full report only): >= 4x fewer executed FLOPs.
AGGRESSIVE_NAME = "channels-b1x0.5-b23x0.25+kd"
AGGRESSIVE_RATIOS = {"b1_mid": 0.5, "b2_mid": 0.75, "b3_mid": 0.75}


def channel_default(quick: bool = False
                    ) -> tuple[ChannelPruneConfig, int, float, dict[str, float]]:
    """The build's ``--prune channels`` defaults (:class:`ChannelPruneConfig`), which the
    report's ``channels-b23x0.5+kd`` reproduces: the config, distillation epochs and time cap
    (shortened for ``quick``), and the per-group ratios."""
    ccfg = ChannelPruneConfig()
    epochs, budget = (2, 60.0) if quick else (ccfg.distill_epochs, ccfg.distill_time_s)
    return ccfg, epochs, budget, dict.fromkeys(ccfg.groups, ccfg.ratio)


INT8_EXECUTES = ("int8 x int8 -> int32 convs (simulated in PyTorch; the artifact runs them "
                 "in int8: compiler.frontend.relax_int8_rewrite)")
INT8_CONFIG = QuantizeConfig(mode="int8", calibrator="percentile",
                             fallback_layers=("container.0",))
INT8W_EXECUTES = "fp32 (weights decoded from int8)"


def _variant(name: str, desc: str, model: nn.Module, executes: str,
             pcfg: PruneConfig | None = None, qcfg: QuantizeConfig | None = None,
             stored: nn.Module | None = None, weights_path: Path | None = None,
             info: dict | None = None, arch: nn.Module | None = None) -> Variant:
    """A variant whose stored weights (``stored``, else ``model``) and architecture are
    BatchNorm-folded as the build pipeline folds them."""
    st = fold_batchnorm(stored if stored is not None else model)
    enc = params_encodings(st, pcfg, quant=qcfg)
    return Variant(name, desc, model, st, enc, executes, pcfg, qcfg, weights_path,
                   info or {}, fold_batchnorm(arch) if arch is not None else st)


def _sparse_variants(original: nn.Module, quick: bool, log: Callable[[str], None]
                     ) -> list[Variant]:
    out = []
    sparsities = (0.8,) if quick else (0.8, 0.9)
    for s in sparsities:
        log(f"variant: unstructured {s:.0%}")
        pcfg = PruneConfig(kind="unstructured", sparsity=s)
        pres = compress(original, pcfg)
        pm, rep = pres.module, pres.report
        tag = f"sparse{int(s * 100)}"
        if s == sparsities[0]:
            out.append(_variant(tag, f"global L1 magnitude pruning {s:.0%}, sparse fp32 "
                                "storage", pm, "fp32 (dense kernels)", pcfg,
                                info={"global_sparsity": rep["global_sparsity"]}))
        qf = QuantizeConfig(mode="fp16")
        out.append(_variant(f"{tag}+fp16", f"{s:.0%} sparse, fp16 values (sparse-fp16)",
                            compress(pm, qf).module, "fp32 (weights decoded from fp16)",
                            pcfg, qf, arch=pm))
        qw = QuantizeConfig(mode="int8-weights")
        out.append(_variant(f"{tag}+int8w", f"{s:.0%} sparse, weight-only int8 (zeros "
                            "compress)", compress(pm, qw).module, INT8W_EXECUTES, pcfg, qw,
                            arch=pm))
    return out


def _int8_variants(original: nn.Module, train: CalibrationSet, log: Callable[[str], None]
                   ) -> list[Variant]:
    log("variant: dense int8 weight-only / fp16")
    qw = QuantizeConfig(mode="int8-weights")
    out = [_variant("int8w", "weight-only int8 per-channel, dense",
                    compress(original, qw).module, INT8W_EXECUTES, None, qw, arch=original)]
    log("variant: simulated int8 (weights + activations)")
    qm = compress(original, INT8_CONFIG, train).module
    out.append(_variant("int8-sim", "int8 weights + activations (percentile 99.99, "
                        "per-channel), head fp32 (simulated)", qm, INT8_EXECUTES, None,
                        INT8_CONFIG, stored=fold_for_storage(original), arch=original))
    return out


def _dead_channels_variant(original: nn.Module, train: CalibrationSet,
                           log: Callable[[str], None]) -> Variant:
    log("variant: channel pruning (dead channels only, no training)")
    widths = channel_widths(original, 0.0)
    cm, cinfo = prune_channels(original, widths, train.x)
    p = _cache_dir() / "channels-dead.pth"
    save_checkpoint(cm, p)
    return _variant("channels-dead", f"remove dead channels {widths}", cm, "fp32",
                    weights_path=p, info={"widths": widths, "head_factor": cinfo["head_factor"]})


def _channel_variants(original: nn.Module, calib: CalibrationSet, train: CalibrationSet,
                      quick: bool, require_cached: bool, log: Callable[[str], None]
                      ) -> list[Variant]:
    """The build's ``--prune channels`` default (distilled), with int8 on top, and in the
    full report a more aggressive pruning."""
    ccfg, epochs, budget, ratios = channel_default(quick)
    log(f"variant: channel pruning {ratios} + distillation (the build's --prune channels)")
    dm, dinfo, dpath = channel_pruned_distilled(original, calib, ratios, epochs, budget, log=log,
                                                require_cached=require_cached,
                                                round_to=ccfg.round_to, seed=ccfg.seed)
    qw = QuantizeConfig(mode="int8-weights")
    out = [_variant("channels-b23x0.5+kd", "what `lprnet-edge build --prune channels` builds "
                    "with its defaults (ChannelPruneConfig: dead channels + b2/b3 mid widths "
                    f"halved, widths rounded up to multiples of {ccfg.round_to}: "
                    f"{dinfo['widths']}), distilled on calib/ ({epochs} epochs / "
                    f"{budget:.0f} s cap)", dm, "fp32", weights_path=dpath, info=dinfo),
           _variant("channels-b23x0.5+kd+int8w", "channel-pruned + distilled, weight-only "
                    "int8", compress(dm, qw).module, INT8W_EXECUTES, None, qw,
                    weights_path=dpath, info=dinfo, arch=dm)]
    log("variant: channel pruning + distillation, then int8 weights + activations")
    out.append(_variant("channels-b23x0.5+kd+int8", "channel-pruned + distilled, then int8 "
                        "weights + activations like int8-sim (`build --prune channels "
                        "--quantize int8`)", compress(dm, INT8_CONFIG, train).module,
                        INT8_EXECUTES, None, INT8_CONFIG, stored=fold_for_storage(dm),
                        weights_path=dpath, info=dinfo, arch=dm))
    if quick:
        return out
    log(f"variant: channel pruning {AGGRESSIVE_RATIOS} + distillation")
    am, ainfo, apath = channel_pruned_distilled(
        original, calib, AGGRESSIVE_RATIOS, epochs, budget, log=log,
        require_cached=require_cached, round_to=ccfg.round_to, seed=ccfg.seed)
    out.append(_variant(AGGRESSIVE_NAME, "dead channels + b1 mid width halved, b2/b3 mid "
                        f"widths quartered, rounded up to multiples of {ccfg.round_to} "
                        f"({ainfo['widths']}), distilled on calib/ like the build default "
                        f"({epochs} epochs / {budget:.0f} s cap); aimed at >= 4x fewer "
                        "executed FLOPs", am, "fp32", weights_path=apath, info=ainfo))
    pcfg = PruneConfig(kind="unstructured", sparsity=0.7)
    sm = compress(dm, pcfg).module
    out.append(_variant("channels-b23x0.5+kd+sparse70+int8w", "channel-pruned + distilled, "
                        "then 70% unstructured, weight-only int8", compress(sm, qw).module,
                        INT8W_EXECUTES, pcfg, qw, stored=sm, weights_path=dpath, info=dinfo,
                        arch=sm))
    return out


def build_variants(original: nn.Module, calib: CalibrationSet, quick: bool = False,
                   log: Callable[[str], None] = _log, require_cached: bool = False
                   ) -> list[Variant]:
    """Every report variant; ``require_cached``: the distilled model should come from the
    cache (a refresh measures the model the accuracy column was measured on), else warn."""
    train, _val = calib.split(0.3, 0)
    log("variant: original")
    return [_variant("original", "pretrained LPRNet, fp32", original, "fp32"),
            *_sparse_variants(original, quick, log), *_int8_variants(original, train, log),
            _dead_channels_variant(original, train, log),
            *_channel_variants(original, calib, train, quick, require_cached, log)]


def measure(variants: list[Variant], test: EvalSet, latency: str = "torch",
            work: Path | None = None, log: Callable[[str], None] = _log,
            base_weights: str | Path | None = None, trials: int | None = None,
            rounds: int = 5, runs: int = 20, setup: dict[str, Any] | None = None
            ) -> list[dict[str, Any]]:
    """Accuracy on ``test``, stored size and FLOPs of every variant, then the latency of all
    of them in interleaved rounds (PyTorch, or TVM artifacts: :func:`tvm_latencies`, whose
    build time and load go into ``setup``)."""
    rows = []
    base: dict[str, Any] | None = None
    fp32_ref = 4 * sum(p.numel() for p in variants[0].model.parameters())
    for v in variants:
        t0 = time.time()
        acc = accuracy(v.model, test)
        fl = flops_summary(v.arch if v.arch is not None else v.stored)
        ex = executed_flops(v.stored)
        size = stored_size(v.stored, v.encodings)
        row: dict[str, Any] = {
            "name": v.name, "description": v.description, "executes": v.executes,
            "test_accuracy": acc, "test_images": len(test.labels),
            "stored_bytes": size, "fp32_reference_bytes": fp32_ref,
            "compression_vs_fp32": fp32_ref / size,
            "flops": fl["flops"], "macs": fl["macs"], "sparse_macs": fl["sparse_macs"],
            "flops_executed": ex["flops"], "channel_fold": ex["fold"],
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
        row["flops_executed_ratio"] = base["flops_executed"] / ex["flops"]
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        log(f"  {v.name}: acc {acc:.3f} ({row['accuracy_change_points']:+.1f} pt), "
            f"{size / 1e3:.1f} kB ({row['compression_vs_fp32']:.1f}x vs fp32), "
            f"{fl['flops'] / 1e6:.0f} MFLOPs ({ex['flops'] / 1e6:.0f} executed)")
    if latency == "tvm":
        res = tvm_latencies(variants, rows, work or _cache_dir() / "artifacts", base_weights,
                            trials, rounds=rounds, runs=runs, log=log)
        if setup is not None:
            setup.update(res)
    else:
        interleaved_latency(variants, rows, rounds=rounds, runs=runs, log=log)
    latency_ratios(rows)
    return rows


def executed_flops(stored: nn.Module) -> dict[str, Any]:
    """FLOPs of what the compiled artifact executes: the BatchNorm-folded model after the
    compiler's exact constant-channel fold (:func:`channel_fold.fold_all`, what
    ``compiler.frontend.to_relax`` and the int8 path compile; the build's manifest records
    the same fold in ``reports.channel_fold``). ``fold``: what was folded (None: nothing)."""
    folded, rep = fold_all(stored)
    return {"flops": flops_summary(folded)["flops"],
            "fold": rep.summary() if rep is not None else None}


def _load_inputs(weights: str | Path | None, model: nn.Module | None,
                 calib: CalibrationSet | None, calib_dir: str | Path | None,
                 test_dir: str | Path | None = None
                 ) -> tuple[nn.Module, CalibrationSet, Path | None]:
    """The original model, ``calib/`` and the original's checkpoint (None for a model given
    as an object: the TVM path saves it)."""
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
    work.mkdir(parents=True, exist_ok=True)
    p = work / "original.pth"
    save_checkpoint(model, p)
    return p


def _save(out: Path, rep: dict[str, Any]) -> None:
    (out / "compression-report.json").write_text(
        json.dumps(_jsonable(rep), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_markdown(out / "compression-report.md", rep)
    plot(out / "compression-report.png", rep["variants"], rep.get("latency"))


def refresh_latency(out: str | Path = DEFAULT_OUT, quick: bool | None = None,
                    selection: bool = False, latency: str = "torch",
                    trials: int | None = None, rounds: int = 5, runs: int = 20,
                    only: Sequence[str] | None = None, weights: str | Path | None = None,
                    calib_dir: str | Path | None = None, model: nn.Module | None = None,
                    calib: CalibrationSet | None = None, work: Path | None = None,
                    command: str | None = None, goals: Sequence[Goal] | None = None,
                    log: Callable[[str], None] = _log) -> dict[str, Any]:
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
    for row in rows:  # which run timed the row: goals say when a ratio spans two runs
        row["latency_run"] = setup["started"]
    rep["variants"] = [by_name[v.name] for v in keep]
    latency_ratios(rep["variants"])
    rep["latency"] = setup
    _set_goals(rep, goals)
    if selection:
        rep["selection"] = _selection(original, keep, calib, log)
    rep["refreshed"] = setup["measured"]
    _save(out, rep)
    return rep


def _selection(original: nn.Module, variants: list[Variant], calib: CalibrationSet,
               log: Callable[[str], None]) -> dict[str, Any]:
    """The build's accuracy-guarded selection over the report's variants (calib/ only)."""
    log("selection on the calib/ validation split")
    cands = [Candidate(v.name, v.prune, v.quant, pruned_model=v.stored) for v in variants]
    return _jsonable(select(original, cands, calib, Budget(0.5, measure="lost")).to_dict())


def _set_goals(rep: dict[str, Any], goals: Sequence[Goal] | None) -> None:
    """Evaluate the goals given, else the ones the report was first given (kept in its
    JSON), so a refresh re-checks what the report was checked against."""
    if goals is not None:
        rep["goal_specs"] = [g.to_dict() for g in goals]
    specs = goals_from_dicts(rep.get("goal_specs") or [], "compression-report.json")
    rep["goals"] = evaluate_goals(specs, rep["variants"])


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))


def run_report(out: str | Path = DEFAULT_OUT, quick: bool = False, weights: str | None = None,
               calib_dir: str | Path | None = None, test_dir: str | Path | None = None,
               latency: str = "torch", selection: bool | None = None,
               model: nn.Module | None = None, calib: CalibrationSet | None = None,
               test: EvalSet | None = None, trials: int | None = None, rounds: int = 5,
               runs: int = 20, work: Path | None = None, command: str | None = None,
               goals: Sequence[Goal] | None = None, log: Callable[[str], None] = _log
               ) -> dict[str, Any]:
    """Build every variant, measure it, write the three report files into ``out``, with
    the ``goals`` (if given) met / missed."""
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
    for row in rows:
        row["latency_run"] = setup["started"]
    rep: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command, "quick": quick, "variants": rows, "latency": setup,
    }
    _set_goals(rep, goals)
    if selection if selection is not None else not quick:
        rep["selection"] = _selection(original, variants, calib, log)
    rep["seconds"] = time.time() - t0
    _save(out, rep)
    return rep
