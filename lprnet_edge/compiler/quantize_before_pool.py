"""Quantize before a max pool, not after: the pool then runs on int8.

Why: each int8 convolution's input is ``astype(clip(round(x * (1 / s))), int8)``, and where ``x`` is
a max pool's output (LPRNet's three pools, one of them channel-strided) the pool computes in
float32, 4 lanes to a 128-bit vector, and quantizes its outputs after. Quantization with a
positive scale is monotonic (the scaling, round, clip are non-decreasing; the cast is exact on the
integers of [-127, 127]), so it commutes with ``max``: ``q(max(a, b)) == max(q(a), q(b))``,
bit for bit. Quantizing the pool's input and pooling the int8 codes gives the same tensor, and
the pool runs 16 lanes to a vector. A channel slice between pool and quantization moves
before both (it commutes with a per-channel pool), so only the kept channels are quantized.
A padded pool pads int8 with -128, below every code: no window is all padding.

TVM is imported inside the function: this module is imported by commands that never compile.
"""

from __future__ import annotations

from typing import Any

from lprnet_edge.compiler.int8 import bound_value, is_op, rewrite_functions
from lprnet_edge.compiler.tvm_import import import_tvm_compiler

_QUANTIZE = ("relax.astype", "relax.clip", "relax.round")
_SCALE = ("relax.multiply", "relax.divide")  # by the scale's reciprocal, or by the scale


def _positive_scalar(e: Any) -> bool:
    """A constant (``R.const``) holding one positive number."""
    data = getattr(e, "value", None)
    if data is None or not hasattr(data, "numpy"):
        return False
    v = data.numpy()
    return v.size == 1 and float(v.reshape(-1)[0]) > 0


def _ints(t: Any) -> list[int] | None:
    """The integers of a Relax tuple of ``PrimValue`` (a strided slice's axes)."""
    try:
        return [int(f.value) for f in t.fields]
    except (AttributeError, TypeError):
        return None


def quantize_before_max_pool(mod: Any) -> tuple[Any, int]:
    """Rewrite ``q(slice?(max_pool2d(x)))`` into ``max_pool2d(q(slice?(x)))``, where ``q`` is
    ``astype(clip(round(multiply(., 1 / s))), int8)`` (or a divide by ``s``) with a positive
    constant. Returns the module and the number of pools rewritten."""
    import_tvm_compiler()
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    count = [0]

    @mutator
    class _Rewrite(PyExprMutator):
        def _chain(self, call: Any) -> list[Any] | None:
            """``[astype, clip, round, multiply or divide]`` ending at ``call``, else None."""
            chain, e = [], call
            for op in _QUANTIZE:
                if not is_op(e, op):
                    return None
                chain.append(e)
                e = bound_value(self, e.args[0])
            if not any(is_op(e, op) for op in _SCALE):
                return None
            chain.append(e)
            ok = str(call.attrs.dtype) == "int8" and _positive_scalar(bound_value(self, e.args[1]))
            return chain if ok else None

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            chain = self._chain(call)
            if chain is None:
                return call
            src = bound_value(self, chain[-1].args[0])
            sliced = src if is_op(src, "relax.strided_slice") else None
            pool = bound_value(self, sliced.args[0]) if sliced is not None else src
            if not is_op(pool, "relax.nn.max_pool2d") or str(pool.attrs.layout) != "NHWC":
                return call
            if sliced is not None and _ints(sliced.args[1]) != [3]:
                return call  # only a channel slice commutes with the pool
            x = pool.args[0]
            if sliced is not None:
                x = relax.Call(sliced.op, [x, *sliced.args[1:]], sliced.attrs)
            for op in reversed(chain):
                x = relax.Call(op.op, [x, *op.args[1:]], op.attrs)
            count[0] += 1
            return relax.Call(pool.op, [x], pool.attrs)

    return rewrite_functions(mod, _Rewrite), count[0]
