"""Every TVM *compiler* call of lprnet-edge (MetaSchedule tuning aside: ``tune.py``).

Flow: PyTorch model -> :func:`to_relax` (batch 1, weights lifted out as ordered named
parameters) -> optional tuning on :func:`prepare_for_tuning` -> :func:`build` (``tvm.compile``,
or MetaSchedule's ``compile_relax`` with a tuning database) -> ``export_library`` linked by the
target's compiler (a cross compiler for a device).

Weights are *inputs* of ``main``, not constants of the shared object: the artifact stores them
in ``params.npz`` (dense, fp16, sparse or int8 encodings) and the runtime passes them after the
image. BatchNorm is folded into the preceding convolutions before import, so every weight is
such a parameter and the module has no BatchNorm left.

Host side: imports torch and the TVM compiler lazily (importing this module is cheap).
"""

from __future__ import annotations

import copy
import io
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.compiler.target import TargetSpec
from lprnet_edge.compiler.toolchain import Compiler
from lprnet_edge.runtime.errors import ArtifactError, LprnetEdgeError, ToolchainError

FRONTENDS = ("torch.export", "onnx")
INPUT_NAME = "x"
INPUT_SHAPE = (1, 3, 24, 94)  # batch 1 is LPRNet's semantics (batch-wide normalisation)
ENTRY = "main"


def import_tvm_compiler() -> Any:
    """``tvm`` with its compiler (``tvm.relax``), or a ToolchainError saying how to get it."""
    try:
        import tvm
        from tvm import relax  # noqa: F401  (fails on a runtime-only install)
    except ImportError as e:
        raise ToolchainError(
            "the TVM compiler is not available: pip install 'lprnet-edge[host]' "
            f"(apache-tvm==0.27.*, apache-tvm-ffi==0.1.14.post1) ({e})"
        ) from e
    return tvm


# ---------------------------------------------------------------- PyTorch side


def fold_batchnorm(model: Any) -> Any:
    """A copy of ``model`` with each BatchNorm2d folded into the convolution before it.

    Works on ``nn.Sequential`` containers where a BatchNorm follows a Conv2d or a block whose
    last layer is a Conv2d (LPRNet's SmallBasicBlock). The folded BatchNorm becomes Identity,
    so module indices (LPRNet's feature taps) do not move. Zero weights stay zero (pruning).
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()

    def last_conv(m: nn.Module) -> tuple[nn.Module, str] | None:
        # (parent, attribute) of the Conv2d that produces m's output, if there is a single one.
        if isinstance(m, nn.Sequential) and len(m):
            last = str(len(m) - 1)
            if isinstance(m[-1], nn.Conv2d):
                return m, last
            return last_conv(m[-1])
        block = getattr(m, "block", None)
        if isinstance(block, nn.Sequential):
            return last_conv(block)
        return None

    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(1, len(seq)):
            bn, prev = seq[i], seq[i - 1]
            if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
                continue
            if isinstance(prev, nn.Conv2d):
                seq[i - 1] = fuse_conv_bn_eval(prev, bn)
            elif (found := last_conv(prev)) is not None:
                parent, key = found
                parent._modules[key] = fuse_conv_bn_eval(parent._modules[key], bn)
            else:
                continue
            seq[i] = nn.Identity()
    return model


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
                                  f"{type(e).__name__}: {_first_line(e)}") from e
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


def build(mod: Any, target_spec: TargetSpec, out_path: str | Path, cc: Compiler | str | None,
          database: Any = None, opt_level: int = 3,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compile ``mod`` for ``target_spec`` and write the shared library ``out_path``.

    ``cc`` links the objects (a :class:`Compiler`, a path, or None for TVM's default host
    compiler). ``database``: a MetaSchedule database applied with ``compile_relax``.
    Returns timings and what was used.
    """
    tvm = import_tvm_compiler()
    target = target_spec.tvm_target()
    out_path = Path(out_path)
    t0 = time.perf_counter()
    try:
        if database is not None:
            from tvm.s_tir.meta_schedule.relax_integration import compile_relax

            executable = compile_relax(database, mod, target, params=None)
        else:
            prepared = prepare_for_tuning(mod, target, opt_level)
            with tvm.transform.PassContext(opt_level=opt_level):
                executable = tvm.compile(prepared, target)
    except Exception as e:  # TVM errors are TVMError / InternalError / ValueError...
        raise LprnetEdgeError(f"TVM failed to compile for {target_spec.name}: "
                              f"{type(e).__name__}: {_last_line(e)}") from e
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
                             f"{path or 'the default compiler'} failed: {_tail(e)}") from e
    return {
        "compile_s": round(t_compile, 3),
        "export_s": round(time.perf_counter() - t1, 3),
        "tuned": database is not None,
        "opt_level": opt_level,
        "compiler": path,
        "tvm_target": str(target),
    }


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


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _tail(e: BaseException, n: int = 6) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else type(e).__name__


# ---------------------------------------------------------------- run a host build in-process


class HostModule:
    """A host-built ``model.so`` loaded once (TVM runtime), with its parameters bound."""

    def __init__(self, lib_path: str | Path, params: Sequence[np.ndarray] | dict[str, np.ndarray]
                 ) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm
        self.device = tvm.cpu(0)
        try:
            lib = tvm.runtime.load_module(str(lib_path))
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{lib_path}: cannot load compiled module ({_last_line(e)})"
                                ) from e
        self._vm = VirtualMachine(lib, self.device)
        self._fn = self._vm[ENTRY]
        values = params.values() if isinstance(params, dict) else params
        self._params = [tvm.runtime.tensor(np.ascontiguousarray(p, dtype=np.float32),
                                           self.device) for p in values]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self._fn(self._tvm.runtime.tensor(np.ascontiguousarray(x, np.float32),
                                                self.device), *self._params)
        if not hasattr(out, "numpy"):
            out = out[0]
        return out.numpy()


def run_host(lib_path: str | Path, x: np.ndarray,
             params: Sequence[np.ndarray] | dict[str, np.ndarray]) -> np.ndarray:
    """Run a host-built module once on ``x`` (1x3x24x94 float32): the logits."""
    return HostModule(lib_path, params)(x)
