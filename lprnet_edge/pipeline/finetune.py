"""The build's fine-tuning stage: the pretrained model adapted to the user's plates before
anything else looks at it.

Everything after it works on the fine-tuned model, and on *its* data: the set it returns
carries the fine-tuning's validation split (``CalibrationSet.val_index``), so quantization
calibrates on the training plates and the accuracy guard, distillation and the selection
measure on the held-out ones, against the fine-tuned float model (``art.original``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lprnet_edge.model.finetune import FinetuneConfig, finetune, load_split
from lprnet_edge.model.plates import describe_skipped
from lprnet_edge.model.training import ProgressBar


def finetune_stage(art: Any, cfg: FinetuneConfig, log: Callable[[str], None]) -> str:
    """Fine-tune ``art``'s model in place of the pretrained one; the record goes in
    ``art.stages["finetune"]`` (settings) and ``art.reports["finetune"]`` (data hash, split,
    accuracy before/after). Returns the stage's one-line result."""
    data = load_split(cfg, art.charset)
    for line in describe_skipped(data.skipped):
        log(f"  skipped {line}")
    res = finetune(art.model, cfg, data, ProgressBar(label="  finetune"), charset=art.charset)
    art.model = art.reference = art.original = res.model
    art.calib = res.data
    art.stages["finetune"] = cfg.to_dict()
    art.reports["finetune"] = res.to_dict()
    test = (f", test/ {res.test_before:.3f} -> {res.test_after:.3f} (evaluated only)"
            if res.test_after is not None else "")
    return (f"validation {res.val_before:.3f} -> {res.val_after:.3f} on "
            f"{len(data.split()[1])} plates (best epoch {res.best_epoch}, {res.stopped})"
            + test)
