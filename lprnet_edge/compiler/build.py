"""Relax -> a linked shared library: fusion passes, ``tvm.compile`` (or MetaSchedule's
``compile_relax`` with a tuning database), ``export_library`` with the target's compiler (a
cross compiler for a device). The import is :mod:`lprnet_edge.compiler.frontend`, tuning
:mod:`lprnet_edge.compiler.tune`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.compiler.errors import import_tvm_compiler, last_line, tail
from lprnet_edge.compiler.frontend import ENTRY
from lprnet_edge.compiler.target import TargetSpec
from lprnet_edge.compiler.toolchain import Compiler
from lprnet_edge.runtime.errors import ArtifactError, LprnetEdgeError, ToolchainError

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
            raise ArtifactError(f"{lib_path}: cannot load compiled module ({last_line(e)})"
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
