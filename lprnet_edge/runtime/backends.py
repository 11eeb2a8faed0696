"""Inference backends behind the Recognizer: each maps a 1x3x24x94 float32 batch to logits.

``tvm``: a compiled Relax module, loaded with the TVM *runtime* only (no compiler, no torch).
(PyTorch eager, the host reference, is :class:`lprnet_edge.model.reference.TorchBackend`.)
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lprnet_edge.runtime.artifact import Artifact
from lprnet_edge.runtime.errors import ArtifactError, ToolchainError


class Backend(Protocol):
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


def import_tvm_runtime() -> Any:
    """``tvm``, imported without torch when the process has not imported torch already.

    ``tvm_ffi`` imports torch whenever it is installed (only to exchange tensors with it),
    which costs seconds on a host with PyTorch before a compiled module can even load; the
    runtime never hands TVM a torch tensor. While tvm is imported, ``sys.modules["torch"] =
    None`` makes that optional import fail (tvm_ffi treats torch as absent), and the entry is
    removed afterwards so the process can still ``import torch``. A process that imported
    torch first (the compiler, the report) imports tvm as usual.
    """
    keep_torch_out = "torch" not in sys.modules
    if keep_torch_out:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        # The runtime imports TVM here, not at module top: the package must import (and run
        # its pure-numpy paths) on a machine without TVM.
        import tvm
        import tvm.runtime  # noqa: F401
    except ImportError as e:
        raise ToolchainError(
            f"the TVM runtime cannot be imported ({e}): pip install 'lprnet-edge[device]' "
            "(apache-tvm==0.27.*, apache-tvm-ffi==0.1.14.post1); without the TVM compiler "
            "installed, set TVM_USE_RUNTIME_LIB=1"
        ) from e
    finally:
        if keep_torch_out and "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tvm


def load_library(lib_path: str | Path, session: Any = None) -> tuple[Any, Any]:
    """``(module, device)``: ``lib_path`` loaded here (``session=None``), or uploaded to and
    loaded on an RPC session (local or remote). The one loader of compiled modules: the
    Recognizer's backend, the profiler and every timing path go through it."""
    tvm = import_tvm_runtime()
    lib_path = Path(lib_path)
    try:
        if session is None:
            return tvm.runtime.load_module(str(lib_path)), tvm.cpu(0)
        # A unique name: a session keeps one folder, and overwriting a library it has
        # loaded already (a second artifact's model.so) crashes the server process.
        name = f"{lib_path.stem}-{uuid.uuid4().hex[:12]}{lib_path.suffix}"
        session.upload(str(lib_path), target=name)
        return session.load_module(name), session.cpu(0)
    except Exception as e:  # TVM raises its own error types (TVMError, RuntimeError...)
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise ArtifactError(f"{lib_path}: cannot load the compiled module "
                            f"({lines[-1] if lines else type(e).__name__})") from e


class TvmBackend:
    """A Relax VM executable (``export_library`` output) run with the TVM runtime only.

    Thread model: the loaded module and the weight tensors are shared (read-only); each thread
    gets its own ``VirtualMachine`` (``threading.local``, created on the thread's first call).
    A Relax VM keeps per-call state (registers, the current frame), so two threads in one VM
    corrupt each other (a segfault in ``StorageObj::AllocTensor``); separate VMs over the same
    module do not, and unlike a lock they let threads run at once (both give results identical
    to sequential calls: ``test_one_recognizer_shared_by_threads``). Each calling thread also
    gets its own TVM worker pool of ``num_threads``: with several caller threads, give the
    Recognizer ``num_threads=1`` (or cores / threads) to avoid
    oversubscription.

    The artifact must have been verified (:meth:`Artifact.open` does it, or
    :meth:`Artifact.verify` for an in-memory manifest) before this loads its shared object.
    """

    name = "tvm"

    def __init__(self, artifact: Artifact, num_threads: int | None = None) -> None:
        tvm = import_tvm_runtime()
        from tvm.runtime.vm import VirtualMachine

        self._tvm, self._vm_cls = tvm, VirtualMachine
        self.artifact = artifact
        # The artifact's recorded thread count (the target's cores) applies unless the caller
        # or $TVM_NUM_THREADS says otherwise; TVM reads it when its thread pool starts.
        if not num_threads and "TVM_NUM_THREADS" not in os.environ:
            num_threads = artifact.num_threads
        if num_threads:
            os.environ["TVM_NUM_THREADS"] = str(int(num_threads))
        self.lib, self.device = load_library(artifact.lib_path)
        self.entry = artifact.entry
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(a), self.device)
                       for a in artifact.params()]
        self._local = threading.local()
        self._fn()  # fail now (not in the first call) on an unknown entry function

    @property
    def vm(self) -> Any:
        """This thread's VirtualMachine."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            vm = self._local.vm = self._vm_cls(self.lib, self.device)
        return vm

    def _fn(self) -> Any:
        fn = getattr(self._local, "fn", None)
        if fn is None:
            try:
                fn = self._local.fn = self.vm[self.entry]
            except Exception as e:  # AttributeError / TVMError for an unknown function
                raise ArtifactError(f"{self.artifact.lib_path}: no function {self.entry!r} in "
                                    "the compiled module") from e
        return fn

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self._fn()(self._tvm.runtime.tensor(x, self.device), *self.params)
        if not hasattr(out, "numpy"):  # a tuple of outputs
            out = out[0]
        return out.numpy()


def load_backend(artifact: Artifact, num_threads: int | None = None) -> Backend:
    """The backend the manifest names (only ``tvm``: the manifest refuses any other)."""
    if artifact.manifest.backend == "tvm":
        return TvmBackend(artifact, num_threads)
    raise ArtifactError(f"{artifact.root}: unknown backend {artifact.manifest.backend!r} "
                        "(this runtime runs 'tvm' artifacts)")
