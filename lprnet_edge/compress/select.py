"""Accuracy-guarded choice of a compressed variant, decided on a validation split of ``calib/``.

Each candidate is (prune config or none) x (quantize config or none) [x fallback layers]. For
each one, :func:`select` builds the variant, measures its exact-plate accuracy at batch-1
semantics on a fixed-seed validation split of ``calib/`` (never ``test/``), the agreement with
the original's readings there, the stored size of its params file with the encodings it would
ship with, and its FLOPs. Among candidates whose accuracy drop versus the original on that
split is within ``budget``, the winner is (``optimize="size"``, the default) the smallest stored
size, then the fewest FLOPs; or (``optimize="latency"``) the lowest latency measured on the
target, then the smallest size. Latency is measured by the caller's ``latency`` function (the
build pipeline builds and times each candidate on the host or on a board over RPC: this layer
compiles nothing), never assumed from FLOPs or encodings. Every candidate's figures, latency
included, and why the winner won are returned (for the manifest).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lprnet_edge.compress.configs import (
    ChannelPruneConfig,
    Fp16WeightsConfig,
    Int8Config,
    Int8WeightsConfig,
    PruneConfig,
    QuantizeConfig,
    UnstructuredPruneConfig,
)
from lprnet_edge.compress.prune import params_encodings, prune, stored_size
from lprnet_edge.compress.quantize import quantize
from lprnet_edge.model.calib import CalibrationSet, decode_batch, predict_logits
from lprnet_edge.model.flops import summary as flops_summary

OPTIMIZE = ("size", "latency")


@dataclass(frozen=True)
class LatencyFigure:
    """A candidate's measured latency: ``measured_as`` names the candidate whose build was
    timed (candidates that compile to the same graph share one build), ``where`` the
    session (``local`` or the RPC address)."""

    latency_ms: float
    measured_as: str
    where: str
    timing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "latency_measured_as": self.measured_as,
                "latency_where": self.where, "latency_timing": self.timing}


# ``latency(candidates) -> {name: LatencyFigure}`` for the candidates within budget.
LatencyFn = Callable[[list["Candidate"]], dict[str, LatencyFigure]]


@dataclass
class Candidate:
    name: str
    prune: PruneConfig | None = None
    quant: QuantizeConfig | None = None
    # A ready model for the prune step (e.g. a cached channel-pruned + distilled checkpoint).
    pruned_model: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name,
                "prune": self.prune.to_dict() if self.prune else None,
                "quantize": self.quant.to_dict() if self.quant else None, **self.extra}


def build_variant(original: nn.Module, cand: Candidate, calib: CalibrationSet | None = None
                  ) -> tuple[nn.Module, nn.Module, dict[str, str], dict[str, Any]]:
    """``(model to evaluate, model whose weights are stored, encodings, info)``.

    For ``int8`` (activations too) the evaluated model is the fake-quant simulation; the
    stored weights are the pruned float model's, encoded ``int8``.
    """
    info: dict[str, Any] = {}
    model = original
    if cand.pruned_model is not None:
        model = cand.pruned_model
    elif cand.prune is not None:
        model, rep = prune(original, cand.prune, calib)
        info["prune"] = {k: v for k, v in rep.items() if k not in ("layers", "distill")}
    stored = model
    evaluated = model
    if cand.quant is not None:
        q = quantize(model, cand.quant, calib)
        evaluated = q.module
        info["act_scales"] = q.act_scales or None
    enc = params_encodings(stored, cand.prune, quant=cand.quant)
    return evaluated, stored, enc, info


def evaluate_candidate(original: nn.Module, cand: Candidate, calib: CalibrationSet,
                       val: CalibrationSet, base_acc: float,
                       reference: list[str] | None = None) -> dict[str, Any]:
    """Figures of one candidate; ``reference``: the original's readings of ``val``."""
    t0 = time.time()
    evaluated, stored, enc, info = build_variant(original, cand, calib)
    pred = decode_batch(predict_logits(evaluated, val.x))
    ref = reference if reference is not None else decode_batch(predict_logits(original, val.x))
    acc = float(sum(p == t for p, t in zip(pred, val.labels, strict=True)) / len(val))
    ok_ref = [r == t for r, t in zip(ref, val.labels, strict=True)]
    ok = [p == t for p, t in zip(pred, val.labels, strict=True)]
    fl = flops_summary(stored)
    return {
        **cand.describe(),
        "val_accuracy": acc,
        "val_drop": base_acc - acc,
        "val_agreement": float(sum(p == r for p, r in zip(pred, ref, strict=True)) / len(val)),
        # Plates the original reads right and the candidate does not (and the converse): a
        # model adapted to calib/ (distillation with CTC on its labels) gains plates there,
        # which hides the plates it lost; ``lost`` is not fooled by that.
        "val_lost": float(sum(a and not b for a, b in zip(ok_ref, ok, strict=True)) / len(val)),
        "val_gained": float(sum(b and not a for a, b in zip(ok_ref, ok, strict=True))
                            / len(val)),
        "stored_bytes": stored_size(stored, enc),
        "flops": fl["flops"],
        "macs": fl["macs"],
        "params": fl["params"],
        "encodings": sorted(set(enc.values())),
        "seconds": round(time.time() - t0, 1),
    }


def select(original: nn.Module, candidates: list[Candidate], calib: CalibrationSet,
           budget: float = 0.005, val_fraction: float = 0.3, seed: int = 0,
           progress: Callable[[dict[str, Any]], None] | None = None,
           guard: str = "drop", optimize: str = "size", latency: LatencyFn | None = None
           ) -> dict[str, Any]:
    """Evaluate ``candidates`` on the validation split of ``calib``; among those whose accuracy
    drop is ``<= budget`` pick the smallest stored size (then fewest FLOPs), or with
    ``optimize="latency"`` the fastest by ``latency`` (then the smallest).

    ``guard="drop"``: accuracy(original) - accuracy(candidate) on the split; ``"lost"``: the
    fraction of plates the original reads right that the candidate gets wrong (ignores gains:
    use it for candidates distilled or fine-tuned on calib/, whose gains there are not
    evidence of anything on other data).

    Calibration of quantization uses the *training* part of the split, so the guard is
    measured on images that did not set any scale.
    """
    train, val = calib.split(val_fraction, seed)
    ref = decode_batch(predict_logits(original, val.x))
    base_acc = float(sum(p == t for p, t in zip(ref, val.labels, strict=True)) / len(val))
    rows = []
    for cand in candidates:
        row = evaluate_candidate(original, cand, train, val, base_acc, ref)
        loss = row["val_lost"] if guard == "lost" else row["val_drop"]
        row["within_budget"] = loss <= budget + 1e-12
        rows.append(row)
        if progress:
            progress(row)
    ok = [r for r in rows if r["within_budget"]]
    best = _choose(candidates, rows, ok, optimize, latency)
    return {"budget": budget, "guard": guard, "val_split": {"fraction": val_fraction, "seed": seed,
                                            "images": len(val)},
            "original_val_accuracy": base_acc, "selected": best["name"] if best else None,
            "optimize": optimize, "why": _why(best, ok, optimize), "candidates": rows}


def _choose(candidates: list[Candidate], rows: list[dict[str, Any]],
            ok: list[dict[str, Any]], optimize: str, latency: LatencyFn | None
            ) -> dict[str, Any] | None:
    """The winner among the rows ``ok`` (within budget); for latency, measures them first
    and writes each one's figure into its row."""
    from lprnet_edge.runtime.errors import LprnetEdgeError

    if optimize not in OPTIMIZE:
        raise LprnetEdgeError(f"--optimize {optimize!r}: use one of {list(OPTIMIZE)}")
    if not ok:
        return None
    if optimize == "size":
        return min(ok, key=lambda r: (r["stored_bytes"], r["flops"]))
    if latency is None:
        raise LprnetEdgeError("--optimize latency needs a way to measure latency on the target")
    names = {r["name"] for r in ok}
    figures = latency([c for c in candidates if c.name in names])
    for r in rows:
        fig = figures.get(r["name"])
        r.update(fig.to_dict() if fig else {"latency_ms": None})
    timed = [r for r in ok if r.get("latency_ms") is not None]
    if not timed:
        raise LprnetEdgeError("no candidate within the budget could be timed on the target")
    return min(timed, key=lambda r: (r["latency_ms"], r["stored_bytes"], r["flops"]))


def _why(best: dict[str, Any] | None, ok: list[dict[str, Any]], optimize: str) -> str | None:
    """One sentence for the manifest: what the winner beat, by the figure it was chosen on."""
    if best is None:
        return None
    if optimize == "size":
        return (f"smallest stored size ({best['stored_bytes']} bytes) of the {len(ok)} "
                "candidates within the accuracy budget")
    others = sorted((r for r in ok if r.get("latency_ms") is not None),
                    key=lambda r: r["latency_ms"])
    listing = ", ".join(f"{r['name']} {r['latency_ms']:.2f} ms" for r in others)
    return (f"lowest latency on {best.get('latency_where')} ({best['latency_ms']:.2f} ms; "
            f"ties broken by stored size) of the {len(ok)} candidates within the accuracy "
            f"budget: {listing}")


def default_candidates(sparsities: tuple[float, ...] = (0.8, 0.9),
                       calibrators: tuple[str, ...] = ("percentile",),
                       fallback: tuple[str, ...] = ("container.0",)) -> list[Candidate]:
    """A small grid: unstructured sparsity x {fp32, fp16, int8 weights, int8 (+fallback)}."""
    out = [Candidate("original")]
    quants: list[tuple[str, QuantizeConfig | None]] = [
        ("", None), ("+fp16", Fp16WeightsConfig()), ("+int8w", Int8WeightsConfig())]
    for c in calibrators:
        quants.append((f"+int8-{c}", Int8Config(calibrator=c, fallback_layers=fallback)))
    for s in (0.0, *sparsities):
        p = UnstructuredPruneConfig(sparsity=s) if s else None
        for suffix, q in quants:
            if p is None and q is None:
                continue
            name = (f"sparse{int(s * 100)}" if s else "dense") + suffix
            out.append(Candidate(name, p, q))
    return out


def channel_candidates(original: nn.Module, train: CalibrationSet, ratios: tuple[float, ...],
                       log: Callable[[str], None] | None = None) -> list[Candidate]:
    """Channel-pruned (+ distilled on ``train``) models, each also with int8 weights. The
    pruned model is made once per ratio and shared by its candidates, so the one selected is
    exactly the one measured."""
    out = []
    for r in ratios:
        cfg = ChannelPruneConfig(ratio=r)
        if log:
            log(f"  channel pruning {r:g} + distillation on the calib/ training split ...")
        model, rep = prune(original, cfg, train)
        info = {"prune_report": {k: v for k, v in rep.items() if k not in ("layers", "distill")}}
        name = f"channels{int(r * 100)}"
        out.append(Candidate(name, cfg, None, model, info))
        out.append(Candidate(name + "+int8w", cfg, Int8WeightsConfig(), model, info))
    return out


def test_accuracy(model: nn.Module, test_dir: Any = None) -> dict[str, Any]:
    """Exact-plate accuracy on ``test/`` at batch-1 semantics: measured, never tuned on."""
    from lprnet_edge.model.calib import accuracy, load_eval_set

    data = load_eval_set(test_dir)
    return {"accuracy": accuracy(model, data), "images": len(data.labels),
            "data": str(data.root)}


def test_comparison(original: nn.Module, built: nn.Module, test_dir: Any = None
                    ) -> dict[str, Any]:
    """Accuracy on ``test/`` of the model the build compiles and of the original (measured
    after the choice, never used for it); ``skipped`` when there is no test/ here."""
    from lprnet_edge.runtime.errors import DataError

    try:
        orig = test_accuracy(original, test_dir)
    except DataError as e:  # no test/ here: the choice stands, its test figure is unknown
        return {"skipped": str(e)}
    sel = test_accuracy(built, test_dir)
    return {"original": orig["accuracy"], "selected": sel["accuracy"],
            "change_points": 100 * (sel["accuracy"] - orig["accuracy"]),
            "images": sel["images"], "data": sel["data"],
            "measured_with": "pytorch (the model compiled; int8: its simulation), "
                             "batch-1 semantics"}


def search(original: nn.Module, calib: CalibrationSet, budget_points: float,
           channels: tuple[float, ...] = (), log: Callable[[str], None] | None = None,
           optimize: str = "size", latency: LatencyFn | None = None,
           candidates: list[Candidate] | None = None
           ) -> tuple[Candidate, nn.Module | None, dict[str, Any]]:
    """``build --max-accuracy-drop [--optimize size|latency]``: the winner of :func:`select`
    over ``candidates`` (default: the default grid + channel pruning at the ``channels``
    ratios), its model when it must be reused as measured (channel-pruned: distilled on the
    split), and the report for the manifest."""
    from lprnet_edge.runtime.errors import LprnetEdgeError

    train, _ = calib.split(0.3, 0)
    cands = list(candidates) if candidates is not None else default_candidates()
    if channels:
        cands += channel_candidates(original, train, channels, log)

    def progress(row: dict[str, Any]) -> None:
        if log:
            log(f"  {row['name']:<26} val acc {row['val_accuracy']:.3f} "
                f"(drop {100 * row['val_drop']:+.1f} pt, lost {100 * row['val_lost']:.1f} pt)"
                f"  {row['stored_bytes'] / 1e3:7.1f} kB  {row['flops'] / 1e6:4.0f} MFLOPs"
                f"  {'ok' if row['within_budget'] else 'over budget'}")

    # "lost" ignores plates a candidate gains on calib/ (distillation adapts to it).
    rep = select(original, cands, calib, budget=budget_points / 100, progress=progress,
                 guard="lost", optimize=optimize, latency=latency)
    rep["budget_points"] = budget_points
    if rep["selected"] is None:
        raise LprnetEdgeError(f"no candidate stays within --max-accuracy-drop {budget_points} "
                              "points on the calib/ validation split; raise it")
    best = next(c for c in cands if c.name == rep["selected"])
    return best, best.pruned_model, rep
