"""PyTorch -> Relax: the import at batch 1 with weights lifted out as ordered named parameters.

``main(x, *params)`` takes the parameters in the returned dict's order; the artifact stores them
in ``params.npz`` and the runtime passes them after the image. BatchNorm is folded before
import (:func:`lprnet_edge.model.bn_fold.fold_batchnorm`), so the module has none left.

A compressed model (:class:`lprnet_edge.compress.api.CompressedModel`) is imported through its
``module``; a :class:`~lprnet_edge.compress.api.QuantizedModel` with ``int8_convs`` then gets
its quantized convolutions rewritten into real int8 ones (:func:`relax_int8_rewrite`: TVM 0.27
has no quantization pass of its own).

Two graph-level changes make the compiled model fast: constant channels are folded away
(:mod:`lprnet_edge.model.channel_fold`, half of the checkpoint's FLOPs), and convolutions run
in NHWC with HWIO weights (:func:`convert_layout`), transposed once here, not per call.

TVM is imported inside the functions that use it: importing it takes seconds (and
loads torch), and this module is imported by commands that never compile.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from lprnet_edge.compiler.dot import use_int8_dot
from lprnet_edge.compiler.int8 import (
    bound_value,
    cancel_transposes,
    is_op,
    precompute_params,
)
from lprnet_edge.compiler.quantize_before_pool import quantize_before_max_pool
from lprnet_edge.compiler.tvm_import import first_line, import_tvm_compiler
from lprnet_edge.compress.api import CompressedModel, QuantizedModel
from lprnet_edge.model.bn_fold import fold_batchnorm
from lprnet_edge.model.channel_fold import FoldReport, fold_all
from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError

FRONTENDS = ("torch.export", "onnx")
INPUT_NAME = "x"
INPUT_SHAPE = (1, 3, 24, 94)  # batch 1 is LPRNet's semantics (batch-wide normalisation)
ENTRY = "main"
# Convolution layouts and their weight layouts: NHWC activations with HWIO weights put the
# output channels innermost, where they vectorize (the widths of the folded model are
# multiples of 8); NCHW vectorizes along the image width (90, 44, 18...: not multiples of a
# vector).
KERNEL_LAYOUT = {"NHWC": "HWIO", "NCHW": "OIHW"}
LAYOUTS = tuple(KERNEL_LAYOUT)
DEFAULT_LAYOUT = "NHWC"


def to_relax(model: Any, frontend: str = "torch.export", fold_bn: bool = True,
             fold_channels: bool = True, on_fold: Callable[[FoldReport], None] | None = None,
             layout: str = DEFAULT_LAYOUT, int8_dot: str | None = None
             ) -> tuple[Any, dict[str, np.ndarray]]:
    """Import ``model`` at batch 1: ``(IRModule, {param name: float32 array})``.

    ``main(x, *params)`` takes the parameters in the dict's order. ``model`` is a torch
    module or a :class:`CompressedModel` (a quantized one with ``int8_convs`` compiles them
    as int8 x int8 -> int32 convolutions). ``fold_channels``: drop the filters whose output
    is constant (:mod:`lprnet_edge.model.channel_fold`; exact, about half of the
    checkpoint's FLOPs) when the model is a float LPRNet; ``on_fold`` receives what was
    folded. ``layout``: the convolutions' data layout (:func:`convert_layout`).
    ``int8_dot``: the target's integer dot-product instructions
    (:func:`lprnet_edge.compiler.dot.int8_dot`), used by the int8 convolutions.
    """
    if frontend not in FRONTENDS:
        raise LprnetEdgeError(f"frontend {frontend!r}: use one of {list(FRONTENDS)}")
    _check_layout(layout)
    if isinstance(model, QuantizedModel) and model.int8_convs:
        return int8_to_relax(model, frontend, layout, int8_dot)
    if isinstance(model, CompressedModel):
        model = model.module
    import_tvm_compiler()
    import torch
    from tvm import relax

    if not fold_bn:
        model = copy.deepcopy(model).eval()
    elif not fold_channels:
        model = fold_batchnorm(model)
    else:
        model, report = fold_all(model)
        if report is not None and on_fold is not None:
            on_fold(report)
    x = torch.zeros(INPUT_SHAPE, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if frontend == "torch.export":
                from tvm.relax.frontend.torch import from_exported_program

                with torch.no_grad():
                    ep = torch.export.export(model, (x,))
                mod = from_exported_program(ep, keep_params_as_input=True)
            else:
                mod = _onnx_import(model, x)
        except LprnetEdgeError:
            raise
        except Exception as e:  # exporter / importer errors are many types
            raise LprnetEdgeError(f"cannot import the model with frontend {frontend!r}: "
                                  f"{type(e).__name__}: {first_line(e)}") from e
    mod, detached = relax.frontend.detach_params(mod)
    names = [v.name for v in mod[ENTRY].params]
    values = list(detached.get(ENTRY, []))
    if len(names) != len(values) + 1:
        raise LprnetEdgeError(f"import produced {len(names)} inputs for {len(values)} weights")
    params = {n: v.numpy().astype(np.float32, copy=False)
              for n, v in zip(names[1:], values, strict=True)}
    return convert_layout(normalize(mod), params, layout)


def _onnx_import(model: Any, x: Any) -> Any:
    try:
        import onnx
        import torch
        from tvm.relax.frontend.onnx import from_onnx
    except ImportError as e:
        raise ToolchainError(f"--frontend onnx needs the onnx package ({e}): "
                             "pip install 'lprnet-edge[host]'") from e
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), buf, input_names=[INPUT_NAME], output_names=["logits"],
                          opset_version=17, dynamo=False, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    return from_onnx(proto, shape_dict={INPUT_NAME: list(INPUT_SHAPE)},
                     keep_params_in_input=True)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise LprnetEdgeError(f"layout {layout!r}: use one of {list(LAYOUTS)}")


def convert_layout(mod: Any, params: dict[str, np.ndarray], layout: str
                   ) -> tuple[Any, dict[str, np.ndarray]]:
    """Convolutions in ``layout`` (``ConvertLayout``); the weight transposes this adds are
    applied to ``params`` once here instead of on every call."""
    _check_layout(layout)
    if layout == "NCHW":
        return mod, params
    import_tvm_compiler()
    from tvm import relax

    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": [layout, KERNEL_LAYOUT[layout]]})(
        mod)
    mod = relax.transform.CanonicalizeBindings()(mod)
    mod = relax.transform.DeadCodeElimination([ENTRY])(mod)
    return fold_param_transposes(mod, params)


def fold_param_transposes(mod: Any, params: dict[str, np.ndarray]
                          ) -> tuple[Any, dict[str, np.ndarray]]:
    """Turn ``permute_dims(weight)`` bindings of ``main`` into transposed weight inputs."""
    tvm = import_tvm_compiler()
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    func = mod[ENTRY]
    found = _param_permutes(func, params)
    if not found:
        return mod, params
    new_params = dict(params)
    new_vars = {}
    for n, (_, axes) in found.items():
        new_params[n] = np.ascontiguousarray(params[n].transpose(axes))
        new_vars[n] = relax.Var(n, relax.TensorType(list(new_params[n].shape), "float32"))
    drop = [(found[n][0], new_vars[n]) for n in found]  # binding names may repeat

    @mutator
    class _Fold(PyExprMutator):
        def visit_var_binding_(self, binding: Any) -> None:
            new = next((v for old, v in drop if old.same_as(binding.var)), None)
            if new is not None:
                self.set_var_remap(binding.var, new)
                return
            super().visit_var_binding_(binding)

    body = _Fold().visit_expr(func.body)
    args = [new_vars.get(v.name, v) for v in func.params]
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out[ENTRY] = relax.Function(args, body, func.ret_ty, func.is_pure, func.attrs)
    return out, new_params


def _param_permutes(func: Any, params: dict[str, np.ndarray]
                    ) -> dict[str, tuple[Any, list[int]]]:
    """``{param: (binding var, axes)}`` for each weight whose only use is a
    ``permute_dims``."""
    tvm = import_tvm_compiler()
    from tvm import relax

    permute = tvm.ir.Op.get("relax.permute_dims")
    uses: dict[str, int] = {}
    found: dict[str, tuple[Any, list[int]]] = {}
    for block in func.body.blocks:
        for b in block.bindings:
            args = b.value.args if isinstance(b.value, relax.Call) else []
            for a in args:
                if isinstance(a, relax.Var) and a.name in params:
                    uses[a.name] = uses.get(a.name, 0) + 1
            if (args and b.value.op.same_as(permute) and isinstance(args[0], relax.Var)
                    and args[0].name in params and b.value.attrs.axes is not None):
                found[args[0].name] = (b.var, [int(a) for a in b.value.attrs.axes])
    return {n: f for n, f in found.items() if uses.get(n) == 1}


def normalize(mod: Any) -> Any:
    """Target-independent clean-up of an imported module (inference-only op forms)."""
    tvm = import_tvm_compiler()
    from tvm import relax

    seq = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
    ])
    return seq(mod)


# ---------------------------------------------------------------- real int8 convolutions


def int8_to_relax(qmodel: QuantizedModel, frontend: str = "torch.export",
                  layout: str = DEFAULT_LAYOUT, int8_dot: str | None = None
                  ) -> tuple[Any, dict[str, np.ndarray]]:
    """Import the fake-quant ``qmodel.module`` and make its ``int8_convs`` real int8
    convolutions; refuses an import where the rewrite did not find every one of them.
    The rewrite matches NCHW convolutions: ``layout`` is applied after it. With
    ``int8_dot`` (NHWC only) the convolutions take that dot-product form
    (:mod:`lprnet_edge.compiler.dot`). What depends on
    the weights only (their quantization, layout, packing) is computed here, once: the
    returned parameters are int8 / int32 / float arrays, not the float weights."""
    mod, params = to_relax(qmodel.module, frontend, layout="NCHW")
    mod, n = relax_int8_rewrite(mod)
    expected = len(qmodel.int8_convs)
    if n != expected:
        raise LprnetEdgeError(f"int8 rewrite matched {n} of {expected} quantized convolutions "
                              f"(frontend {frontend!r}); use the torch.export frontend")
    # The activations' 1 / scale (compress.quantize.act_codes) becomes one constant.
    mod = import_tvm_compiler().relax.transform.FoldConstant()(mod)
    mod, params = convert_layout(normalize(mod), params, layout)
    mod, _ = cancel_transposes(mod)
    mod, _ = quantize_before_max_pool(mod)
    if int8_dot is not None and layout == "NHWC":
        mod, _ = use_int8_dot(mod, int8_dot)
    return precompute_params(mod, params)


def relax_int8_rewrite(mod: Any) -> tuple[Any, int]:
    """Rewrite ``R.nn.conv2d(clip(round(a)), clip(round(b)))`` (float tensors holding int8
    codes, as exported from ``compress.quantize.QuantConv2d``) into
    ``astype(R.nn.conv2d(astype(., int8), astype(., int8), out_dtype="int32"), float32)``.

    The codes are exact integers in [-127, 127], so the casts are exact and the int32
    accumulation equals the float one (up to float32 rounding of large sums). Returns the new
    module and the number of convolutions rewritten.
    """
    tvm = import_tvm_compiler()
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    count = [0]

    @mutator
    class _Int8Conv(PyExprMutator):
        def _is_code(self, e: Any) -> bool:
            e = bound_value(self, e)
            return is_op(e, "relax.clip") and _clip_is_int8(e)

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not is_op(call, "relax.nn.conv2d"):
                return call
            data, weight = call.args
            if not (self._is_code(data) and self._is_code(weight)):
                return call
            a = call.attrs
            count[0] += 1
            conv = relax.op.nn.conv2d(
                relax.op.astype(data, "int8"), relax.op.astype(weight, "int8"),
                strides=a.strides, padding=a.padding, dilation=a.dilation, groups=a.groups,
                data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                out_layout=a.out_layout, out_dtype="int32")
            return relax.op.astype(conv, "float32")

    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out[gv] = _Int8Conv().visit_expr(func)
    return relax.transform.CanonicalizeBindings()(out), count[0]


def _clip_is_int8(call: Any) -> bool:
    try:
        lo, hi = (float(v.value) for v in call.args[1:3])
    except (AttributeError, TypeError, ValueError):
        return False
    return lo >= -128 and hi <= 127
