"""Relax -> a linked shared library: fusion passes, ``tvm.compile`` (or MetaSchedule's
``compile_relax`` with a tuning database), ``export_library`` with the target's compiler (a
cross compiler for a device). The import is :mod:`lprnet_edge.compiler.frontend`, tuning
:mod:`lprnet_edge.compiler.tuning`.

TVM is imported inside the functions that use it: importing it takes seconds (and
loads torch), and this module is imported by commands that never compile.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lprnet_edge.compiler import dot, injective, schedules, threads
from lprnet_edge.compiler.target import TargetSpec
from lprnet_edge.compiler.toolchain import Compiler
from lprnet_edge.compiler.tvm_import import import_tvm_compiler, last_line, tail
from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError

# ---------------------------------------------------------------- Relax -> module


def fusion_passes(target: Any) -> list[Any]:
    """Dispatch, legalization and fusion: exactly the front of MetaSchedule's
    ``compile_relax`` pipeline, so tuned workloads match the functions being built."""
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    try:
        dispatch = list(relax_pipeline.library_dispatch_passes(target))
    except (ValueError, AttributeError):
        dispatch = []
    return [
        *dispatch,
        relax.transform.LegalizeOps(enable_warning=False),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def prepare_for_tuning(mod: Any, target: TargetSpec | Any, opt_level: int = 3) -> Any:
    """The module MetaSchedule extracts tasks from: ``mod`` (from :func:`to_relax`) after
    ``LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR``.

    The tuner must tune this, with ``params={}`` (weights stay inputs); :func:`build` with the
    resulting database runs the same passes on the same ``mod``, so the records apply.
    """
    tvm = import_tvm_compiler()
    tgt = target.tvm_target() if isinstance(target, TargetSpec) else tvm.target.Target(target)
    with tgt, tvm.transform.PassContext(opt_level=opt_level):
        return tvm.transform.Sequential(fusion_passes(tgt))(mod)


def schedule_database(mod: Any, target: Any, database: Any = None, defaults: bool = True,
                      log: Callable[[str], None] | None = None, prepared: Any = None,
                      estimated: bool = False) -> tuple[Any, dict[str, Any]]:
    """The database a build applies: the hand-written tensorized schedule of every
    dot-product convolution (:func:`lprnet_edge.compiler.dot.schedule`), then the build's own
    ``database``, then the packaged default schedules, then traces transferred to kernels
    none of them knows (see :mod:`lprnet_edge.compiler.schedules`), then one parallel,
    vectorized loop for an element-wise kernel still left (:mod:`lprnet_edge.compiler.injective`).
    Returns ``(database or None, coverage)`` where
    coverage names the kernels of each kind (``naive``: TVM's default loops). ``prepared``:
    ``prepare_for_tuning(mod, target)`` when the caller already has it. ``estimated``: the
    database's times are the cost instrument's, like the core's packaged set, so a record
    slower than that set's gives way to it; measured times are only compared with measured
    defaults."""
    from tvm.s_tir import meta_schedule as ms

    if prepared is None:
        prepared = prepare_for_tuning(mod, target)
    tasks = ms.relax_integration.extract_tasks(prepared, target)
    import tvm_ffi

    # A workload counts only with a valid record: the tuner commits a task's workload before
    # measuring, and failed candidates are recorded too.
    own = schedules.best_records(database) if database is not None else {}
    pkg = schedules.packaged_defaults(schedules.target_cpu(target)) if defaults else None
    packaged = pkg.records if pkg else {}
    known = [*own.values(), *packaged.values()]
    if own and pkg:  # per kernel, the faster of the tuned record and a comparable default
        own = schedules.keep_faster(own, pkg.comparable_with(estimated))
    # Apply the best plausible record per workload, not the raw database's top record.
    layers = [schedules.memory_database(own.values())] if database is not None else []
    if packaged:
        layers.append(schedules.memory_database(packaged.values()))
    cover: dict[str, list[str]] = {"tensorized": [], "tuned": [], "default": [],
                                   "transferred": [], "injective": [], "naive": []}
    tensorized, fallback = ms.database.MemoryDatabase(), ms.database.MemoryDatabase()
    for t in tasks:
        func = t.dispatched[0]
        h = int(tvm_ffi.structural_hash(func))
        if (sch := dot.tensorized_schedule(func)) is not None:
            _commit(tensorized, func, sch, target)
            cover["tensorized"].append(t.task_name)
        elif h in own:
            cover["tuned"].append(t.task_name)
        elif h in packaged:
            cover["default"].append(t.task_name)
        elif (sch := schedules.transfer(func, target, known)) is not None:
            _commit(fallback, func, sch, target)
            cover["transferred"].append(t.task_name)
        elif (sch := injective.schedule(func)) is not None:
            _commit(fallback, func, sch, target)
            cover["injective"].append(t.task_name)
        else:
            cover["naive"].append(t.task_name)
    if not layers and not cover["tensorized"]:
        return None, {}  # nothing to apply (nothing known to transfer): TVM's own loops
    # The tensorized schedules are queried first, so they win over any other record.
    layers = [tensorized, *layers, fallback]
    db = ms.database.OrderedUnionDatabase(*layers)
    if log:
        log("schedules: " + ", ".join(f"{len(v)} {k}" for k, v in cover.items() if v))
    return db, cover


def _commit(database: Any, func: Any, sch: Any, target: Any) -> None:
    """Record ``sch`` (a schedule of the task module ``func``) in ``database``."""
    from tvm.s_tir import meta_schedule as ms

    wl = database.commit_workload(func)
    database.commit_tuning_record(ms.database.TuningRecord(
        trace=sch.trace, workload=wl, run_secs=[1.0], target=target,
        args_info=ms.arg_info.ArgInfo.from_prim_func(next(iter(func.functions.values())))))


def build(mod: Any, target_spec: TargetSpec, out_path: str | Path, cc: Compiler | str | None,
          database: Any = None, opt_level: int = 3,
          log: Callable[[str], None] | None = None, defaults: bool = True,
          estimated: bool = False,
          thread_config: threads.ThreadConfig | None = None) -> dict[str, Any]:
    """Compile ``mod`` for ``target_spec`` and write the shared library ``out_path``.

    ``cc`` links the objects (a :class:`Compiler`, a path, or None for TVM's default host
    compiler). ``database``: a MetaSchedule database applied with ``compile_relax``.
    ``defaults``: kernels without a record in ``database`` get the packaged default schedules
    (:func:`schedule_database`) instead of naive loops; ``estimated``: ``database`` was tuned
    against the cost instrument. ``thread_config``: which kernels keep their parallel loops
    (default: the target's cores, :mod:`lprnet_edge.compiler.threads`).
    Returns timings and what was used (``schedules``: which kernels got which schedule).
    """
    tvm = import_tvm_compiler()
    target = target_spec.tvm_target()
    out_path = Path(out_path)
    t0 = time.perf_counter()
    cover: dict[str, Any] = {}
    try:
        tuned = database is not None
        prepared = prepare_for_tuning(mod, target)  # tasks, kernel signatures, and the build
        database, cover = schedule_database(mod, target, database, defaults, log, prepared,
                                            estimated)
        plan: list[threads.KernelThreads] = []
        thread_config = thread_config or threads.ThreadConfig(target_spec.cores)
        if database is not None:
            database, plan = threads.plan_threads(database, prepared, target, thread_config)
            from tvm.s_tir.meta_schedule.relax_integration import compile_relax

            executable = compile_relax(database, mod, target, params=None)
        else:
            at_level = prepared if opt_level == 3 else prepare_for_tuning(mod, target, opt_level)
            with tvm.transform.PassContext(opt_level=opt_level):
                executable = tvm.compile(at_level, target)
    except Exception as e:  # TVM errors are TVMError / InternalError / ValueError...
        raise LprnetEdgeError(f"TVM failed to compile for {target_spec.name}: "
                              f"{type(e).__name__}: {last_line(e)}") from e
    t_compile = time.perf_counter() - t0
    if log:
        log(f"compiled for {target_spec.name} in {t_compile:.1f}s")
    t1 = time.perf_counter()
    path = cc.path if isinstance(cc, Compiler) else cc
    options = list(cc.options) if isinstance(cc, Compiler) else []
    try:
        export_library(executable, out_path, path, options)
    except Exception as e:  # the linker's stderr is in the message
        raise ToolchainError(f"linking {out_path.name} for {target_spec.name} with "
                             f"{path or 'the default compiler'} failed: {tail(e)}") from e
    return {
        "compile_s": round(t_compile, 3),
        "export_s": round(time.perf_counter() - t1, 3),
        "tuned": tuned,
        "schedules": {k: len(v) for k, v in cover.items()},
        "untuned_kernels": cover.get("naive", []),
        # kernel -> tuned | default | transferred | injective | naive: the profiler's column
        "kernel_schedules": {n: k for k, names in cover.items() for n in names},
        "kernels": kernel_signatures(prepared, executable.as_text()),
        # kernel -> its parallel loops and whether it keeps them (compiler/threads.py)
        "threads": {k.name: k.to_dict() for k in plan},
        "opt_level": opt_level,
        "compiler": path,
        "tvm_target": str(target),
    }


def kernel_signatures(prepared: Any, vm_text: str) -> dict[str, dict[str, Any]]:
    """Each kernel the compiled VM calls (``vm_text``: the executable's ``as_text()``): its
    arguments' shapes and dtypes (from the prepared module) and its calls per inference.
    The manifest keeps them so that a profile over RPC can call every kernel on the device
    (``runtime.profile.LoadedModule.profile_calls``)."""
    from tvm import tirx

    out: dict[str, dict[str, Any]] = {}
    for gv, func in prepared.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        args = []
        for p in func.params:  # TVM 0.27: tensor parameters carry their shape and dtype
            shape = getattr(p, "shape", None)
            if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape):
                break
            args.append({"shape": [int(d) for d in shape], "dtype": str(p.dtype)})
        else:
            calls = len(re.findall(rf"\bcall\s+{re.escape(gv.name_hint)}\s+in:", vm_text))
            if calls:
                out[gv.name_hint] = {"args": args, "calls": calls}
    return out


def export_library(module: Any, out_path: str | Path, cc_path: str | None,
                   options: Sequence[str] = ()) -> None:
    """Link ``module`` into the shared library ``out_path`` with ``cc_path`` (a cross
    compiler; None: TVM's default host compiler). Shared by builds and tuning candidates."""
    if not cc_path:
        module.export_library(str(out_path))
        return
    from tvm.support import cc as tvm_cc

    module.export_library(str(out_path),
                          fcompile=tvm_cc.cross_compiler(cc_path, options=list(options) or None))

