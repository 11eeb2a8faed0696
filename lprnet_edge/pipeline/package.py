"""The manifest of a staged artifact, written last: a directory without one is not an artifact."""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from pathlib import Path

from lprnet_edge.compiler.config import CompileConfig
from lprnet_edge.compiler.tuning import TuningSummary
from lprnet_edge.pipeline.values import CompiledModule, TorchModel, jsonable
from lprnet_edge.pipeline.verify import TestAccuracy, Verification
from lprnet_edge.runtime import __version__
from lprnet_edge.runtime.artifact import MANIFEST, Manifest, machine_arch
from lprnet_edge.runtime.files import write_json_atomic


def _versions() -> dict[str, str | None]:
    v: dict[str, str | None] = {"lprnet_edge": __version__, "python": platform.python_version()}
    for mod, key in (("tvm", "tvm"), ("tvm_ffi", "tvm_ffi"), ("torch", "torch"),
                     ("numpy", "numpy")):
        m = sys.modules.get(mod)
        v[key] = getattr(m, "__version__", None) if m else None
    return v


def make_manifest(name: str, tm: TorchModel, compiled: CompiledModule, config: CompileConfig,
                  verification: Verification, accuracy: TestAccuracy | None = None,
                  tune_summary: TuningSummary | None = None) -> Manifest:
    """The typed manifest of the staged artifact (files checksummed as they are now)."""
    root = compiled.root
    sizes = {n: (root / n).stat().st_size for n in compiled.files}
    stages = {"finetune": tm.stages["finetune"]} if "finetune" in tm.stages else {}
    stages |= {"prune": tm.stages.get("prune"), "quantize": tm.stages.get("quantize"),
              "tune": tm.stages.get("tune"), "compile": config.to_dict()}
    reports = dict(tm.reports)
    if tune_summary is not None:
        reports["tune"] = tune_summary.to_dict()
    reports["compile"] = compiled.info
    records = jsonable({
        "name": name,
        "output": {"shape": [1, len(tm.charset), 18], "dtype": "float32", "layout": "NCT"},
        "source": {"weights": tm.weights.name, "weights_sha256": tm.weights_sha256},
        "stages": stages,
        "reports": reports,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "built_on": {"machine": machine_arch(), "platform": platform.platform()},
        "sizes": {**sizes, "total": sum(sizes.values())},
        "param_encodings": compiled.encodings,
        "verification": verification.to_dict(),
        "accuracy": accuracy.to_dict() if accuracy is not None else None,
    })
    num_threads = config.num_threads or compiled.target.num_threads
    return compiled.artifact(tm.charset, num_threads, records).manifest


def write_manifest(stage_dir: Path, manifest: Manifest) -> Path:
    """``manifest.json`` into the staged directory (its umask-based mode comes from
    ``staging_dir`` when the directory moves in place)."""
    path = Path(stage_dir) / MANIFEST
    write_json_atomic(path, manifest.to_dict())
    return path
