"""The int8 calibrator comparison of the compression report: each calibrator's PyTorch
simulation measured on ``test/`` like every report row (``report --calibrators``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lprnet_edge.compress.configs import QuantizeConfig
from lprnet_edge.compress.quantize import quantize
from lprnet_edge.model.calib import (
    CalibrationSet,
    EvalSet,
    decode_batch,
    load_eval_set,
    predict_logits,
)
from lprnet_edge.report.latency import _log
from lprnet_edge.report.variants import DEFAULT_OUT, _load_inputs, _save

CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


def compare_calibrators(original: nn.Module, calib: CalibrationSet, test: EvalSet,
                        calibrators: Sequence[str] = CALIBRATORS,
                        head_fp32: Sequence[bool] = (True, False),
                        log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Int8 (weights + activations) PyTorch simulation per calibrator, calibrated like the
    report's ``int8-sim`` (first ``calib_images`` of the calib/ train split) and measured on
    ``test`` like every report row: accuracy, and agreement with the original's readings."""


    train, _val = calib.split(0.3, 0)
    ref = decode_batch(predict_logits(original, test.x))
    n = len(test.labels)
    orig_acc = float(np.mean([p == t for p, t in zip(ref, test.labels, strict=True)]))
    rows = []
    for h in head_fp32:
        for c in calibrators:
            t0 = time.time()
            cfg = QuantizeConfig(mode="int8", calibrator=c,
                                 fallback_layers=("container.0",) if h else ())
            q = quantize(original, cfg, train, head_fp32=h)
            qm, qrep = q.module, q.report
            pred = decode_batch(predict_logits(qm, test.x))
            acc = float(np.mean([p == t for p, t in zip(pred, test.labels, strict=True)]))
            agree = float(np.mean([p == q for p, q in zip(pred, ref, strict=True)]))
            ratios = [v["threshold"] / v["amax"] for k, v in qrep["thresholds"].items()
                      if v["amax"] > 0 and k not in cfg.fallback_layers]
            rows.append({"calibrator": c, "head_fp32": h, "test_accuracy": acc,
                         "accuracy_change_points": 100 * (acc - orig_acc),
                         "agreement_with_original": agree,
                         "threshold_over_max_median": float(np.median(ratios)),
                         "seconds": round(time.time() - t0, 1)})
            log(f"  {c:<10} head {'fp32' if h else 'int8'}: acc {acc:.3f} "
                f"({100 * (acc - orig_acc):+.1f} pt), agreement {agree:.3f}, "
                f"median threshold/max {rows[-1]['threshold_over_max_median']:.2f}")
    return {"original_test_accuracy": orig_acc, "test_images": n,
            "calibration": f"first {QuantizeConfig().calib_images} images of the calib/ "
                           f"train split ({len(train)} images, split seed 0)",
            "percentile": QuantizeConfig().percentile,
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


def refresh_calibrators(out: str | Path = DEFAULT_OUT, weights: str | Path | None = None,
                        calib_dir: str | Path | None = None, test_dir: str | Path | None = None,
                        model: nn.Module | None = None, calib: CalibrationSet | None = None,
                        test: EvalSet | None = None, head_fp32: Sequence[bool] = (True, False),
                        command: str | None = None, log: Callable[[str], None] = _log
                        ) -> dict[str, Any]:
    """Add (or replace) the calibrator comparison of an existing report and rewrite it."""
    out = Path(out)
    rep = json.loads((out / "compression-report.json").read_text(encoding="utf-8"))
    original, calib, _ = _load_inputs(weights, model, calib, calib_dir, test_dir)
    test = test if test is not None else load_eval_set(test_dir)
    log(f"int8 calibrators on {len(test.labels)} test plates")
    res = compare_calibrators(original, calib, test, head_fp32=head_fp32, log=log)
    if command:
        res["command"] = command
    rep["calibrators"] = res
    _save(out, rep)
    return rep
