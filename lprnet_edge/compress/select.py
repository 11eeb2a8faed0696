"""Accuracy-checked choice of a compressed variant, decided on the validation split of ``calib/``.

Each candidate is (prune config or none) x (quantize config or none) [x fallback layers]. For
each one, :func:`select` builds the variant, checks its plate readings against the original's
with the build's one accuracy check (:mod:`lprnet_edge.compress.accuracy`, on its validation
split, never ``test/``), and measures the stored size of its params file with the encodings it
would ship with, and its FLOPs. Among candidates within the budget, the winner is
(``optimize="size"``, the default) the smallest stored size, then the fewest FLOPs; or
(``optimize="latency"``) the lowest latency measured on the target, then the smallest size.
Latency is measured by the caller's ``latency`` function (the build pipeline builds and times
each candidate on the host or on a board over RPC: this layer compiles nothing), never assumed
from FLOPs or encodings. Every candidate's figures and why the winner won are returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from lprnet_edge.compress.accuracy import VALIDATION, AccuracyCheck, Budget, compare, readings
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
from lprnet_edge.model.calib import CalibrationSet, accuracy, load_eval_set
from lprnet_edge.model.flops import summary as flops_summary
from lprnet_edge.runtime.errors import DataError, LprnetEdgeError

OPTIMIZE = ("size", "latency")
Log = Callable[[str], None]


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


# ``latency(candidates) -> {name: LatencyFigure}`` for the candidates within budget.
LatencyFn = Callable[[list[Candidate]], dict[str, LatencyFigure]]


@dataclass(frozen=True)
class CandidateFigures:
    """What the search measured of one candidate. ``timed``: the search optimised latency, so
    the row carries a latency figure (None for a candidate that was not timed)."""

    description: dict[str, Any]
    check: AccuracyCheck
    stored_bytes: int
    flops: int
    macs: int
    params: int
    encodings: tuple[str, ...]
    seconds: float
    latency: LatencyFigure | None = None
    timed: bool = False

    @property
    def name(self) -> str:
        return self.description["name"]

    @property
    def within_budget(self) -> bool:
        return self.check.ok

    def to_dict(self) -> dict[str, Any]:
        c = self.check
        row = {**self.description, "val_accuracy": c.changed, "val_drop": c.original - c.changed,
               "val_agreement": c.agreement, "val_lost": c.lost / c.images,
               "val_gained": c.gained / c.images, "stored_bytes": self.stored_bytes,
               "flops": self.flops, "macs": self.macs, "params": self.params,
               "encodings": list(self.encodings), "seconds": self.seconds,
               "within_budget": self.within_budget}
        if self.timed:
            row.update(self.latency.to_dict() if self.latency else {"latency_ms": None})
        return row


@dataclass(frozen=True)
class TestComparison:
    """Accuracy on ``test/`` of the model built and of the original, measured after the choice
    and never used for it; ``skipped`` says why there is none."""

    __test__ = False  # a "Test*" name, not a test class (pytest would try to collect it)

    original: float | None = None
    selected: float | None = None
    images: int = 0
    data: str = ""
    skipped: str | None = None

    @property
    def change_points(self) -> float:
        return 100 * ((self.selected or 0.0) - (self.original or 0.0))

    def to_dict(self) -> dict[str, Any]:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        return {"original": self.original, "selected": self.selected,
                "change_points": self.change_points, "images": self.images, "data": self.data,
                "measured_with": "pytorch (the model compiled; int8: its simulation), "
                                 "batch-1 semantics"}


@dataclass(frozen=True)
class Selection:
    """The search's result, as the manifest records it."""

    budget: Budget
    val_images: int
    original_val_accuracy: float
    selected: str | None
    optimize: str
    why: str | None
    candidates: tuple[CandidateFigures, ...]
    test: TestComparison | None = None

    @property
    def winner(self) -> CandidateFigures | None:
        return next((c for c in self.candidates if c.name == self.selected), None)

    def to_dict(self) -> dict[str, Any]:
        # "budget" (a fraction) and "guard" (the measure) are the keys the report renders.
        d = {"budget": self.budget.points / 100, "guard": self.budget.measure,
             "val_split": VALIDATION.to_dict(self.val_images),
             "original_val_accuracy": self.original_val_accuracy, "selected": self.selected,
             "optimize": self.optimize, "why": self.why,
             "candidates": [c.to_dict() for c in self.candidates],
             "budget_points": self.budget.points}
        if self.test is not None:
            d["test"] = self.test.to_dict()
        return d


def build_variant(original: nn.Module, cand: Candidate, calib: CalibrationSet | None = None
                  ) -> tuple[nn.Module, nn.Module, dict[str, str]]:
    """``(model to evaluate, model whose weights are stored, encodings)``.

    For ``int8`` (activations too) the evaluated model is the fake-quant simulation; the
    stored weights are the pruned float model's, encoded ``int8``.
    """
    model = original
    if cand.pruned_model is not None:
        model = cand.pruned_model
    elif cand.prune is not None:
        model, _rep = prune(original, cand.prune, calib)
    evaluated = model
    if cand.quant is not None:
        evaluated = quantize(model, cand.quant, calib).module
    return evaluated, model, params_encodings(model, cand.prune, quant=cand.quant)


def evaluate_candidate(original_readings: list[str], cand: Candidate, original: nn.Module,
                       train: CalibrationSet, val: CalibrationSet, budget: Budget
                       ) -> CandidateFigures:
    """Figures of one candidate, built from ``train`` and checked on ``val``."""
    t0 = time.time()
    evaluated, stored, enc = build_variant(original, cand, train)
    check = compare(original_readings, readings(evaluated, val), val.labels, budget)
    fl = flops_summary(stored)
    return CandidateFigures(cand.describe(), check, stored_size(stored, enc), fl["flops"],
                            fl["macs"], fl["params"], tuple(sorted(set(enc.values()))),
                            round(time.time() - t0, 1))


def select(original: nn.Module, candidates: list[Candidate], calib: CalibrationSet,
           budget: Budget, progress: Callable[[CandidateFigures], None] | None = None,
           optimize: str = "size", latency: LatencyFn | None = None) -> Selection:
    """Check ``candidates`` on the validation split of ``calib``; among those within ``budget``
    pick the smallest stored size (then fewest FLOPs), or with ``optimize="latency"`` the
    fastest by ``latency`` (then the smallest). Quantization calibrates on the training part,
    so the check runs on images that set no scale."""
    if optimize not in OPTIMIZE:
        raise LprnetEdgeError(f"--optimize {optimize!r}: use one of {list(OPTIMIZE)}")
    train, val = VALIDATION.of(calib)
    ref = readings(original, val)
    rows = []
    for cand in candidates:
        rows.append(evaluate_candidate(ref, cand, original, train, val, budget))
        if progress:
            progress(rows[-1])
    if optimize == "latency":
        rows = _timed(candidates, rows, latency)
    ok = [r for r in rows if r.within_budget]
    best = _choose(ok, optimize)
    base = sum(r == t for r, t in zip(ref, val.labels, strict=True)) / len(val)
    return Selection(budget, len(val), float(base), best.name if best else None, optimize,
                     _why(best, ok, optimize), tuple(rows))


def _timed(candidates: list[Candidate], rows: list[CandidateFigures], latency: LatencyFn | None
           ) -> list[CandidateFigures]:
    """``rows`` with the measured latency of those within budget."""
    if latency is None:
        raise LprnetEdgeError("--optimize latency needs a way to measure latency on the target")
    names = {r.name for r in rows if r.within_budget}
    if not names:
        return rows
    figures = latency([c for c in candidates if c.name in names])
    return [replace(r, latency=figures.get(r.name), timed=True) for r in rows]


def _choose(ok: list[CandidateFigures], optimize: str) -> CandidateFigures | None:
    """The winner among the rows within budget."""
    if not ok:
        return None
    if optimize == "size":
        return min(ok, key=lambda r: (r.stored_bytes, r.flops))
    timed = [r for r in ok if r.latency is not None]
    if not timed:
        raise LprnetEdgeError("no candidate within the budget could be timed on the target")
    return min(timed, key=lambda r: (r.latency.latency_ms, r.stored_bytes, r.flops))


def _why(best: CandidateFigures | None, ok: list[CandidateFigures], optimize: str) -> str | None:
    """One sentence for the manifest: what the winner beat, by the figure it was chosen on."""
    if best is None:
        return None
    if optimize == "size":
        return (f"smallest stored size ({best.stored_bytes} bytes) of the {len(ok)} "
                "candidates within the accuracy budget")
    others = sorted((r for r in ok if r.latency is not None), key=lambda r: r.latency.latency_ms)
    listing = ", ".join(f"{r.name} {r.latency.latency_ms:.2f} ms" for r in others)
    return (f"lowest latency on {best.latency.where} ({best.latency.latency_ms:.2f} ms; "
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
                       log: Log | None = None) -> list[Candidate]:
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


def test_comparison(original: nn.Module, built: nn.Module, test_dir: str | Path | None = None
                    ) -> TestComparison:
    """Exact-plate accuracy on ``test/`` at batch-1 semantics of the model the build compiles
    and of the original: measured, never tuned on; skipped when there is no test/ here."""
    try:
        data = load_eval_set(test_dir)
    except DataError as e:  # no test/ here: the choice stands, its test figure is unknown
        return TestComparison(skipped=str(e))
    return TestComparison(accuracy(original, data), accuracy(built, data), len(data.labels),
                          str(data.root))


def _progress_line(row: CandidateFigures) -> str:
    c = row.check
    return (f"  {row.name:<26} val acc {c.changed:.3f} "
            f"(drop {c.drop_points:+.1f} pt, lost {c.lost_points:.1f} pt)"
            f"  {row.stored_bytes / 1e3:7.1f} kB  {row.flops / 1e6:4.0f} MFLOPs"
            f"  {'ok' if row.within_budget else 'over budget'}")


def search(original: nn.Module, calib: CalibrationSet, budget_points: float,
           channels: tuple[float, ...] = (), log: Log | None = None,
           optimize: str = "size", latency: LatencyFn | None = None,
           candidates: list[Candidate] | None = None
           ) -> tuple[Candidate, nn.Module | None, Selection]:
    """``build --max-accuracy-drop [--optimize size|latency]``: the winner of :func:`select`
    over ``candidates`` (default: the default grid + channel pruning at the ``channels``
    ratios), its model when it must be reused as measured (channel-pruned: distilled on the
    split), and the selection for the manifest. The budget counts plates lost, not the net
    drop (distillation adapts the candidates to calib/: see :class:`Budget`)."""
    train, _ = VALIDATION.of(calib)
    cands = list(candidates) if candidates is not None else default_candidates()
    if channels:
        cands += channel_candidates(original, train, channels, log)
    sel = select(original, cands, calib, Budget.of(budget_points, measure="lost"),
                 progress=(lambda row: log(_progress_line(row))) if log else None,
                 optimize=optimize, latency=latency)
    if sel.selected is None:
        raise LprnetEdgeError(f"no candidate stays within --max-accuracy-drop {budget_points} "
                              "points on the calib/ validation split; raise it")
    best = next(c for c in cands if c.name == sel.selected)
    return best, best.pruned_model, sel
