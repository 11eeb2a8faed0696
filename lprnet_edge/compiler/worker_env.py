"""The environment of TVM's worker processes (tuning worker, candidate builders, RPC servers).

``tvm_ffi`` imports torch eagerly when it is installed, which makes every worker start slowly
and makes TVMScript's ``import tvm.s_tir.tensor_intrin`` crawl. Workers start with a
``PYTHONPATH`` shim that keeps torch out of them and caches ``inspect.getmodule`` misses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from lprnet_edge.paths import cache_dir

_SITECUSTOMIZE = '''\
"""lprnet-edge TVM worker shim (written by lprnet_edge.compiler.worker_env; safe to delete)."""
import inspect as _inspect

_orig_getmodule = _inspect.getmodule
_misses = set()


def _getmodule(object, _filename=None):
    # TVMScript calls inspect.stack() for every @prim_func; for frames of frozen modules
    # inspect.getmodule() scans all of sys.modules each time. Remember the misses.
    if _filename is not None and _filename in _misses:
        return None
    m = _orig_getmodule(object, _filename)
    if m is None and _filename is not None:
        _misses.add(_filename)
    return m


_inspect.getmodule = _getmodule
'''
_NO_TORCH = ('raise ImportError("torch is kept out of lprnet-edge\'s TVM worker processes '
             '(see lprnet_edge.compiler.worker_env)")\n')


def _shim_dir() -> Path:
    """A directory with the shim's ``sitecustomize.py`` and a ``torch`` that fails to import."""
    digest = hashlib.sha256((_SITECUSTOMIZE + _NO_TORCH).encode()).hexdigest()[:10]
    d = cache_dir() / "tvm-worker-shim" / digest
    if not (d / "torch" / "__init__.py").is_file():
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".shim-", dir=d.parent))
        (tmp / "torch").mkdir()
        (tmp / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        (tmp / "torch" / "__init__.py").write_text(_NO_TORCH)
        try:
            os.replace(tmp, d)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return d


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for TVM worker processes (tuning worker, builders, RPC servers)."""
    env = dict(os.environ)
    env.update(extra or {})
    parts = [str(_shim_dir())]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    # The package itself must stay importable from the workers (RPC session function).
    parts.append(str(Path(__file__).resolve().parent.parent.parent))
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    return env
