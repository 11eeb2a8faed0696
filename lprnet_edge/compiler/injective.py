"""A deterministic schedule for injective kernels no record covers.

The int8 graph quantizes activations in kernels of their own (multiply, round, clip, cast;
a channel slice before it where the next layer reads fewer channels). They are not in the
fp32 model the packaged defaults were tuned on, and no tuned trace has their block
structure, so without a rule they run TVM's naive loops: one pass over memory per element-wise
op, through intermediate buffers, scalar. Inlined into one block, parallel over rows and
vectorized over channels, they are a single streaming pass.
"""

from __future__ import annotations

from typing import Any

from lprnet_edge.compiler.tvm_import import import_tvm_compiler


def schedule(task_mod: Any) -> Any:
    """The schedule of a tuning task's module (one PrimFunc) if every block in it is
    spatial (no reduction), else None."""
    tvm = import_tvm_compiler()
    from tvm import s_tir
    from tvm.s_tir.schedule import ScheduleError

    func = next(iter(task_mod.functions.values()))
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) < 2 or not all(_spatial(sch, b) for b in blocks):
        return None
    try:
        for b in blocks[:-1]:
            sch.compute_inline(b)
    except ScheduleError:
        return None
    return sch if parallel_vectorized(sch, blocks[-1]) else None


def parallel_vectorized(sch: Any, block: Any) -> bool:
    """An element-wise block as one parallel loop over all but its innermost axis, which is
    vectorized (False, and nothing changed, for a block with fewer than two loops)."""
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return False
    sch.parallel(sch.fuse(*loops[:-1]))
    sch.vectorize(loops[-1])
    return True


def _spatial(sch: Any, block: Any) -> bool:
    """Whether ``block`` only maps elements to elements: spatial axes, no init."""
    from tvm import tirx

    blk = sch.get(block)
    return blk.init is None and all(int(iv.iter_type) == tirx.IterVar.DataPar
                                    for iv in blk.iter_vars)
