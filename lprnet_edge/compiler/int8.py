"""Relax passes for the real int8 convolutions, after :func:`frontend.relax_int8_rewrite`.

Why :func:`exact_rescale` exists (issue 11, "int8 --tune fails verification"): PyTorch's
fake-quant reference (``compress.quantize.QuantConv2d``) computes ``y = acc * scale`` and then
``y + bias`` as two float32 operations, each rounded. TVM's LLVM backend builds every module
with ``TargetOptions.AllowFPOpFusion = FPOpFusion::Fast`` (no target attribute turns it off), so
once a MetaSchedule schedule inlines the elementwise epilogue into one expression
``float(acc) * scale + bias``, LLVM contracts it into one FMA with a single rounding. The
untuned build keeps each block in its own loop with a store in between, so it has no FMA and
matched. The FMA differs from PyTorch in the last bit about 25 times per million outputs; after
``round(y / next_scale)`` a few of those become int8 codes off by one, and one such code in
image 652 of calib/ moved a logit by 0.63. The int32 accumulation itself was exact.

The fix computes the rescale as ``float32(float64(acc) * float64(scale))``: for ``|acc| < 2**24``
the float64 product is exact, so its one rounding to float32 equals PyTorch's float32 multiply
bit for bit, and the add that follows takes an ``fptrunc``, not an ``fmul``: there is nothing
for LLVM to contract, whatever the schedule. The extra float64 work is one multiply per conv
output, negligible next to the convolution.
"""

from __future__ import annotations

from typing import Any

from lprnet_edge.compiler.errors import import_tvm_compiler


def _is_op(e: Any, name: str) -> bool:
    import tvm
    from tvm import relax

    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name


def _dtype(e: Any) -> str | None:
    """The element type of a Relax tensor expression (None if not a tensor)."""
    dtype = getattr(getattr(e, "ty", None), "dtype", None)
    return None if dtype is None else str(dtype)


def _is_int8_conv(e: Any) -> bool:
    """``R.nn.conv2d(int8, int8, out_dtype="int32")``, the rewrite's integer convolution."""
    if not _is_op(e, "relax.nn.conv2d") or str(e.attrs.out_dtype) != "int32":
        return False
    return all(_dtype(a) == "int8" for a in e.args)


def exact_rescale(mod: Any) -> tuple[Any, int]:
    """Rewrite ``multiply(astype(int8_conv, float32), scale)`` (either operand order) into
    ``astype(multiply(astype(int8_conv, float64), astype(scale, float64)), float32)``: the
    same float32 values as PyTorch, immune to FMA contraction (see the module docstring).
    Returns the new module and the number of multiplies rewritten."""
    tvm = import_tvm_compiler()
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    count = [0]

    @mutator
    class _ExactRescale(PyExprMutator):
        def _value(self, e: Any) -> Any:
            if isinstance(e, relax.Var):
                b = self.lookup_binding(e)
                if b is not None:
                    return b
            return e

        def _int8_acc(self, e: Any) -> Any:
            """The int32 conv behind ``astype(conv, float32)``, else None."""
            v = self._value(e)
            if not (_is_op(v, "relax.astype") and str(v.attrs.dtype) == "float32"):
                return None
            conv = v.args[0]
            return conv if _is_int8_conv(self._value(conv)) else None

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not _is_op(call, "relax.multiply"):
                return call
            a, b = call.args
            acc, scale = self._int8_acc(a), b
            if acc is None:
                acc, scale = self._int8_acc(b), a
            if acc is None or _dtype(scale) != "float32":
                return call
            count[0] += 1
            prod = relax.op.multiply(relax.op.astype(acc, "float64"),
                                     relax.op.astype(scale, "float64"))
            return relax.op.astype(prod, "float32")

    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = _ExactRescale().visit_expr(func)
    # the old float32 astype is left unused: drop it, or it would stay a kernel of its own
    seq = tvm.transform.Sequential([relax.transform.CanonicalizeBindings(),
                                    relax.transform.DeadCodeElimination()])
    return seq(out), count[0]
