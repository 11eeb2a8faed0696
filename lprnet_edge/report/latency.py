"""The latency column of the compression report, measured with the code of ``bench``.

Two backends:

- ``torch``: PyTorch eager at batch 1 on one thread (:func:`torch_latency`), a quick
  comparison that needs no compiler.
- ``tvm`` / ``tvm-tuned``: every variant built into a host artifact by the build pipeline
  (:func:`lprnet_edge.pipeline.build.build_artifact`, its own tune stage with a
  :class:`TuneConfig` restricted to the convolution tasks), then timed by
  :func:`lprnet_edge.compiler.session.time_artifact`, the function behind ``bench`` and
  ``tune --compare``, with a per-kernel profile of each variant
  (:class:`lprnet_edge.runtime.profile.Profile`, kept in the JSON).

Equal tuning budget: every variant is tuned with the same ``trials`` into one database that
belongs to the report and to that budget (``<work>/tuning/<trials>t-conv2d``), so no workload
inherits records from earlier, longer tuning. Variants that run the same graph share their
records. The build's tune summary (read back from the artifact's manifest) says how many
records each workload got; when they differ, :func:`budget_check` says the ratios are not
comparable and the table says so instead of printing them.

Timing is interleaved: ``rounds`` rounds, each timing every variant once (the median of
``runs`` calls), and the row's figure is the median of its per-round medians, so load changes
on a shared host hit every variant alike.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lprnet_edge.compiler.tuning import TuneConfig

if TYPE_CHECKING:
    from torch import nn

    from lprnet_edge.report.variants import Variant
    from lprnet_edge.runtime.profile import Profile

Log = Callable[[str], None]

# What the report tunes: the convolutions take nearly all of LPRNet's time (docs/tuning.md);
# the other ~25 fused kernels keep TVM's default schedules.
TUNE_TASKS = ("conv2d",)
LATENCY_THREADS = 1
PROFILE_RUNS = 10

# The build's accuracy guard (a changed model may lose at most 1 pt on calib/ by default)
# is accepted explicitly: the report builds for latency only and measures every variant's
# accuracy on test/ itself, a variant past any budget included (the table shows its loss).
REPORT_ACCURACY_BUDGET = 100.0

# Row keys this module writes (cleared before a new measurement).
LATENCY_KEYS = ("latency_ms", "latency_backend", "latency_rounds_ms", "latency_error",
                "latency_tvm", "latency_profile", "latency_comparable",
                "artifact_params_bytes", "latency_run")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- typed results


@dataclass
class TvmBuild:
    """What a variant's host artifact was built with, read back from its manifest."""

    artifact: str
    params_bytes: int
    build_s: float
    trials_budget: int | None = None
    tuned_tasks: list[str] = field(default_factory=list)
    # The build's tune summary (``manifest.reports["tune"]``): tasks, tasks_tuned, trials_new,
    # records_before, records_total, skipped, tune_s, est_ms_before, est_ms_after, db_dir.
    tuning: dict[str, Any] | None = None
    manifest_stages_tune: dict[str, Any] | None = None
    compile: dict[str, Any] = field(default_factory=dict)
    # What the compiler's constant-channel fold removed (``manifest.reports["channel_fold"]``
    # summary; None when the build recorded none, e.g. the int8 path).
    channel_fold: str | None = None

    @property
    def records_applied(self) -> int:
        """Records of the tuned tasks the build applied (0 untuned)."""
        return int((self.tuning or {}).get("records_total") or 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["records_applied"] = self.records_applied
        d.pop("artifact")
        d.pop("params_bytes")
        return d


@dataclass
class LatencyResult:
    """One variant's latency, as the report row stores it."""

    backend: str
    latency_ms: float | None = None
    rounds_ms: list[float] = field(default_factory=list)
    error: str | None = None
    tvm: TvmBuild | None = None
    profile: dict[str, Any] | None = None  # Profile.to_dict() of the artifact

    def row_fields(self) -> dict[str, Any]:
        d: dict[str, Any] = {"latency_ms": self.latency_ms, "latency_backend": self.backend}
        if self.rounds_ms and self.latency_ms is not None:
            d["latency_rounds_ms"] = self.rounds_ms
        if self.error:
            d["latency_error"] = self.error
        if self.tvm is not None:
            d["latency_tvm"] = self.tvm.to_dict()
            d["artifact_params_bytes"] = self.tvm.params_bytes
        if self.profile is not None:
            d["latency_profile"] = self.profile
        return d


# ---------------------------------------------------------------- PyTorch


def torch_latency(model: nn.Module, runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Batch-1 PyTorch eager latency on one thread (median ms)."""
    import torch

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


def interleaved_latency(variants: Sequence[Variant], rows: list[dict[str, Any]],
                        rounds: int = 5, runs: int = 20, log: Log = _log) -> None:
    """PyTorch latency of every variant, measured in interleaved rounds (the median of the
    per-round medians), so that load changes on a shared host hit all variants alike."""
    per: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            per[v.name].append(torch_latency(v.model, runs=runs, warmup=2)["p50_ms"])
    for v, row in zip(variants, rows, strict=True):
        _clear(row)
        res = LatencyResult("torch", float(np.median(per[v.name])), per[v.name])
        row.update(res.row_fields())
        log(f"  {v.name}: {res.latency_ms:.2f} ms (torch, 1 thread)")


# ---------------------------------------------------------------- TVM


def report_tune_config(trials: int, work: Path) -> TuneConfig:
    """The report's tuning: ``trials`` per workload on the convolution tasks, into a
    database of the report's own for that budget (equal budgets, see the module doc)."""
    db = Path(work) / "tuning" / f"{trials}t-{'+'.join(TUNE_TASKS)}"
    return TuneConfig(trials=trials, tasks=TUNE_TASKS, db_dir=str(db))


def tvm_build_options(v: Variant, work: Path, base_weights: str | Path | None,
                      trials: int | None) -> Any:
    """The ``BuildOptions`` of ``v``'s host artifact: its checkpoint (``weights_path``, else
    the original's), its compression configs (channel pruning is in the checkpoint: the
    distilled model), and the report's tuning (None: untuned). Verification is skipped and
    the accuracy guard accepted (:data:`REPORT_ACCURACY_BUDGET`): latency only."""
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.pipeline.build import BuildOptions

    prune = v.prune if v.prune is not None and v.prune.kind == "unstructured" else None
    return BuildOptions(target=load_target("host"), out=Path(work) / f"artifact-{v.name}",
                        weights=v.weights_path or base_weights, force=True, prune=prune,
                        quantize=v.quant,
                        tune=report_tune_config(trials, work) if trials else None,
                        verify_images=0,
                        max_accuracy_drop=REPORT_ACCURACY_BUDGET if prune or v.quant else None)


def build_tvm(v: Variant, work: Path, base_weights: str | Path | None, trials: int | None,
              log: Log = _log) -> TvmBuild:
    """Build (and with ``trials``, tune: the build's own tune stage) ``v``'s host artifact;
    what was built and applied comes from its manifest."""
    from lprnet_edge.pipeline.build import build_artifact
    from lprnet_edge.runtime.artifact import Artifact

    opts = tvm_build_options(v, work, base_weights, trials)
    t0 = time.perf_counter()
    res = build_artifact(opts, log=lambda m: log(f"    {m}") if "tun" in m else None)
    art = Artifact.open(res.path, check_arch=False)
    m = art.manifest
    tune = m.reports.get("tune")
    tuning = None
    if tune:
        keys = ("tasks", "tasks_tuned", "trials_new", "records_before", "records_total",
                "skipped", "tune_s", "est_ms_before", "est_ms_after", "db_dir", "untuned")
        tuning = {k: tune.get(k) for k in keys}
    return TvmBuild(artifact=str(res.path),
                    params_bytes=art.params_path.stat().st_size if art.params_path else 0,
                    build_s=round(time.perf_counter() - t0, 1), trials_budget=trials,
                    tuned_tasks=list(TUNE_TASKS) if trials else [], tuning=tuning,
                    manifest_stages_tune=m.stages.get("tune"),
                    compile={k: m.reports.get("compile", {}).get(k)
                             for k in ("tuned", "compile_s", "tvm_target")},
                    channel_fold=(m.reports.get("channel_fold") or {}).get("summary"))


def _short_error(e: BaseException, limit: int = 300) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    msg = f"{type(e).__name__}: {first}"
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def _clear(row: dict[str, Any]) -> None:
    for k in LATENCY_KEYS:
        row.pop(k, None)


def tvm_latencies(variants: Sequence[Variant], rows: list[dict[str, Any]], work: Path,
                  base_weights: str | Path | None, trials: int | None, rounds: int = 5,
                  runs: int = 20, profile: bool = True, log: Log = _log) -> dict[str, Any]:
    """Build every variant's host artifact (tuned with ``trials`` per workload), time them
    with :func:`time_artifact` at batch 1 on one thread, model only, in ``rounds``
    interleaved rounds of ``runs``, and (``profile``) profile each one per kernel.

    A variant that fails to build, tune or run gets ``latency_ms: None`` and
    ``latency_error`` in its row; the others are still measured. Returns the build time,
    the load when timing started, and the equal-budget check (:func:`budget_check`).
    """
    backend = "tvm-tuned" if trials else "tvm"
    results: dict[str, LatencyResult] = {}
    t0 = time.time()
    for v in variants:
        res = results[v.name] = LatencyResult(backend)
        log(f"  TVM build of {v.name}" + (f" (tuning budget {trials} trials)" if trials
                                          else " (untuned)"))
        try:
            res.tvm = build_tvm(v, work, base_weights, trials, log)
        except Exception as e:  # noqa: BLE001 - reported in the row, the others go on
            res.error = "build failed: " + _short_error(e)
            log(f"  {v.name}: {res.error}")
            continue
        log(f"  {v.name}: built in {res.tvm.build_s:.0f}s, {res.tvm.records_applied} tuning "
            "records applied")
    build_s = time.time() - t0
    load = [round(x, 2) for x in os.getloadavg()]
    _time_interleaved(results, rounds, runs)
    for name, res in results.items():
        if res.error is None and profile:
            res.profile = _profile(res)
        if res.latency_ms is not None:
            log(f"  {name}: {res.latency_ms:.2f} ms ({backend}, {LATENCY_THREADS} thread)")
    for v, row in zip(variants, rows, strict=True):
        _clear(row)
        row.update(results[v.name].row_fields())
    check = budget_check(rows)
    for row in rows:
        if row.get("latency_tvm"):
            row["latency_comparable"] = check["comparable"]
    return {"build_s": round(build_s, 1), "loadavg_timing_start": load, "budget": check}


def _time_interleaved(results: dict[str, LatencyResult], rounds: int, runs: int) -> None:
    """``rounds`` rounds of :func:`time_artifact` over every built variant (each call on a
    session of its own, so one variant's failure cannot take the others' session down)."""
    from lprnet_edge.compiler.session import time_artifact

    live = [n for n, r in results.items() if r.error is None and r.tvm is not None]
    for _ in range(rounds):
        for name in list(live):
            res = results[name]
            try:
                timed = time_artifact(res.tvm.artifact, None, repeat=runs, warmup=3,
                                      threads=LATENCY_THREADS)
            except Exception as e:  # noqa: BLE001 - this row says why, the others go on
                res.error = "run failed: " + _short_error(e)
                res.rounds_ms = []
                live.remove(name)
                continue
            res.rounds_ms.append(timed.timing.median_ms)
    for name in live:
        results[name].latency_ms = float(np.median(results[name].rounds_ms))


def _profile(res: LatencyResult) -> dict[str, Any] | None:
    """The per-kernel profile of the variant's artifact (local, like ``bench --profile``);
    None with the reason in the row's error if profiling fails (the timing stands)."""
    from lprnet_edge.compiler.session import time_artifact

    try:
        b = time_artifact(res.tvm.artifact, None, repeat=3, warmup=1,
                          threads=LATENCY_THREADS, profile=True, profile_runs=PROFILE_RUNS)
    except Exception as e:  # noqa: BLE001
        return {"error": _short_error(e)}
    return compact_profile(b.profile) if b.profile is not None else None


def compact_profile(prof: Profile) -> dict[str, Any]:
    """``prof`` (:class:`lprnet_edge.runtime.profile.Profile`, the profiler of ``bench
    --profile``) without the argument shapes, slowest kernel first, plus the time per
    schedule kind (``tuned`` / ``default`` / ``transferred`` / ``injective`` / ``naive`` /
    ``builtin``):
    what explains a variant that is slower than its FLOPs say."""
    d = prof.to_dict()
    rows = []
    for r in sorted(prof.rows, key=lambda r: -r.ms):
        kind = "builtin" if r.is_builtin else (r.schedule or "unknown")
        rows.append({"name": r.name, "ms": r.ms, "share": r.share, "calls": r.calls,
                     "gflops": r.gflops, "schedule": kind})
    by_kind: dict[str, dict[str, float]] = {}
    for r in rows:
        k = by_kind.setdefault(r["schedule"], {"kernels": 0, "ms": 0.0, "share": 0.0})
        k["kernels"] += 1
        k["ms"] += r["ms"]
        k["share"] += r["share"]
    d["rows"] = rows
    d["by_schedule"] = by_kind
    return d


def budget_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the TVM rows were tuned to the same depth: the same budget, and the same
    number of records of the tuned tasks applied in every workload. Without that, latency
    ratios compare tuning as well as models, and the report does not print them."""
    tuned = [r for r in rows if r.get("latency_tvm")]
    budgets = sorted({r["latency_tvm"].get("trials_budget") or 0 for r in tuned})
    records = {r["name"]: r["latency_tvm"].get("records_applied", 0) for r in tuned}
    distinct = sorted(set(records.values()))
    reasons = []
    if len(budgets) > 1:
        reasons.append(f"budgets differ ({budgets})")
    if len(distinct) > 1:
        reasons.append("records applied differ between workloads ("
                       + ", ".join(f"{n} {c}" for n, c in records.items()) + ")")
    return {"comparable": not reasons, "budgets": budgets, "records_applied": records,
            "reason": "; ".join(reasons) or None}


def latency_ratios(rows: list[dict[str, Any]], comparable: bool = True) -> None:
    """``latency_ratio`` = the original's latency / the row's (None without both, or when
    the budgets were not equal)."""
    base = rows[0].get("latency_ms") if rows else None
    for row in rows:
        lat = row.get("latency_ms")
        ok = comparable and row.get("latency_comparable", True)
        row["latency_ratio"] = base / lat if ok and base and lat else None


def latency_setup(backend: str, rounds: int, runs: int, trials: int | None = None,
                  command: str | None = None) -> dict[str, Any]:
    """How the latency column was measured (kept in the JSON, described in the Markdown)."""
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    setup: dict[str, Any] = {
        "backend": backend, "batch": 1, "threads": LATENCY_THREADS, "model_only": True,
        "rounds": rounds, "runs_per_round": runs,
        "statistic": "median over rounds of the per-round median",
        "started": now, "measured": now,
        "host": _cpu_name() or platform.machine(), "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if backend.startswith("tvm"):
        cfg = TuneConfig()
        setup.update(trials=trials, tuned_tasks=list(TUNE_TASKS) if trials else [],
                     timing="lprnet_edge.compiler.session.time_artifact (as bench)",
                     num_trials_per_iter=cfg.num_trials_per_iter)
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
