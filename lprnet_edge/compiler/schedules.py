"""Default schedules: what a build applies to kernels that have no tuning record of its own.

An untuned TVM build compiles every fused kernel as naive loops (one thread, no vectors):
LPRNet then runs several times slower than PyTorch. Three layers, first match wins, per kernel:

1. the build's own tuning database (``--tune`` / ``--tuning-db``), measured for this target;
2. the packaged database ``lprnet_edge/compiler/data/default_schedules/``: the best
   MetaSchedule trace per LPRNet fp32 workload, tuned on an x86 host and made by
   ``python benchmarks/make_default_schedules.py`` (:func:`export_defaults`). A board's core
   has its own set where one is packaged (``default_schedules/<mcpu>/``, e.g. ``cortex-a72``,
   tuned against the cost instrument's estimate for that core); otherwise the x86 set
   replays there: records are keyed by workload, not target, and a trace is a sequence of
   loop transformations (tiling, vectorize, parallel, unroll) that LLVM maps to NEON too;
3. for a kernel no database knows (pruned widths, other input sizes), :func:`transfer` replays
   the trace of the most similar known kernel (same compute, other shapes) with its tile sizes
   re-fitted to the new loop extents, then MetaSchedule's post-processors for the target.

Everything here runs in the build process; nothing is measured.

TVM is imported inside the functions that use it: importing it takes seconds (and
loads torch), and this module is imported by commands that never compile.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULTS_DIR = Path(__file__).resolve().parent / "data" / "default_schedules"
DB_FILES = ("database_workload.json", "database_tuning_record.json")
FAILED_SECS = 1e9
# A core without a set of its own (or with one that lacks a workload) takes the set of a core
# with the same vector unit before the x86 set: both A76 and A72 run 128-bit NEON.
RELATED_CPUS = {"cortex-a76": ("cortex-a72",), "neoverse-n1": ("cortex-a72",)}


def target_cpu(target: Any) -> str | None:
    """The ``-mcpu`` of a TVM target (or a CPU name given as such), which names its defaults."""
    if target is None or isinstance(target, str):
        return target
    mcpu = target.attrs.get("mcpu") if hasattr(target, "attrs") else None
    return str(mcpu) if mcpu else None


def defaults_dir(cpu: str | None = None) -> Path:
    """Where the packaged defaults tuned for ``cpu`` are (or would be) kept; the x86 set's
    folder when ``cpu`` is None."""
    return DEFAULTS_DIR / cpu if cpu else DEFAULTS_DIR


def has_defaults(path: Path | None = None) -> bool:
    path = DEFAULTS_DIR if path is None else path
    return all((path / f).is_file() and (path / f).stat().st_size > 0 for f in DB_FILES)


def mean_run_secs(run_secs: Any) -> float | None:
    """A record's mean run time in seconds, None for a failed candidate (1e10 s)."""
    if run_secs is None:
        return None
    vals = [float(getattr(v, "value", v)) for v in run_secs]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    return None if m >= FAILED_SECS else m


def _json_db(path: Path) -> Any:
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(path_workload=str(path / DB_FILES[0]),
                                    path_tuning_record=str(path / DB_FILES[1]),
                                    allow_missing=True)


def plausible(rec: Any, secs: float) -> bool:
    """False for a record slower than any sane schedule of its kernel: at least 1 ms and
    below 0.1 GFLOP/s. A cheap reduction (the global-context means) measured a few times can
    keep a best far slower than its naive loops, which a build must not apply."""
    if secs <= 1e-3:
        return True
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        flops = float(estimate_tir_flops(rec.workload.mod))
    except Exception:  # noqa: BLE001
        return True
    return secs <= flops / 1e8


def best_records(db: Any) -> dict[int, Any]:
    """structural hash of the workload -> its fastest valid, plausible record."""
    import tvm_ffi

    best: dict[int, tuple[float, Any]] = {}
    for rec in db.get_all_tuning_records():
        secs = mean_run_secs(rec.run_secs)
        if secs is None or not plausible(rec, secs):
            continue
        h = int(tvm_ffi.structural_hash(rec.workload.mod))
        if h not in best or secs < best[h][0]:
            best[h] = (secs, rec)
    return {h: r for h, (_s, r) in best.items()}


def export_defaults(src_dirs: Iterable[str | Path], out_dir: str | Path | None = None
                    ) -> dict[str, Any]:
    """Write the fastest record per workload of the tuning databases ``src_dirs`` (merged,
    the existing defaults included) to ``out_dir``: the packaged default schedules."""

    out_dir = Path(out_dir) if out_dir is not None else DEFAULTS_DIR
    merged: dict[int, Any] = {}
    sources = [Path(d) for d in src_dirs] + ([out_dir] if has_defaults(out_dir) else [])
    for d in sources:
        for h, rec in best_records(_json_db(d)).items():
            old = merged.get(h)
            if old is None or mean_run_secs(rec.run_secs) < mean_run_secs(old.run_secs):  # type: ignore[operator]
                merged[h] = rec
    write_records(merged.values(), out_dir)
    return {"records": len(merged), "dir": str(out_dir),
            "sources": [str(d) for d in sources]}


def write_records(records: Iterable[Any], out_dir: str | Path) -> None:
    """Replace the set in ``out_dir`` by ``records`` (written aside, then moved in)."""
    from tvm.s_tir import meta_schedule as ms

    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".defaults-", dir=out_dir.parent
                                if out_dir.parent.is_dir() else None))
    dst = _json_db(tmp)
    for rec in records:
        wl = dst.commit_workload(rec.workload.mod)
        dst.commit_tuning_record(ms.database.TuningRecord(
            trace=rec.trace, workload=wl, run_secs=rec.run_secs, target=rec.target,
            args_info=rec.args_info))
    del dst
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in DB_FILES:
        shutil.move(str(tmp / f), str(out_dir / f))
    shutil.rmtree(tmp, ignore_errors=True)


def set_records(path: Path) -> dict[int, Any]:
    """The best record per workload of the set in ``path`` (empty: none there)."""
    return best_records(_json_db(path)) if has_defaults(path) else {}


@dataclass(frozen=True)
class PackagedDefaults:
    """The packaged records a build for one core applies, and the ones whose run times may be
    compared with a build's own.

    ``records``: per workload, the core's own set, else a related core's
    (:data:`RELATED_CPUS`), else the x86 set. ``measured``: the x86 set alone, whose run
    times were measured on a host; a core's set holds estimates, which must not decide
    against records measured on a board. ``core``: the core's own set alone: a related
    core's estimates are of another pipeline at another clock."""

    records: dict[int, Any]
    measured: dict[int, Any]
    core: dict[int, Any]

    def comparable_with(self, estimated: bool) -> dict[int, Any]:
        """The records whose run times a database's may be compared with: the core's own
        estimates when that database was tuned against the same estimate, else the measured
        ones."""
        return self.core if estimated else self.measured


def packaged_defaults(cpu: str | None = None) -> PackagedDefaults:
    """The packaged default records for ``cpu`` (empty: none packaged)."""
    measured = best_records(_json_db(DEFAULTS_DIR)) if has_defaults() else {}
    records = dict(measured)
    for related in reversed(RELATED_CPUS.get(cpu or "", ())):
        records.update(_core_set(related))
    core = _core_set(cpu) if cpu else {}
    records.update(core)
    return PackagedDefaults(records, measured, core)


def _core_set(cpu: str) -> dict[int, Any]:
    """The best record per workload of ``cpu``'s own packaged set (empty: none)."""
    return set_records(defaults_dir(cpu))


def default_records(cpu: str | None = None) -> dict[int, Any]:
    """structural hash of the workload -> the packaged default record a build for ``cpu``
    applies (see :class:`PackagedDefaults`; empty: none packaged)."""
    return packaged_defaults(cpu).records


def comparable(a: Any, b: Any) -> bool:
    """Whether run times recorded for the targets ``a`` and ``b`` (``tvm.target.Target``)
    measure the same kind of machine: same target kind and triple, and without a triple
    (records measured on the host), CPUs that both run on this machine's architecture."""
    ta, tb = dict(a.export()), dict(b.export())
    if str(ta.get("kind")) != str(tb.get("kind")) or ta.get("mtriple") != tb.get("mtriple"):
        return False
    if ta.get("mtriple"):
        return True
    from tvm.target import codegen

    triple = str(codegen.llvm_get_system_triple())
    return all(not isinstance(t.get("mcpu"), str) or codegen.llvm_is_valid_cpu(t["mcpu"], triple)
               for t in (ta, tb))


def keep_faster(own: dict[int, Any], packaged: dict[int, Any]) -> dict[int, Any]:
    """``own`` without the records that are slower than the packaged default of the same
    workload measured on a comparable target: a small tuning budget must not replace a
    better default schedule."""
    out = {}
    for h, rec in own.items():
        ref = packaged.get(h)
        if (ref is not None and comparable(rec.target, ref.target)
                and mean_run_secs(ref.run_secs) < mean_run_secs(rec.run_secs)):  # type: ignore[operator]
            continue
        out[h] = rec
    return out


def memory_database(records: Iterable[Any]) -> Any:
    """An in-memory database holding only ``records`` (one per workload)."""
    from tvm.s_tir import meta_schedule as ms

    mem = ms.database.MemoryDatabase()
    for rec in records:
        wl = mem.commit_workload(rec.workload.mod)
        mem.commit_tuning_record(ms.database.TuningRecord(
            trace=rec.trace, workload=wl, run_secs=rec.run_secs, target=rec.target,
            args_info=rec.args_info))
    return mem


# ---------------------------------------------------------------- trace transfer


def _fit_tiles(extent: int, old: list[int]) -> list[int]:
    """Tile factors for ``extent`` shaped like ``old`` (same length, product = extent):
    keep the innermost factors while they divide what is left, else the largest divisor
    below them (a power of two for the innermost one: it is the vector width, and 14 lanes
    vectorize worse than 8), and put the rest in the outermost tile."""
    n = len(old)
    out = [1] * n
    left = extent
    for k in range(n - 1, 0, -1):
        f = int(old[k])
        if k == n - 1 and left % f:
            f = 1 << (f.bit_length() - 1) if f > 0 else 1
            while f > 1 and left % f:
                f //= 2
        while f > 1 and left % f:
            f -= 1
        out[k] = max(f, 1)
        left //= out[k]
    out[0] = left
    return out


def _decision_provider(sch: Any, changed: list[int] | None = None) -> Callable[..., Any]:
    """Replays a trace's decisions on ``sch``, re-fitting tile sizes to its loop extents;
    ``changed`` counts the tile decisions that had to change (how far the trace is from
    this kernel)."""
    def provide(inst: Any, inputs: list[Any], attrs: list[Any], decision: Any) -> Any:
        name = inst.kind.name
        if name == "SamplePerfectTile" and decision is not None:
            extent = sch.get(inputs[0]).extent
            try:
                extent = int(extent)
            except TypeError:
                return decision
            old = [int(d) for d in decision]
            fitted = _fit_tiles(extent, old)
            if changed is not None and fitted != old:
                changed[0] += 1
            return fitted
        if name == "SampleComputeLocation":
            return -1 if decision is not None else decision  # inline-safe: compute at root
        return decision

    return provide


def _signature(func: Any) -> tuple:
    """What a trace needs to replay: the blocks' names, in order, and loop-nest depths."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
    return tuple((sch.get(b).name_hint, len(sch.get_loops(b))) for b in blocks)


def _has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def transfer(func: Any, target: Any, known: list[Any]) -> Any:
    """A scheduled ``func`` (an IRModule with one PrimFunc) from the trace of a record in
    ``known`` whose workload has the same block structure, or None."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    sig = _signature(func)
    if not sig:
        return None
    candidates = [r for r in known if _signature(r.workload.mod) == sig]
    best: tuple[int, Any] | None = None
    for rec in candidates:  # the trace that needs the fewest re-fitted tiles wins
        changed = [0]
        sch = s_tir.Schedule(func, debug_mask="all")
        try:
            rec.trace.apply_to_schedule(sch, remove_postproc=True,
                                        decision_provider=_decision_provider(sch, changed))
            # MetaSchedule's LLVM post-processors (parallel/vectorize/unroll annotations
            # become loops; reduction blocks are split), without a TuneContext: creating
            # one imports tvm.s_tir.tensor_intrin, minutes of TVMScript when torch is loaded.
            for post in ms.postproc.Postproc.create("llvm"):
                if not post.apply(sch):
                    raise ValueError(f"postproc {type(post).__name__} rejects the trace")
        except Exception:  # noqa: BLE001 - try the next candidate
            continue
        if best is None or changed[0] < best[0]:
            best = (changed[0], sch)
        if changed[0] == 0:
            break
    return best[1] if best else None
