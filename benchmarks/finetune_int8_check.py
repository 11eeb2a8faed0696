"""int8 against the fine-tuned float model on the fine-tuning's held-out split, without
training or compiling: the build's own quantize and accuracy-guard stages.

    python benchmarks/finetune_int8_check.py WEIGHTS.pth DATA [--val-split 0.2] [--seed 0]
        [--calibrator mse|minmax|percentile|entropy] [--quant-distill EPOCHS]

WEIGHTS.pth is a checkpoint of ``lprnet-edge finetune --data DATA``; the split is rebuilt from
the same files, fraction and seed, so it is the one that checkpoint was selected on. This is
what ``build --finetune DATA --quantize int8`` measures in its guard stage before compiling.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lprnet_edge.compress.accuracy import Budget, check_model
from lprnet_edge.compress.configs import CALIBRATORS, FINETUNED_QUANT_DISTILL, QuantizeConfig
from lprnet_edge.model.calib import accuracy
from lprnet_edge.model.finetune import FinetuneConfig, load_split
from lprnet_edge.pipeline.steps import calibration_set, load_torch, quantize_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--val-split", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibrator", choices=sorted(CALIBRATORS), default="mse",
                    help="activation ranges; calibrated on the training plates only")
    ap.add_argument("--quant-distill", type=int, default=FINETUNED_QUANT_DISTILL,
                    help="epochs of quantization-aware distillation on the training plates "
                         "(the build's default with --finetune; 0: post-training only)")
    args = ap.parse_args(argv)
    art = load_torch(args.weights)
    art.calib = load_split(FinetuneConfig(data=args.data, val_split=args.val_split,
                                          seed=args.seed))
    pretrained = accuracy(load_torch(None).model, art.calib.split()[1])
    cfg = QuantizeConfig(mode="int8", calibrator=args.calibrator,
                         distill_epochs=args.quant_distill)
    art = quantize_model(art, cfg, None)
    check = check_model(art.original, art.reference, calibration_set(None, art),
                        Budget.of(100.0))
    print(json.dumps({"calibrator": args.calibrator, "quant_distill": args.quant_distill,
                      "pretrained": pretrained,
                      "finetuned_fp32": check.original,
                      "int8": check.changed, "drop_points": check.drop_points,
                      "plates": check.images, "lost": check.lost, "gained": check.gained,
                      "agreement": check.agreement}, indent=2))


if __name__ == "__main__":
    main()
