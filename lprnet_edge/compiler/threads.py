"""Which kernels run on every core: decided per kernel when a build applies its schedules.

Why: a schedule's parallel loop runs on the runtime's thread pool, and each call forks to
the workers and joins them. LPRNet is small: next to convolutions of millions of
multiply-adds it has element-wise kernels and pools of a few thousand elements, whose work
split four ways is less than the fork and join cost. Such a kernel is faster on one core.
The schedules (tuned, default or transferred) were chosen at one thread or on another
machine, so the build re-decides: a kernel whose work per thread is below
:attr:`ThreadConfig.min_work_per_thread` keeps its schedule without the ``parallel``
instructions (the trace replayed without them, so loops, vectors and tiles are unchanged).

"Work" is TIR's own operation count of the kernel (``estimate_tir_flops``), or the elements
its buffers hold when that is larger (copies and layout changes count no operations); it is
a proxy, not a time: the per-kernel cycles of the cost instrument (``bench --estimate``)
show which kernels dominate at one thread, and ``docs/benchmarks-arm.md`` sets the two side
by side. Multi-core time itself needs the board (``lprnet-edge bench --host``).

TVM is imported inside the functions that use it (see ``compiler/dot.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# Below this much work per thread, a fork and join of the thread pool costs about as much as
# the split saves (the order of a thread pool's wake-up and barrier, in vector operations).
MIN_WORK_PER_THREAD = 16384.0


@dataclass(frozen=True)
class ThreadConfig:
    """``cores``: threads the runtime will run (the target's ``num-cores``);
    ``min_work_per_thread``: below it, a kernel runs on one core."""

    cores: int
    min_work_per_thread: float = MIN_WORK_PER_THREAD


@dataclass(frozen=True)
class KernelThreads:
    """One kernel's decision: the extents of its parallel loops as scheduled, its work per
    call, and whether it keeps them."""

    name: str
    extents: tuple[int, ...]
    work: float
    parallel: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "extents": list(self.extents)}


def plan_threads(database: Any, prepared: Any, target: Any,
                 cfg: ThreadConfig) -> tuple[Any, list[KernelThreads]]:
    """The decision for every kernel of ``prepared`` (``compile.prepare_for_tuning``) that
    ``database`` schedules, and the database to build with: the kernels that run on one
    core get their record without its ``parallel`` instructions, queried first."""
    from tvm.s_tir import meta_schedule as ms

    serial = ms.database.MemoryDatabase()
    plan = []
    for task in ms.relax_integration.extract_tasks(prepared, target):
        func = task.dispatched[0]
        rec = database.query_tuning_record(func, target, "main")
        if rec is None:
            continue  # TVM's own loops: no parallel loop to decide on
        kernel = decide(task.task_name, func, database.query_schedule(func, target, "main"),
                        cfg)
        plan.append(kernel)
        if kernel.extents and not kernel.parallel:
            serial.commit_tuning_record(ms.database.TuningRecord(
                # the record's own workload: its trace names that module's blocks
                trace=without_parallel(rec.trace),
                workload=serial.commit_workload(rec.workload.mod),
                run_secs=rec.run_secs, target=rec.target, args_info=rec.args_info))
    if all(k.parallel or not k.extents for k in plan):
        return database, plan
    return ms.database.OrderedUnionDatabase(serial, database), plan


def decide(name: str, func: Any, sch: Any, cfg: ThreadConfig) -> KernelThreads:
    """The decision for the task module ``func`` (one PrimFunc) scheduled as ``sch``."""
    extents = parallel_extents(sch.mod)
    work = kernel_work(func)
    split = min(cfg.cores, max(extents, default=1))
    keep = bool(extents) and cfg.cores > 1 and work / split >= cfg.min_work_per_thread
    return KernelThreads(name, tuple(extents), work, keep)


def kernel_work(func: Any) -> float:
    """TIR's operation count of a task module's PrimFunc, or the elements of its buffers
    when larger."""
    from tvm import tirx
    from tvm.s_tir.analysis import estimate_tir_flops

    prim = next(iter(func.functions.values()))
    try:
        flops = float(estimate_tir_flops(func))
    except Exception:  # noqa: BLE001 - an op TIR cannot count (tensorized intrinsics)
        flops = 0.0
    shapes = [getattr(p, "shape", None) for p in prim.params]  # TVM 0.27: tensor params
    elements = sum(math.prod(int(d) for d in s) for s in shapes
                   if s is not None and all(isinstance(d, tirx.IntImm) for d in s))
    return max(flops, float(elements))


def parallel_extents(mod: Any) -> list[int]:
    """The extents of every ``parallel`` loop in a scheduled module's PrimFuncs."""
    from tvm import tirx

    out: list[int] = []
    stack = [f.body for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    while stack:
        node = stack.pop()
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL:
            out.append(int(node.extent))
        stack.extend(_children(node))
    return out


def _children(node: Any) -> list[Any]:
    """The statements directly inside ``node`` (TVM 0.27 has no Python statement visitor)."""
    from tvm import tirx

    kids = [getattr(node, f, None) for f in ("body", "block", "init", "then_case", "else_case")]
    kids += list(getattr(node, "seq", None) or [])
    return [k for k in kids if isinstance(k, tirx.Stmt)]


def without_parallel(trace: Any) -> Any:
    """``trace`` without its ``Parallel`` instructions: the same schedule on one core."""
    from tvm.s_tir.schedule import Trace

    insts = [i for i in trace.insts if i.kind.name != "Parallel"]
    kept = set(insts)
    return Trace(insts, {i: d for i, d in trace.decisions.items() if i in kept})
