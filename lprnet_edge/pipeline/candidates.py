"""The search over pruning x quantization as a build stage: the choice
(:func:`lprnet_edge.compress.select.search`), and for ``--optimize latency`` each candidate
built by the pipeline's own steps and timed on the target.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lprnet_edge.compiler.session import in_child_process, open_session, time_artifact
from lprnet_edge.compiler.toolchain import find_compiler
from lprnet_edge.compiler.tuning import TuneConfig
from lprnet_edge.compress.api import PrunedModel
from lprnet_edge.compress.configs import PruneConfig, QuantizeConfig
from lprnet_edge.compress.prune import folded_encodings
from lprnet_edge.compress.select import Candidate, LatencyFigure, Selection, search
from lprnet_edge.pipeline import steps
from lprnet_edge.pipeline.package import make_manifest, write_manifest
from lprnet_edge.pipeline.values import Log, TorchModel
from lprnet_edge.pipeline.verify import skipped
from lprnet_edge.runtime.errors import LprnetEdgeError

if TYPE_CHECKING:  # the options are defined by the orchestrator, which imports this module
    from lprnet_edge.pipeline.build import BuildOptions

# Timing of the candidates: enough runs for a stable median, few enough for a board.
CANDIDATE_RUNS = 30
CANDIDATE_TIMEOUT_S = 1800.0


def run_search(tm: TorchModel, opts: BuildOptions, log: Log
               ) -> tuple[PruneConfig | None, QuantizeConfig | None, PrunedModel | None,
                          Selection]:
    """The winner's prune and quantize configs within ``opts.max_accuracy_drop`` points, its
    :class:`PrunedModel` when it must be reused as measured (channel-pruned: distilled during
    the search), and the selection for the manifest."""
    calib = steps.calibration_set(opts.calib_dir, tm)
    latency = None
    if opts.optimize == "latency":
        def latency(cands: list[Candidate]) -> dict[str, LatencyFigure]:
            return candidate_latencies(cands, opts, log)
    best, model, selection = search(tm.original, calib, opts.max_accuracy_drop,
                                    channels=opts.search_channels, log=log,
                                    optimize=opts.optimize, latency=latency)
    pruned = None
    if model is not None and best.prune is not None:
        pruned = PrunedModel(model, best.prune, dict(best.extra.get("prune_report") or {}),
                             folded_encodings(model))
    return best.prune, best.quant, pruned, selection


def graph_key(cand: Candidate) -> tuple[Any, ...]:
    """Candidates with equal keys compile to the same graph: unstructured sparsity, fp16 and
    int8 weights are storage encodings decoded to dense float32 at load; only the
    architecture (a channel-pruned model) and int8 activations change what runs."""
    arch = id(cand.pruned_model) if cand.pruned_model is not None else None
    q = cand.quant
    int8 = json.dumps(q.to_dict(), sort_keys=True) if q is not None and q.mode == "int8" else None
    return (arch, int8)


def candidate_latencies(cands: list[Candidate], opts: BuildOptions, log: Log,
                        runs: int = CANDIDATE_RUNS) -> dict[str, LatencyFigure]:
    """Latency of each candidate on the build's target: one artifact per distinct graph
    (:func:`graph_key`), untuned or with ``opts.tune``'s budget into a database of its own
    (the same for every candidate), timed by ``time_artifact`` (median of ``runs``), here or
    on ``opts.latency_rpc``."""
    if not opts.target.is_native and not opts.latency_rpc:
        raise LprnetEdgeError(f"--optimize latency for {opts.target.name} measures on the "
                              "board: give --rpc HOST:PORT (a TVM RPC server on it) or "
                              "--host USER@HOST")
    where = opts.latency_rpc or "local"
    groups: dict[tuple[Any, ...], list[Candidate]] = {}
    for c in cands:
        groups.setdefault(graph_key(c), []).append(c)
    out: dict[str, LatencyFigure] = {}
    with tempfile.TemporaryDirectory(prefix="lprnet-candidates-") as tmp:
        tune = (replace(opts.tune, db_dir=str(Path(tmp) / "tuning"))
                if opts.tune is not None else None)
        for members in groups.values():
            rep = members[0]
            log(f"  latency of {rep.name} on {where}"
                + (f" (+ {len(members) - 1} same-graph)" if len(members) > 1 else ""))
            path = candidate_artifact(rep, opts, Path(tmp) / rep.name, tune)
            timing = (_time_candidate(str(path), None, runs) if opts.latency_rpc is None
                      else in_child_process(
                          _time_candidate, str(path), opts.latency_rpc, runs,
                          timeout=CANDIDATE_TIMEOUT_S, on_timeout=_candidate_timeout))
            fig = LatencyFigure(timing["median_ms"], rep.name, where, timing)
            log(f"  {rep.name}: {fig.latency_ms:.2f} ms")
            out.update({c.name: fig for c in members})
    return out


def _time_candidate(path: str, rpc: str | None, runs: int) -> dict[str, Any]:
    """``time_artifact`` on a session of its own (one candidate's crash on the device cannot
    take the next candidates' session down)."""
    res = time_artifact(path, open_session(rpc=rpc), repeat=runs, warmup=min(5, runs))
    return res.timing.to_dict()


def _candidate_timeout() -> LprnetEdgeError:
    return LprnetEdgeError(f"timing a candidate on the device took over "
                           f"{CANDIDATE_TIMEOUT_S:g}s")


def candidate_artifact(cand: Candidate, opts: BuildOptions, out_dir: Path,
                       tune: TuneConfig | None) -> Path:
    """``cand`` built for ``opts.target`` into ``out_dir`` by the pipeline's steps (not
    verified: only timed)."""
    quiet: Log = lambda _m: None  # noqa: E731
    tm = steps.load_torch(opts.weights, opts.charset)
    if cand.pruned_model is not None:
        tm = steps.adopt_pruned(tm, PrunedModel(cand.pruned_model, cand.prune, {},
                                                folded_encodings(cand.pruned_model)))
    elif cand.prune is not None:
        tm = steps.prune_model(tm, cand.prune, opts.calib_dir)
    if cand.quant is not None:
        tm = steps.quantize_model(tm, cand.quant, opts.calib_dir)
    relax_model = steps.import_model(tm, opts.compile.frontend, opts.compile.layout,
                                     opts.target)
    compiler = find_compiler(opts.target, opts.cc)
    database, summary = None, None
    if tune is not None:
        database, summary = steps.tune_model(relax_model, opts.target, tune, quiet, compiler)
    out_dir.mkdir(parents=True)
    compiled = steps.compile_model(relax_model, opts.target, out_dir, compiler, opts.compile,
                                   tm, database=database, log=quiet, summary=summary)
    manifest = make_manifest(cand.name, tm, compiled, opts.compile, skipped("timed only"),
                             None, summary)
    write_manifest(out_dir, manifest)
    return out_dir
