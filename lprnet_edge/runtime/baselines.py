"""What a user would run instead of the artifact, timed beside it in the same process.

``lprnet-edge bench`` (host) and the device agent's ``bench --onnx`` (board) use this module:
:class:`OnnxRuntimeModel` (ONNX Runtime fp32 at a given thread count), :func:`interleaved` (one
timer for every candidate: rounds of A, B, C, A, B, C, ... so a drift of the machine's speed
hits them all alike; the figure is the median of the per-round medians) and
:func:`compare_artifact` (the artifact's module next to ORT and any other callables, with the
speed-up ratios).

Runtime side: numpy, ``tvm.runtime`` and optionally ``onnxruntime`` (this file ships to the
board; PyTorch rows are passed in by the host as plain callables).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError
from lprnet_edge.runtime.isolated import WorkerSpec
from lprnet_edge.runtime.profile import Timing

ARTIFACT = "tvm"
ONNXRUNTIME = "onnxruntime"
TORCH = "torch"


# ---------------------------------------------------------------- ONNX Runtime


def ort_install_hint(where: str = "") -> str:
    """How to get onnxruntime into *this* Python (the venv's pip when it runs in one)."""
    if sys.prefix != sys.base_prefix:
        return f"not installed{where}: pip install onnxruntime in {sys.prefix}"
    return f"not installed{where}: pip install onnxruntime"


def onnxruntime_missing(where: str = "", probe: bool = False) -> str | None:
    """None when onnxruntime imports here, else the reason and the fix (one line).

    ``probe`` imports it in a child process first: a wheel that does not suit the CPU can
    kill the process on import (seen: SIGSEGV under qemu-user), which must not take the
    artifact's own figures down with it."""
    if probe:
        import subprocess

        try:
            r = subprocess.run([sys.executable, "-c", "import onnxruntime"], capture_output=True,
                               text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"onnxruntime{where} did not finish importing in 600 s"
        if r.returncode < 0:
            return (f"onnxruntime{where} crashes on import (signal {-r.returncode}): its wheel "
                    f"does not run on this CPU; reinstall it (pip install --force-reinstall "
                    f"onnxruntime in {sys.prefix})")
        if r.returncode != 0:
            if "No module named 'onnxruntime'" in r.stderr:
                return ort_install_hint(where)
            tail = (r.stderr.strip().splitlines() or ["?"])[-1]
            return f"onnxruntime{where} fails to import: {tail}"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return ort_install_hint(where)
    return None


class OnnxRuntimeModel:
    """An ONNX model in ONNX Runtime's CPU provider, set up as a fair baseline: ``threads``
    intra-op threads, one inter-op thread, sequential execution, every graph optimisation."""

    name = ONNXRUNTIME

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ToolchainError(f"ONNX Runtime {ort_install_hint()}") from e
        p = Path(path)
        if not p.is_file():
            raise LprnetEdgeError(f"{p}: no such ONNX file")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # warnings about unused initializers are noise here
        try:
            self.session = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for a bad file
            raise LprnetEdgeError(f"{p}: ONNX Runtime cannot load it ({e})") from e
        self.input_name = self.session.get_inputs()[0].name
        self.threads = int(threads)
        self.version = str(ort.__version__)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


# ---------------------------------------------------------------- interleaved timing


@dataclass(frozen=True)
class RoundsTiming(Timing):
    """A :class:`Timing` measured in interleaved rounds: ``median_ms`` is the median of the
    per-round medians (``round_medians_ms``); the other figures are over every sample."""

    rounds: int = 0
    round_medians_ms: list[float] = field(default_factory=list)


def interleaved(candidates: Mapping[str, Callable[[], Any]], rounds: int = 5, runs: int = 20,
                warmup: int = 5, threads: int | None = None,
                before: Mapping[str, Callable[[], None]] | None = None
                ) -> dict[str, RoundsTiming]:
    """Time each callable in rounds (A x runs, B x runs, ..., then again), same process.

    ``before[name]`` runs (untimed) right before each of that candidate's blocks: e.g. setting
    the FPU's flush-to-zero mode again for PyTorch, which loading another runtime may reset.
    Every call is timed on its own; a candidate's figure is the median of its per-round
    medians, robust to a round disturbed by other work on the machine.
    """
    samples = interleaved_blocks(candidates, rounds, runs, warmup, before)
    return {name: rounds_timing(blocks, threads) for name, blocks in samples.items()}


def interleaved_blocks(candidates: Mapping[str, Callable[[], Any]], rounds: int, runs: int,
                       warmup: int, before: Mapping[str, Callable[[], None]] | None = None
                       ) -> dict[str, list[list[float]]]:
    """:func:`interleaved`'s samples: per candidate, one list of call times (s) per round."""
    if rounds < 1 or runs < 1:
        raise LprnetEdgeError("interleaved timing needs rounds >= 1 and runs >= 1")
    before = before or {}
    for name, fn in candidates.items():
        if name in before:
            before[name]()
        for _ in range(warmup):
            fn()
    samples: dict[str, list[list[float]]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            if name in before:
                before[name]()
            block = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                block.append(time.perf_counter() - t0)
            samples[name].append(block)
    return samples


def rounds_timing(blocks: list[list[float]], threads: int | None) -> RoundsTiming:
    """The figures of per-round blocks of call times (s): median of the round medians."""
    flat = Timing.from_seconds([s for b in blocks for s in b], 1, threads)
    medians = [float(np.median(b)) * 1e3 for b in blocks]
    fields = {k: getattr(flat, k) for k in Timing.__dataclass_fields__}
    fields["median_ms"] = float(np.median(medians))
    return RoundsTiming(**fields, rounds=len(blocks), round_medians_ms=medians)


def speedups(timings: Mapping[str, Timing], subject: str = ARTIFACT) -> dict[str, float]:
    """``subject``'s speed-up over every other candidate: their median / its median (>1 means
    the subject is faster)."""
    mine = timings[subject].median_ms
    return {f"vs_{name}": t.median_ms / mine for name, t in timings.items()
            if name != subject and mine > 0}


# ---------------------------------------------------------------- the side-by-side


@dataclass(frozen=True)
class Baseline:
    """A candidate to time beside the artifact: ``fn(x) -> logits`` and its row label;
    ``spec`` builds the same candidate in a process of its own (see :mod:`.isolated`)."""

    name: str
    label: str
    fn: Callable[[np.ndarray], np.ndarray] | None
    before: Callable[[], None] | None = None
    spec: WorkerSpec | None = None


@dataclass
class Comparison:
    """The artifact next to its baselines on the same input at the same thread count.

    ``rows`` in timing order (the artifact first); ``missing`` names each baseline that could
    not run and why; ``speedup`` is the artifact's speed-up over each timed baseline;
    ``isolated``: each candidate was timed in its own process (see :mod:`.isolated`)."""

    threads: int
    rounds: int
    runs_per_round: int
    rows: list[dict[str, Any]]
    missing: dict[str, str]
    speedup: dict[str, float]
    notes: list[str] = field(default_factory=list)
    isolated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "rounds": self.rounds,
                "runs_per_round": self.runs_per_round, "rows": self.rows,
                "missing": self.missing, "speedup": self.speedup, "notes": self.notes,
                "isolated": self.isolated}


def compare_artifact(artifact: Any, onnx: str | Path | None = None, threads: int | None = None,
                     rounds: int = 5, runs: int = 20, warmup: int = 5,
                     baselines: Sequence[Baseline] = (), missing: Mapping[str, str] | None = None,
                     where: str = "", probe_ort: bool = False,
                     isolate: bool | None = None) -> Comparison:
    """Time an artifact's module (model only, numpy in and out) beside ONNX Runtime on
    ``onnx`` (when given and importable) and ``baselines``, all on one input (the synthetic
    plate every timing path uses) and ``threads`` threads (default: the artifact's);
    ``rounds`` rounds of ``runs`` calls per candidate, after ``warmup`` calls each.

    ``isolate`` (default: when more than one thread) times each candidate in its own process,
    alternating processes round by round (:func:`.isolated.run_isolated`): spinning thread
    pools in one process slow each other. Otherwise all run interleaved in this process.
    ``missing``: baselines the caller could not set up, with the reason (shown as rows);
    ``probe_ort``: import onnxruntime in a child process first (the device agent does: see
    :func:`onnxruntime_missing`).
    Each baseline's largest |logit difference| to the artifact is reported too: ~1e-5 for an
    fp32 build of the same weights; larger for a pruned or quantized artifact."""
    from lprnet_edge.runtime.profile import apply_threads, configured_threads, module_inputs

    inp = module_inputs(artifact, check_arch=True)
    apply_threads(threads, inp.artifact)
    n = configured_threads(threads)
    gone = dict(missing or {})
    ort_version = None
    if onnx is not None:
        reason = onnxruntime_missing(where, probe=probe_ort)
        if reason is None:
            import onnxruntime

            ort_version = str(onnxruntime.__version__)
        else:
            gone[ONNXRUNTIME] = reason
    labels = {ARTIFACT: f"TVM artifact ({inp.artifact.manifest.target.name})"}
    if ort_version is not None:
        labels[ONNXRUNTIME] = f"ONNX Runtime {ort_version} fp32"
    labels.update({b.name: b.label for b in baselines})
    per_round = max(1, runs)
    isolated = n > 1 if isolate is None else bool(isolate)
    if isolated:
        blocks, outputs = _time_isolated(inp, n, onnx if ort_version else None, baselines,
                                         gone, rounds, per_round, warmup)
    else:
        blocks, outputs = _time_in_process(inp, n, onnx if ort_version else None, baselines,
                                           rounds, per_round, warmup)
    timings = {name: rounds_timing(b, n) for name, b in blocks.items()}
    ratios = speedups(timings)
    ref = outputs[ARTIFACT]
    rows = []
    for name in blocks:
        row: dict[str, Any] = {"name": name, "label": labels[name],
                               "timing": timings[name].to_dict()}
        if name != ARTIFACT:
            out = outputs[name]
            row["speedup"] = ratios[f"vs_{name}"]
            row["max_abs_logit_diff"] = (float(np.max(np.abs(out - ref)))
                                         if out.shape == ref.shape else None)
        rows.append(row)
    return Comparison(threads=n, rounds=rounds, runs_per_round=per_round, rows=rows,
                      missing=gone, speedup=ratios, isolated=isolated)


Blocks = dict[str, list[list[float]]]


def _time_in_process(inp: Any, n: int, onnx: str | Path | None, baselines: Sequence[Baseline],
                     rounds: int, runs: int, warmup: int) -> tuple[Blocks, dict[str, Any]]:
    """Every candidate loaded here and timed interleaved (:func:`interleaved`)."""
    from lprnet_edge.runtime.profile import LoadedModule

    fns: dict[str, Callable[[np.ndarray], Any]] = {
        ARTIFACT: LoadedModule(inp.lib_path, inp.params, inp.entry)}
    before = {b.name: b.before for b in baselines if b.before}
    if onnx is not None:
        fns[ONNXRUNTIME] = OnnxRuntimeModel(onnx, n)
    fns.update({b.name: b.fn for b in baselines if b.fn is not None})
    x = inp.x
    outputs = {}
    for name, fn in fns.items():
        if name in before:
            before[name]()
        outputs[name] = np.asarray(fn(x))
    blocks = interleaved_blocks({name: (lambda f=fn: f(x)) for name, fn in fns.items()},
                                rounds=rounds, runs=runs, warmup=warmup, before=before)
    return blocks, outputs


def _time_isolated(inp: Any, n: int, onnx: str | Path | None, baselines: Sequence[Baseline],
                   gone: dict[str, str], rounds: int, runs: int, warmup: int
                   ) -> tuple[Blocks, dict[str, Any]]:
    """Every candidate in a worker process of its own (:func:`.isolated.run_isolated`)."""
    from lprnet_edge.runtime.isolated import (
        artifact_module,
        onnxruntime_model,
        run_isolated,
        thread_env,
    )

    env = thread_env(n)
    specs = [WorkerSpec(ARTIFACT, ARTIFACT, artifact_module,
                        {"artifact": str(inp.artifact.root), "threads": n}, env)]
    if onnx is not None:
        specs.append(WorkerSpec(ONNXRUNTIME, ONNXRUNTIME, onnxruntime_model,
                                {"path": str(onnx), "threads": n}, env))
    for b in baselines:
        if b.spec is None:
            gone[b.name] = "not run: it cannot be built in a process of its own"
        else:
            specs.append(b.spec)
    res = run_isolated(specs, inp.x, rounds=rounds, runs=runs, warmup=warmup)
    if ARTIFACT in res.errors:
        raise LprnetEdgeError(f"the artifact's worker process failed: {res.errors[ARTIFACT]}")
    gone.update(res.errors)
    return res.blocks, res.outputs


LABELS = {ARTIFACT: "TVM artifact", ONNXRUNTIME: "ONNX Runtime fp32", TORCH: "PyTorch eager"}


def format_comparison(d: Mapping[str, Any]) -> str:
    """The side-by-side as text (``Comparison.to_dict()``, possibly read back from JSON):
    one row per candidate, the artifact's speed-up over each, the missing rows and notes."""
    head = ["candidate", "median ms", "min ms", "p90 ms", "artifact speed-up", "max |diff|"]
    body = []
    for r in d.get("rows", []):
        t = r["timing"]
        diff = r.get("max_abs_logit_diff")
        body.append([r["label"], f"{t['median_ms']:.2f}", f"{t['min_ms']:.2f}",
                     f"{t['p90_ms']:.2f}",
                     "-" if "speedup" not in r else f"{r['speedup']:.2f}x",
                     "-" if diff is None else f"{diff:.1e}"])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not body:
        lines = []
    missing = dict(d.get("missing") or {})
    for name in sorted(missing, key=lambda k: list(LABELS).index(k) if k in LABELS else 99):
        lines.append(f"{LABELS.get(name, name)}: {missing[name]}")
    if d.get("error"):
        lines.append(f"comparison failed: {d['error']}")
    lines += [f"note: {n}" for n in d.get("notes") or []]
    return "\n".join(lines)


def comparison_title(d: Mapping[str, Any]) -> str:
    """What the side-by-side measured, in one line."""
    n = d.get("threads")
    how = ("rounds alternating one process per runtime" if d.get("isolated")
           else "interleaved rounds")
    return (f"Side by side (model only, same input, {n} thread{'s' if n != 1 else ''}, "
            f"{d.get('rounds')} {how} x {d.get('runs_per_round')} runs; "
            "median of the round medians):")
