"""compiler/injective.py: the int8 graph's quantize kernels get one streaming loop."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from lprnet_edge.compiler.target import load_target  # noqa: E402

SHAPE = (1, 6, 10, 24)


def _quantize_module(channel_step: int):
    """``astype(clip(round(x[..., ::step] * s)), int8)``, as the int8 graph quantizes the
    input of the channel-strided max pool (step 2) or of a convolution (step 1)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            s = bb.emit(relax.op.strided_slice(x, axes=[3], begin=[0], end=[SHAPE[3]],
                                               strides=[channel_step]))
            m = bb.emit(relax.op.multiply(s, relax.const(37.5, "float32")))
            c = bb.emit(relax.op.clip(relax.op.round(m), -127, 127))
            q = bb.emit_output(relax.op.astype(c, "int8"))
        bb.emit_func_output(q)
    return bb.get()


def _task(mod, target):
    from tvm.s_tir import meta_schedule as ms

    from lprnet_edge.compiler.compile import prepare_for_tuning

    tasks = ms.relax_integration.extract_tasks(prepare_for_tuning(mod, target), target)
    assert len(tasks) == 1, [t.task_name for t in tasks]
    return tasks[0].dispatched[0]


@pytest.mark.parametrize("step", [1, 2])
def test_quantize_kernel_is_one_parallel_vectorized_loop(step):
    from lprnet_edge.compiler import injective

    target = load_target("host").tvm_target()
    sch = injective.schedule(_task(_quantize_module(step), target))
    assert sch is not None
    text = sch.mod.script()
    assert "T.parallel" in text and "T.vectorized" in text
    assert "alloc_buffer" not in text  # every intermediate inlined: one pass over memory


def test_reductions_are_left_to_other_schedules():
    from tvm import relax

    from lprnet_edge.compiler import injective

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            m = bb.emit(relax.op.multiply(x, relax.const(2.0, "float32")))
            s = bb.emit_output(relax.op.sum(m, axis=[3]))
        bb.emit_func_output(s)
    assert injective.schedule(_task(bb.get(), load_target("host").tvm_target())) is None


def test_build_uses_the_rule_and_computes_what_the_naive_loops_do(tmp_path):
    """A build covers the quantize kernel with the rule (manifest kind ``injective``), and
    its outputs equal TVM's naive loops' bit for bit."""
    import tvm
    from tvm import relax

    from lprnet_edge.compiler.compile import build, prepare_for_tuning

    host = load_target("host")
    mod = _quantize_module(2)
    info = build(mod, host, tmp_path / "rule.so", None)
    assert info["schedules"]["injective"] == 1 and not info["untuned_kernels"], info
    x = np.random.default_rng(0).normal(0, 3, SHAPE).astype(np.float32)
    with tvm.transform.PassContext(opt_level=3):
        naive = tvm.compile(prepare_for_tuning(mod, host), host.tvm_target())
    outs = []
    for ex in (tvm.runtime.load_module(str(tmp_path / "rule.so")), naive):
        vm = relax.VirtualMachine(ex, tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    assert outs[0].dtype == np.int8 and np.array_equal(outs[0], outs[1])
