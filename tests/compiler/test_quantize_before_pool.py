"""quantize_before_max_pool: the int8 pool gives the float pool's quantized codes, bit for
bit, on a compiled module (real TVM build on this host)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")


def _module(scale: float, channel_slice: bool):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 9, 12, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.max_pool2d(x, (3, 3), (1, 2), layout="NHWC"))
            if channel_slice:
                y = bb.emit(relax.op.strided_slice(y, [3], [0], [12]))
            y = bb.emit(relax.op.divide(y, relax.const(scale, "float32")))
            y = bb.emit(relax.op.clip(relax.op.round(y), -127, 127))
            out = bb.emit_output(relax.op.astype(y, "int8"))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("channel_slice", [False, True])
def test_pool_on_int8_codes_equals_quantized_float_pool(channel_slice: bool):
    from lprnet_edge.compiler.quantize_before_pool import quantize_before_max_pool

    rng = np.random.default_rng(0)
    # Values on and around the rounding boundaries of the scale, and past the clip.
    x = (rng.integers(-300, 300, (1, 9, 12, 16)) * 0.05
         + rng.choice([0.0, 0.025, -0.025], (1, 9, 12, 16))).astype(np.float32)
    mod = _module(0.1, channel_slice)
    rewritten, n = quantize_before_max_pool(mod)
    assert n == 1
    assert 'R.nn.max_pool2d' in rewritten.script() and 'dtype="int8") = R.nn.max_pool2d' in \
        rewritten.script()
    np.testing.assert_array_equal(_run(rewritten, x), _run(mod, x))


def test_a_negative_scale_is_left_alone():
    """Dividing by a negative scale reverses the order: max no longer commutes."""
    from lprnet_edge.compiler.quantize_before_pool import quantize_before_max_pool

    _, n = quantize_before_max_pool(_module(-0.1, False))
    assert n == 0
