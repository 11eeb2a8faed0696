"""PyTorch -> Relax: the import at batch 1 with weights lifted out as ordered named parameters.

``main(x, *params)`` takes the parameters in the returned dict's order; the artifact stores them
in ``params.npz`` and the runtime passes them after the image. BatchNorm is folded before
import (:func:`lprnet_edge.model.fold.fold_batchnorm`), so the module has none left.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import numpy as np

from lprnet_edge.compiler.errors import first_line, import_tvm_compiler
from lprnet_edge.model.fold import fold_batchnorm
from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError

FRONTENDS = ("torch.export", "onnx")
INPUT_NAME = "x"
INPUT_SHAPE = (1, 3, 24, 94)  # batch 1 is LPRNet's semantics (batch-wide normalisation)
ENTRY = "main"


def to_relax(model: Any, frontend: str = "torch.export", fold_bn: bool = True
             ) -> tuple[Any, dict[str, np.ndarray]]:
    """Import ``model`` at batch 1: ``(IRModule, {param name: float32 array})``.

    ``main(x, *params)`` takes the parameters in the dict's order. An object with its own
    ``to_relax(frontend=...)`` (e.g. a quantized model that emits int8 Relax) is delegated to.
    """
    if frontend not in FRONTENDS:
        raise LprnetEdgeError(f"frontend {frontend!r}: use one of {list(FRONTENDS)}")
    if hasattr(model, "to_relax"):
        mod, params = model.to_relax(frontend=frontend)
        return normalize(mod), {k: np.asarray(v) for k, v in params.items()}
    import_tvm_compiler()
    import torch
    from tvm import relax

    model = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
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
    return normalize(mod), params


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


def normalize(mod: Any) -> Any:
    """Target-independent clean-up of an imported module (inference-only op forms)."""
    tvm = import_tvm_compiler()
    from tvm import relax

    seq = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
    ])
    return seq(mod)
