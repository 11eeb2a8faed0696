"""Inference backends behind the Recognizer: each maps a 1x3x24x94 float32 batch to logits.

``tvm``: a compiled Relax module, loaded with the TVM *runtime* only (no compiler, no torch).
(PyTorch eager, the host reference, is :class:`lprnet_edge.model.reference.TorchBackend`.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lprnet_edge.runtime.errors import ArtifactError, ToolchainError


class Backend(Protocol):
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


def import_tvm_runtime() -> Any:
    try:
        import tvm
        import tvm.runtime  # noqa: F401
    except ImportError as e:
        raise ToolchainError(
            "the TVM runtime is not installed: pip install 'lprnet-edge[device]' "
            "(apache-tvm==0.27.*, apache-tvm-ffi==0.1.14.post1)"
        ) from e
    return tvm


class TvmBackend:
    """A Relax VM executable (``export_library`` output) run with the TVM runtime only.

    ``runtime`` in the manifest says how: the entry function, and an optional params file
    (``.npz`` of named arrays, decoded from a compact encoding) passed after the input.
    """

    name = "tvm"

    def __init__(self, root: Path, manifest: dict[str, Any], num_threads: int | None = None
                 ) -> None:
        tvm = import_tvm_runtime()
        from tvm.runtime.vm import VirtualMachine

        rt = manifest.get("runtime", {})
        lib_name = manifest.get("model_file", "model.so")
        self._tvm = tvm
        # The artifact's recorded thread count (the target's cores) applies unless the caller
        # or $TVM_NUM_THREADS says otherwise; TVM reads it when its thread pool starts.
        if not num_threads and "TVM_NUM_THREADS" not in os.environ:
            num_threads = rt.get("num_threads")
        if num_threads:
            _set_threads(int(num_threads))
        try:
            lib = tvm.runtime.load_module(str(root / lib_name))
        except Exception as e:  # TVM raises its own error types
            raise ArtifactError(f"{root / lib_name}: cannot load compiled module ({e})") from e
        self.device = tvm.cpu(0)
        self.vm = VirtualMachine(lib, self.device)
        self.entry = rt.get("entry", "main")
        self.params: list[Any] = []
        if rt.get("params"):
            from lprnet_edge.runtime.params_codec import load_params

            arrays = load_params(root / rt["params"])
            order = rt.get("param_order") or list(arrays)
            missing = [k for k in order if k not in arrays]
            if missing:
                raise ArtifactError(f"{root / rt['params']}: weights {missing[:3]} listed in "
                                    "the manifest are missing (rebuild the artifact)")
            self.params = [tvm.runtime.tensor(arrays[k], self.device) for k in order]
        try:
            self._fn = self.vm[self.entry]
        except Exception as e:  # AttributeError / TVMError for an unknown function
            raise ArtifactError(f"{root / lib_name}: no function {self.entry!r} in the "
                                "compiled module") from e

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self._fn(self._tvm.runtime.tensor(x, self.device), *self.params)
        if not hasattr(out, "numpy"):  # a tuple of outputs
            out = out[0]
        return out.numpy()


def _set_threads(n: int) -> None:
    os.environ["TVM_NUM_THREADS"] = str(n)


def load_backend(root: Path, manifest: dict[str, Any], num_threads: int | None = None
                 ) -> Backend:
    kind = manifest["backend"]
    if kind == "tvm":
        return TvmBackend(root, manifest, num_threads)
    raise ArtifactError(f"{root}: unknown backend {kind!r} (this runtime runs 'tvm' artifacts)")
