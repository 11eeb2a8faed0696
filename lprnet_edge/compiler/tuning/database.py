"""Where tuning records live and how they are opened, counted and keyed.

A database is MetaSchedule's ``JSONDatabase`` (``database_workload.json`` +
``database_tuning_record.json``) in ``$LPRNET_EDGE_CACHE/tuning/<key>/``, where ``<key>`` is a
hash of the target's canonical TVM dict and the structural hash of the prepared module, or in
``TuneConfig.db_dir`` (``--tuning-db DIR``, a directory that can be shared). Records are
appended as they are measured, so counting lines is how the budget knows what is there
without loading TVM.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lprnet_edge.compiler.tuning.config import TuneConfig
from lprnet_edge.compiler.tuning.estimate_runner import estimate_spec
from lprnet_edge.paths import cache_dir
from lprnet_edge.runtime.errors import LprnetEdgeError

DB_FILES = ("database_workload.json", "database_tuning_record.json")
META_FILE = "lprnet-edge-tuning.json"


def mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def target_dict(target: Any) -> dict[str, Any]:
    """The TVM target dict of a TargetSpec, a dict, or a ``tvm.target.Target``."""
    if hasattr(target, "tvm") and isinstance(target.tvm, dict):
        return dict(target.tvm)
    if isinstance(target, dict):
        return dict(target)
    if hasattr(target, "export"):
        return dict(target.export())
    raise LprnetEdgeError(f"not a target: {target!r}")


def target_key(target: Any) -> str:
    canon = json.dumps(target_dict(target), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def workload_key(prepared: Any) -> str:
    # tvm_ffi imports torch when installed: only callers that hold a TVM module pay for it.
    import tvm_ffi

    return f"{int(tvm_ffi.structural_hash(prepared)) & ((1 << 64) - 1):016x}"


def default_db_dir(target: Any, prepared: Any, estimated_cpu: str | None = None) -> Path:
    """The cache's database for ``target`` and ``prepared``; records estimated for a core
    (tuning without the board) live apart from the board's measured ones, whose seconds
    they must not be compared with."""
    est = f"-est-{estimated_cpu}" if estimated_cpu else ""
    return cache_dir() / "tuning" / f"{target_key(target)}-{workload_key(prepared)}{est}"


def resolve_db_dir(target: Any, prepared: Any, config: TuneConfig) -> Path:
    """``config.db_dir``, else the cache's database for what ``config`` measures with (the
    board's clock, or the estimate when an ARM target is tuned without a board)."""
    if config.db_dir:
        return Path(config.db_dir)
    est = estimate_spec(target, config)
    return default_db_dir(target, prepared, est.cpu if est else None)


def has_records(db_dir: str | Path) -> bool:
    p = Path(db_dir) / DB_FILES[1]
    return p.is_file() and p.stat().st_size > 0


def open_database(db_dir: str | Path) -> Any:
    """The JSON database in ``db_dir`` (created empty if missing)."""
    # MetaSchedule is the heavy part of TVM: imported only when a database is opened.
    from tvm.s_tir import meta_schedule as ms

    d = mkdir(Path(db_dir))
    return ms.database.JSONDatabase(path_workload=str(d / DB_FILES[0]),
                                    path_tuning_record=str(d / DB_FILES[1]),
                                    allow_missing=True)


def count_records(db_dir: str | Path) -> int:
    """Lines (= measured candidates) in the records file, without loading TVM."""
    p = Path(db_dir) / DB_FILES[1]
    if not p.is_file():
        return 0
    with open(p, "rb") as f:
        return sum(1 for line in f if line.strip())


def label_database(db_dir: Path, target: Any, prepared: Any, tvm_version: str,
                   log: Callable[[str], None]) -> None:
    """Write which target and workload ``db_dir`` holds records for; a shared database of
    another target keeps its label (its records still apply where workloads match)."""
    meta = {"target": target_dict(target), "target_name": getattr(target, "name", None),
            "target_key": target_key(target), "workload_key": workload_key(prepared),
            "tvm": tvm_version}
    meta_path = db_dir / META_FILE
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if old and old.get("target_key") != meta["target_key"]:
        log(f"note: {db_dir} holds records tuned for {old.get('target_name') or 'another'} "
            f"target; they are applied to {meta['target_name']} where workloads match")
    else:
        write_json(meta_path, meta)
