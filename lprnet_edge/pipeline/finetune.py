"""The build's fine-tuning stage: the pretrained model adapted to the user's plates before
anything else looks at it.

Everything after it works on the fine-tuned model, and on *its* data: the set it returns
carries the fine-tuning's validation split (``CalibrationSet.val_index``), so quantization
calibrates on the training plates and the accuracy guard, distillation and the selection
measure on the held-out ones, against the fine-tuned float model (``art.original``).

``--weights`` that already are this fine-tuning (their record beside them names the same data,
file for file, and the same validation files) are used as they are: a build for a second
target does not train again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from lprnet_edge.model.calib import CalibrationSet
from lprnet_edge.model.finetune import FinetuneConfig, finetune, load_split, record_path
from lprnet_edge.model.plates import describe_skipped, files_sha256
from lprnet_edge.model.training import ProgressBar

FINETUNE_SPLIT = "the fine-tuning's validation split"


def finetune_stage(art: Any, cfg: FinetuneConfig, log: Callable[[str], None]) -> str:
    """Fine-tune ``art``'s model in place of the pretrained one; the record goes in
    ``art.stages["finetune"]`` (settings) and ``art.reports["finetune"]`` (data hash, split,
    accuracy before/after). Returns the stage's one-line result."""
    data = load_split(cfg, art.charset)
    for line in describe_skipped(data.skipped):
        log(f"  skipped {line}")
    art.calib = data
    record = _same_finetuning(art, data)
    if record is not None:
        art.stages["finetune"] = {**cfg.to_dict(), "reused": record_path(art.weights).name}
        art.reports["finetune"] = record
        acc = record["accuracy"]["val"]
        return (f"{art.weights.name} is this fine-tuning already (its record: same files, "
                f"same validation split): validation {acc['after']:.3f}, not trained again")
    res = finetune(art.model, cfg, data, ProgressBar(label="  finetune"), charset=art.charset)
    art.model = art.reference = art.original = res.model
    art.stages["finetune"] = cfg.to_dict()
    art.reports["finetune"] = res.to_dict()
    test = (f", test/ {res.test_before:.3f} -> {res.test_after:.3f} (evaluated only)"
            if res.test_after is not None else "")
    mixed = (f", a = {res.interpolation.a:g} of the way from the pretrained weights"
             if res.interpolation is not None else "")
    return (f"validation {res.val_before:.3f} -> {res.val_after:.3f} on "
            f"{len(data.split()[1])} plates (best epoch {res.best_epoch}, {res.stopped}"
            f"{mixed})" + test)


def _same_finetuning(art: Any, data: CalibrationSet) -> dict[str, Any] | None:
    """The record of ``art.weights`` if they were fine-tuned on exactly ``data`` and split."""
    path = record_path(art.weights)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        same = (rec["weights_sha256"] == art.weights_sha256
                and rec["data"]["files_sha256"] == files_sha256(data)
                and rec["split"]["val_files"] == list(data.split()[1].names))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if same else None
