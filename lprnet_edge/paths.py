"""The one resolver for where lprnet-edge finds its data and keeps its cache.

- data: ``$LPRNET_EDGE_DATA`` (a folder with ``weights/``, ``calib/``, ``test/``); there is no
  built-in default path, so a machine's own layout never leaks into the code;
- cache: ``$LPRNET_EDGE_CACHE``, else ``$XDG_CACHE_HOME/lprnet-edge`` (default ``~/.cache``):
  downloaded weights, tuning databases.

Weights are resolved in :func:`lprnet_edge.model.weights.resolve_weights` on top of these.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path | None:
    """``$LPRNET_EDGE_DATA`` as an absolute path, or None when it is not set."""
    env = os.environ.get("LPRNET_EDGE_DATA")
    return Path(env).absolute() if env else None


def data_subdir(name: str) -> Path | None:
    """``$LPRNET_EDGE_DATA/<name>`` if it exists (``calib``, ``test``, ``weights``)."""
    root = data_root()
    return root / name if root is not None and (root / name).is_dir() else None


def cache_dir() -> Path:
    """``$LPRNET_EDGE_CACHE`` or ``$XDG_CACHE_HOME/lprnet-edge`` (default ``~/.cache``)."""
    if env := os.environ.get("LPRNET_EDGE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lprnet-edge"
