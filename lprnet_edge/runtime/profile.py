"""Load a compiled module into a Relax VM, time it, and profile it kernel by kernel.

The one loader and timer every caller uses (the host's ``bench``, RPC, the device agent,
:mod:`lprnet_edge.compiler.session`): a *session* is ``None`` (this process, ``tvm.cpu()``),
``tvm.rpc.LocalSession()`` or a remote ``tvm.rpc`` session; after that the code is the same
(upload, load, VM on the session's CPU, params sent once, ``vm.time_evaluator``).

The profiler needs the VM in this process: TVM 0.27's VM has no ``profile=True``, so it uses
``VirtualMachine.set_instrument``, whose Python callback runs around every VM call. That
cannot cross RPC (TVM refuses to send a function to the remote), which is why a board is
profiled by its agent over SSH.

Runtime side: numpy and ``tvm.runtime`` only (this file ships to the board).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.runtime.artifact import Artifact
from lprnet_edge.runtime.backends import import_tvm_runtime, load_library
from lprnet_edge.runtime.errors import ArtifactError, LprnetEdgeError
from lprnet_edge.runtime.timing import summarize

BUILTIN_PREFIX = "vm.builtin."


# ---------------------------------------------------------------- typed results


@dataclass(frozen=True)
class Timing:
    """``vm.time_evaluator`` figures: ``repeat`` samples, each the mean of ``number`` calls.

    ``runs`` is ``number * repeat`` (the timed calls); ``threads`` is the runtime's thread
    count when known here (None over RPC: the server's ``TVM_NUM_THREADS`` decides).
    """

    mean_ms: float
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    std_ms: float
    runs: int
    number: int
    repeat: int
    threads: int | None = None

    @classmethod
    def from_seconds(cls, samples_s: Sequence[float], number: int,
                     threads: int | None = None) -> Timing:
        s = summarize([v * 1e3 for v in samples_s])
        return cls(mean_ms=s["mean_ms"], median_ms=s["p50_ms"], p90_ms=s["p90_ms"],
                   p99_ms=s["p99_ms"], min_ms=s["min_ms"], std_ms=s["std_ms"],
                   runs=number * len(samples_s), number=number, repeat=len(samples_s),
                   threads=threads)

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus ``p50_ms`` and ``throughput_fps`` (the keys every latency table
        of the CLI prints)."""
        d = asdict(self)
        d["p50_ms"] = self.median_ms
        d["throughput_fps"] = 1000.0 / self.mean_ms if self.mean_ms > 0 else math.inf
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Timing:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class KernelRow:
    """One VM callee: per inference ``ms`` and ``calls``; ``share`` of the kernels' sum;
    ``gflops`` (GFLOP/s) for convolutions; ``schedule``: how the build scheduled it
    (``tuned``, ``default``, ``transferred``, ``injective``, ``naive``; None for VM builtins
    or unknown)."""

    name: str
    ms: float
    share: float
    calls: float
    gflops: float | None = None
    schedule: str | None = None
    shapes: list[list[int]] = field(default_factory=list)

    @property
    def is_builtin(self) -> bool:
        return self.name.startswith(BUILTIN_PREFIX)


@dataclass(frozen=True)
class Profile:
    """Per-kernel times of one inference (``runs`` instrumented runs averaged), next to the
    uninstrumented time of the whole call (``wall``, from ``vm.time_evaluator``)."""

    rows: list[KernelRow]
    kernels_ms: float
    wall: Timing
    runs: int
    method: str = "instrument"  # "instrument" (in process) | "rpc-calls" (see profile_calls)

    @property
    def overhead_ratio(self) -> float:
        """Sum of kernels / uninstrumented median: ~1 when the instrument costs little."""
        return self.kernels_ms / self.wall.median_ms if self.wall.median_ms > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"kernels_ms": self.kernels_ms, "wall": self.wall.to_dict(), "runs": self.runs,
                "method": self.method, "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(rows=[KernelRow(**r) for r in d["rows"]], kernels_ms=d["kernels_ms"],
                   wall=Timing.from_dict(d["wall"]), runs=d["runs"],
                   method=d.get("method", "instrument"))

    def format(self, top: int = 15) -> str:
        """A text table, slowest first: the ``top`` rows, one "other" row for the rest, and
        the kernels' sum next to the uninstrumented time."""
        head = ["kernel", "ms", "share", "calls", "GFLOP/s", "schedule"]
        body = [[r.name, f"{r.ms:.3f}", f"{r.share:6.1%}", f"{r.calls:g}",
                 "-" if r.gflops is None else f"{r.gflops:.1f}",
                 "-" if r.is_builtin else (r.schedule or "?")] for r in self.rows[:top]]
        rest = self.rows[top:]
        if rest:
            ms = sum(r.ms for r in rest)
            body.append([f"other ({len(rest)} kernels)", f"{ms:.3f}",
                         f"{ms / self.kernels_ms if self.kernels_ms else 0:6.1%}",
                         f"{sum(r.calls for r in rest):g}", "", ""])
        widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
                 for row in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        how = (f"instrumented, mean of {self.runs} runs" if self.method == "instrument" else
               f"each kernel called over RPC on arguments of its shapes: median of {self.runs} "
               "round trips minus an empty call's, times its calls per inference; VM builtins "
               "not included")
        lines.append(f"\nsum of kernels {self.kernels_ms:.2f} ms per inference ({how}); "
                     f"whole call uninstrumented {self.wall.median_ms:.2f} ms (median of "
                     f"{self.wall.repeat}); ratio {self.overhead_ratio:.2f}")
        return "\n".join(lines)


# ---------------------------------------------------------------- the one loader


def configured_threads(threads: int | None = None) -> int:
    """The thread count TVM's pool uses in this process: ``threads``, else
    ``$TVM_NUM_THREADS``, else the CPU count."""
    env = os.environ.get("TVM_NUM_THREADS", "")
    return int(threads or (env if env.isdigit() and int(env) > 0 else 0) or os.cpu_count() or 1)


def apply_threads(threads: int | None, artifact: Artifact | None = None) -> None:
    """``TVM_NUM_THREADS`` for this process's runtime: ``threads``, else the environment's,
    else the artifact's recorded count. Effective before TVM's thread pool first starts."""
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    elif "TVM_NUM_THREADS" not in os.environ and artifact is not None and artifact.num_threads:
        os.environ["TVM_NUM_THREADS"] = str(artifact.num_threads)


class LoadedModule:
    """A compiled Relax module in a VM on a session's CPU, with its weights resident there.

    ``session=None`` loads in this process (``tvm.cpu()``; what the profiler needs);
    otherwise the library is uploaded to the session (``tvm.rpc.LocalSession()`` or a remote
    one) and loaded there. Every later step is the same for all three.
    """

    def __init__(self, lib_path: str | Path, params: Sequence[np.ndarray], entry: str = "main",
                 session: Any = None) -> None:
        tvm = import_tvm_runtime()
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm
        self.entry = entry
        self.session = session
        self.lib_path = Path(lib_path)
        t0 = time.perf_counter()
        lib, self.device = load_library(self.lib_path, session)
        self.lib = lib
        self.load_s = time.perf_counter() - t0
        self.vm = VirtualMachine(lib, self.device)
        try:
            self._fn = self.vm[entry]
        except (AttributeError, RuntimeError, ValueError) as e:
            raise ArtifactError(f"{self.lib_path}: no function {entry!r} in the compiled "
                                "module") from e
        self.params = [self.tensor(p) for p in params]
        self._input_set = False

    def tensor(self, a: np.ndarray) -> Any:
        return self._tvm.runtime.tensor(np.ascontiguousarray(a), self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Run the entry function on ``x``: the first output, as numpy."""
        out = self._fn(self.tensor(np.asarray(x, np.float32)), *self.params)
        return _first(out).numpy()

    def set_input(self, x: np.ndarray) -> None:
        """Bind ``x`` and the weights for the stateful API (works over RPC whatever the
        entry returns); :meth:`time` and :meth:`profile` run what was bound last."""
        self.vm.set_input(self.entry, self.tensor(np.asarray(x, np.float32)), *self.params)
        self._input_set = True

    def output(self) -> np.ndarray:
        """The first output of the last stateful run."""
        return _first(self.vm.get_outputs(self.entry)).numpy()

    def time(self, x: np.ndarray | None = None, number: int = 1, repeat: int = 100,
             warmup: int = 10, threads: int | None = None) -> Timing:
        """``vm.time_evaluator`` on the entry: ``repeat`` samples of ``number`` calls."""
        if x is not None:
            self.set_input(x)
        if not self._input_set:
            raise LprnetEdgeError("LoadedModule.time: give an input (x) first")
        ev = self.vm.time_evaluator
        if warmup:
            ev("invoke_stateful", self.device, number=1, repeat=warmup)(self.entry)
        res = ev("invoke_stateful", self.device, number=number, repeat=repeat)(self.entry)
        return Timing.from_seconds(list(res.results), number, threads)

    def profile(self, x: np.ndarray, runs: int = 20, warmup: int = 5,
                schedules: KernelSchedules | None = None, threads: int | None = None
                ) -> Profile:
        """Per-kernel times through ``set_instrument`` (in this process only), averaged over
        ``runs`` inferences, and the uninstrumented time of the same call for comparison."""
        if self.session is not None:
            raise LprnetEdgeError("a per-kernel profile needs the module in this process "
                                  "(TVM cannot run a Python instrument over RPC)")
        wall = self.time(x, number=1, repeat=max(runs, 5), warmup=warmup, threads=threads)
        rec = _Recorder()
        self.vm.set_instrument(rec)
        try:
            for _ in range(runs):
                self.vm.invoke_stateful(self.entry)
        finally:
            self.vm.set_instrument(_no_instrument)
        return rec.profile(runs, wall, schedules)

    def profile_calls(self, x: np.ndarray, kernels: KernelTable, runs: int = 20,
                      warmup: int = 3, schedules: KernelSchedules | None = None) -> Profile:
        """Per-kernel times where no instrument can run (a module on an RPC session): each
        kernel the build recorded (:func:`kernel_table`) is called from here on arguments of
        its shapes, and its time is the median round trip minus that of an empty remote
        call. Less exact than :meth:`profile` (a few microseconds of argument passing stay
        in), but it needs nothing on the device beyond the TVM runtime."""
        wall = self.time(x, number=1, repeat=max(runs, 5), warmup=warmup)
        empty = self.session.get_function("runtime.RuntimeEnabled")
        base = _median_call(lambda: empty("cpu"), runs)
        rng = np.random.default_rng(0)
        timed: list[tuple[str, float, float, list[list[int]]]] = []
        for name, (args, calls) in kernels.items():
            try:
                fn = self.lib.get_function(name, query_imports=True)
            except (AttributeError, RuntimeError, ValueError) as e:
                raise ArtifactError(f"kernel {name!r} of the manifest is not in "
                                    f"{self.lib_path.name}: rebuild the artifact") from e
            tensors = [self._tvm.runtime.tensor(_random(shape, dtype, rng), self.device)
                       for shape, dtype in args]
            fn(*tensors)
            ms = max(_median_call(lambda f=fn, t=tensors: f(*t), runs) - base, 0.0) * 1e3
            timed.append((name, ms * calls, calls, [list(sh) for sh, _ in args]))
        total = sum(t[1] for t in timed)
        rows = [KernelRow(name=n, ms=ms, share=ms / total if total > 0 else 0.0, calls=c,
                          gflops=_gflops(n, shapes, c, ms), shapes=shapes,
                          schedule=schedules.of(n) if schedules else None)
                for n, ms, c, shapes in sorted(timed, key=lambda t: -t[1])]
        return Profile(rows=rows, kernels_ms=total, wall=wall, runs=runs, method="rpc-calls")


# kernel -> ([(shape, dtype) per argument], calls per inference), from the build's record.
KernelTable = dict[str, tuple[list[tuple[tuple[int, ...], str]], float]]
_KERNEL_DTYPES = ("float32", "float64", "float16", "int8", "uint8", "int32", "int64")


def kernel_table(records: dict[str, Any]) -> KernelTable:
    """The build's ``reports.compile.kernels``, checked (it sizes remote allocations)."""
    raw = ((records.get("reports") or {}).get("compile") or {}).get("kernels")
    if not isinstance(raw, dict) or not raw:
        raise ArtifactError("the manifest records no kernel signatures (reports.compile."
                            "kernels): rebuild the artifact with this version to profile it "
                            "over RPC, or profile on the board: bench --host USER@HOST")
    out: KernelTable = {}
    for name, k in raw.items():
        try:
            args = [(tuple(int(d) for d in a["shape"]), str(a["dtype"])) for a in k["args"]]
            calls = float(k["calls"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"manifest: reports.compile.kernels[{name!r}] is malformed: "
                                "rebuild the artifact") from e
        if (not isinstance(name, str) or any(dt not in _KERNEL_DTYPES for _, dt in args)
                or any(d < 0 or d > 1 << 24 for sh, _ in args for d in sh)
                or not 0 < calls <= 1000):
            raise ArtifactError(f"manifest: reports.compile.kernels[{name!r}] is out of range: "
                                "rebuild the artifact")
        out[name] = (args, calls)
    return out


def _random(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Values in a kernel's safe range (positive: divisors; small: int8), rank kept
    (0-d scalars too, which ``np.ascontiguousarray`` would make 1-d)."""
    a = (rng.integers(1, 8, size=shape) if dtype.startswith(("int", "uint"))
         else rng.uniform(0.5, 1.0, size=shape))
    return np.asarray(a, dtype=dtype).reshape(shape)


def _median_call(fn: Any, runs: int) -> float:
    samples = []
    for _ in range(max(runs, 3)):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def _gflops(name: str, shapes: list[list[int]], calls: float, ms: float) -> float | None:
    flops = conv_flops(name, shapes)
    return flops * calls / (ms * 1e-3) / 1e9 if flops and ms > 0 else None


def _no_instrument(*_args: Any) -> int:
    return 0


def _first(out: Any) -> Any:
    return out if hasattr(out, "numpy") else out[0]


# ---------------------------------------------------------------- the instrument


class _Recorder:
    """The VM instrument: ``fn(func, name, before_run, ret, *args)`` around every call.

    Returns 0 ("go on") as the VM expects. Shapes are read once per callee (first call)."""

    def __init__(self) -> None:
        self.total_s: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.shapes: dict[str, list[list[int]]] = {}
        self._t0: dict[str, float] = {}

    def __call__(self, _func: Any, name: Any, before_run: bool, _ret: Any, *args: Any) -> int:
        name = str(name)
        if before_run:
            if name not in self.shapes:
                self.shapes[name] = [[int(d) for d in a.shape] for a in args
                                     if hasattr(a, "shape") and hasattr(a, "dtype")]
            self._t0[name] = time.perf_counter()
        else:
            self.total_s[name] += time.perf_counter() - self._t0.pop(name, time.perf_counter())
            self.calls[name] += 1
        return 0

    def profile(self, runs: int, wall: Timing, schedules: KernelSchedules | None) -> Profile:
        total_ms = sum(self.total_s.values()) * 1e3 / runs
        rows = []
        for name, s in self.total_s.most_common():
            ms = s * 1e3 / runs
            flops = conv_flops(name, self.shapes.get(name, []))
            calls = self.calls[name] / runs
            rows.append(KernelRow(
                name=name, ms=ms, share=ms / total_ms if total_ms > 0 else 0.0, calls=calls,
                gflops=(flops * calls / (ms * 1e-3) / 1e9) if flops and ms > 0 else None,
                schedule=None if name.startswith(BUILTIN_PREFIX) or schedules is None
                else schedules.of(name),
                shapes=self.shapes.get(name, [])))
        return Profile(rows=rows, kernels_ms=total_ms, wall=wall, runs=runs)


DOT_KINDS = ("vnni", "sdot", "neon", "avx2")  # compiler.dot.KINDS (not imported: layering)


def conv_flops(name: str, shapes: list[list[int]]) -> float | None:
    """FLOPs of one call of a convolution kernel from its argument shapes (data, weight, ...,
    output last): output elements x 2 x Cin/groups x kh x kw. Weights in OIHW (NCHW), HWIO
    (NHWC), OIHW{i}i{o}o (NCHWc) or the dot-product packing of ``compiler.dot`` (kernels
    named ``<kind>_conv2d``): ``(O/L, kh, kw, I/4, G, L, 4/G)``; None when the shapes say
    otherwise."""
    # Fused prologues can put scalars first (the global-context mean): data and weight are
    # the first two tensors of rank 4 or more.
    tensors = [sh for sh in shapes[:-1] if len(sh) >= 4]
    if "conv" not in name or len(tensors) < 2:
        return None
    w, out = tensors[1], shapes[-1]
    n_out = math.prod(out)
    if len(w) == 7 and any(f"{k}_conv2d" in name for k in DOT_KINDS):
        per_out = w[1] * w[2] * w[3] * w[4] * w[6]
    elif len(w) == 6:  # OIHWio: (O/oc, I/ic, kh, kw, ic, oc)
        per_out = w[1] * w[2] * w[3] * w[4]
    elif len(w) == 4 and len(out) == 4 and w[0] == out[1]:  # OIHW, out NCHW
        per_out = w[1] * w[2] * w[3]
    elif len(w) == 4 and len(out) == 4 and w[3] == out[3]:  # HWIO, out NHWC
        per_out = w[0] * w[1] * w[2]
    else:
        return None
    return 2.0 * n_out * per_out


# ---------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class KernelSchedules:
    """How the build scheduled each kernel (``tuned``, ``default``, ``transferred``,
    ``injective``, ``naive``); kernels a report does not name get ``fallback`` (None: unknown)."""

    names: dict[str, str]
    fallback: str | None = "naive"

    def of(self, kernel: str) -> str | None:
        return self.names.get(kernel, self.fallback)

    @classmethod
    def from_records(cls, records: dict[str, Any]) -> KernelSchedules:
        """From the manifest's reports: ``reports.compile.kernel_schedules`` (every kernel the
        build scheduled), else the tuning summary's per-task records; an untuned build that
        says neither ran TVM's naive loops throughout. Otherwise: unknown."""
        reports = records.get("reports") or {}
        comp = reports.get("compile") or {}
        if isinstance(comp.get("kernel_schedules"), dict):
            return cls(dict(comp["kernel_schedules"]))
        per_task = (reports.get("tune") or {}).get("per_task")
        if isinstance(per_task, list):
            return cls({t["task"]: "tuned" if t.get("records") else "naive"
                        for t in per_task if isinstance(t, dict) and "task" in t})
        if comp.get("tuned") is False and "schedules" not in comp:
            return cls({})
        return cls({}, None)


@dataclass
class ModuleInputs:
    """What timing an artifact's module needs: its library, weights, entry and an input."""

    artifact: Artifact
    params: list[np.ndarray]
    x: np.ndarray

    @property
    def lib_path(self) -> Path:
        return self.artifact.lib_path

    @property
    def entry(self) -> str:
        return self.artifact.entry

    @property
    def schedules(self) -> KernelSchedules:
        return KernelSchedules.from_records(self.artifact.manifest.records)

    @property
    def kernels(self) -> KernelTable:
        return kernel_table(self.artifact.manifest.records)


def module_inputs(artifact: str | Path | Artifact, check_arch: bool = False) -> ModuleInputs:
    """Open (and verify) a TVM artifact; its input is the Recognizer's synthetic plate,
    preprocessed, so every timing path times the same tensor."""
    from lprnet_edge.runtime.recognizer import _synthetic_plate

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact,
                                                                        check_arch=check_arch)
    pre = art.manifest.preprocess
    x = np.ascontiguousarray(pre(_synthetic_plate(pre)), dtype=np.float32)
    return ModuleInputs(art, art.params(), x)


def profile_artifact(artifact: str | Path | Artifact, runs: int = 20, warmup: int = 5,
                     threads: int | None = None) -> Profile:
    """Profile an artifact's module in this process (what ``agent bench --profile`` runs on
    a board). ``threads`` must be set before TVM's pool starts: the caller's job (the agent
    sets ``TVM_NUM_THREADS`` first)."""
    inp = module_inputs(artifact, check_arch=True)
    apply_threads(threads, inp.artifact)
    mod = LoadedModule(inp.lib_path, inp.params, inp.entry)
    return mod.profile(inp.x, runs=runs, warmup=warmup, schedules=inp.schedules,
                       threads=configured_threads(threads))
