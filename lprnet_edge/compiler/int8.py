"""Relax passes for the real int8 convolutions, after :func:`frontend.relax_int8_rewrite`.

Why the epilogue ends with its rescale (a tuned int8 build must pass verification): TVM's
LLVM backend builds every module with ``TargetOptions.AllowFPOpFusion = FPOpFusion::Fast`` (no
target attribute turns it off), so once a schedule inlines an epilogue ``float(acc) * scale +
bias`` into one expression, LLVM contracts it into one FMA with a single rounding, where
PyTorch rounds twice: the last bit of rare outputs differs, and after ``round(y /
next_scale)`` an int8 code off by one can move a logit past the verification tolerance. The
reference (``compress.quantize.QuantConv2d``) therefore adds the bias in the accumulator's
units first, ``(acc + bias / scale) * scale``: an add and one multiply, each rounded once
like PyTorch's, nothing for LLVM to contract, and no float64 detour (2 lanes per NEON
vector).

TVM is imported inside the functions that use it: importing it takes seconds (and
loads torch), and this module is imported by commands that never compile.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lprnet_edge.compiler.tvm_import import import_tvm_compiler


def is_op(e: Any, name: str) -> bool:
    import tvm
    from tvm import relax

    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name


def bound_value(mutator: Any, e: Any) -> Any:
    """The expression bound to ``e`` when it is a variable ``mutator`` (a Relax
    ``PyExprMutator``) has seen bound, else ``e``: how a pass looks through the dataflow
    block's bindings at the call that produced an argument."""
    from tvm import relax

    b = mutator.lookup_binding(e) if isinstance(e, relax.Var) else None
    return e if b is None else b


def _dtype(e: Any) -> str | None:
    """The element type of a Relax tensor expression (None if not a tensor)."""
    dtype = getattr(getattr(e, "ty", None), "dtype", None)
    return None if dtype is None else str(dtype)


def is_int8_conv(e: Any) -> bool:
    """``R.nn.conv2d(int8, int8, out_dtype="int32")``, the rewrite's integer convolution."""
    if not is_op(e, "relax.nn.conv2d") or str(e.attrs.out_dtype) != "int32":
        return False
    return all(_dtype(a) == "int8" for a in e.args)


def precompute_params(mod: Any, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Compute everything of ``main`` that depends on the weights only, once, here.

    The int8 graph quantizes its float weights (divide, round, clip, cast), lays them out
    and, in the VNNI form, packs them and sums them: per inference that is several passes
    over every weight. ``LiftTransformParams`` moves those computations into a function of
    the weights alone, which is compiled for this host and run once; ``main`` then takes
    its results (int8, int32 or float arrays) as its parameters, stored as they are.
    """
    tvm = import_tvm_compiler()
    from tvm import relax

    lifted = relax.transform.LiftTransformParams()(mod)
    name = "main_transform_params"
    if name not in [gv.name_hint for gv in lifted.functions.keys()]:
        return mod, params
    only = relax.transform.DeadCodeElimination([name])(lifted)
    only = tvm.IRModule({gv: f for gv, f in only.functions_items() if gv.name_hint != "main"})
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(only, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    old = [v.name for v in mod["main"].params[1:]]
    results = vm[name]([tvm.runtime.tensor(np.ascontiguousarray(params[n])) for n in old])
    main = lifted["main"]
    new_params: dict[str, Any] = {}
    new_vars = [main.params[0]]
    for i, (var, value) in enumerate(zip(main.params[1:], results, strict=True)):
        key = var.name if var.name in params else f"t{i}_{var.name}"
        new_params[key] = value.numpy()
        new_vars.append(relax.Var(key, var.ty))
    body = _rename_vars(main.body, dict(zip(main.params, new_vars, strict=True)))
    out = tvm.IRModule({gv: f for gv, f in lifted.functions_items() if gv.name_hint != name},
                       attrs=lifted.attrs)
    out["main"] = relax.Function(new_vars, body, main.ret_ty, main.is_pure, main.attrs)
    return relax.transform.DeadCodeElimination(["main"])(out), new_params


def _rename_vars(expr: Any, mapping: dict[Any, Any]) -> Any:
    """``expr`` with the variables of ``mapping`` replaced."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Rename(PyExprMutator):
        def visit_var_(self, var: Any) -> Any:
            return next((new for old, new in mapping.items() if old.same_as(var)), var)

    return _Rename().visit_expr(expr)


_ELEMENTWISE = ("relax.clip", "relax.astype", "relax.round")


def cancel_transposes(mod: Any) -> tuple[Any, int]:
    """Rewrite ``permute_dims(f(permute_dims(x, a)), b)`` into ``f(x)`` when ``b`` undoes
    ``a`` and ``f`` is a chain of element-wise ops (clip, astype, round).

    ``ConvertLayout`` does not know ``clip``, so each int8 convolution's input quantization
    is wrapped in an NHWC -> NCHW -> NHWC round trip: two transposes per layer, a large share of
    the int8 model's time without this pass. Returns the module and the number removed."""
    import_tvm_compiler()
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    count = [0]

    def axes(e: Any) -> list[int] | None:
        a = e.attrs.axes
        return None if a is None else [int(v) for v in a]

    @mutator
    class _Cancel(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not is_op(call, "relax.permute_dims") or axes(call) is None:
                return call
            chain, e = [], bound_value(self, call.args[0])
            while any(is_op(e, op) for op in _ELEMENTWISE):
                chain.append(e)
                e = bound_value(self, e.args[0])
            if not chain or not is_op(e, "relax.permute_dims") or axes(e) is None:
                return call
            outer, inner = axes(call), axes(e)
            if [inner[i] for i in outer] != list(range(len(outer))):
                return call
            count[0] += 1
            out = e.args[0]
            for op in reversed(chain):
                out = relax.Call(op.op, [out, *op.args[1:]], op.attrs)
            return out

    return rewrite_functions(mod, _Cancel), count[0]


def rewrite_functions(mod: Any, mutator_cls: Any) -> Any:
    """``mod`` with every Relax function rewritten by a fresh ``mutator_cls()``, then the
    bindings it left unused removed."""
    tvm = import_tvm_compiler()
    from tvm import relax

    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = mutator_cls().visit_expr(func)
    seq = tvm.transform.Sequential([relax.transform.CanonicalizeBindings(),
                                    relax.transform.DeadCodeElimination()])
    return seq(out)
