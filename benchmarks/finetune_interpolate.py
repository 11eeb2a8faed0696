"""Mix an existing fine-tuned checkpoint with the pretrained weights (WiSE-FT), as
``lprnet-edge finetune`` now does at its end, without training again.

    python benchmarks/finetune_interpolate.py RUN.pth -o OUT.pth [--a A] [--base BASE.pth]

RUN.pth must have its record (RUN.json) beside it: the validation split is rebuilt from it
(same data, same files held out, checked by their names), the mixing weight is swept there
and chosen by the same rule as ``finetune --interpolate auto`` (or set by ``--a``), and
OUT.pth gets OUT.json: RUN.json with the sweep and the mixed model's validation accuracy.
test/ is not evaluated (the record's test/ figures, if any, are dropped: they were the
unmixed model's). For comparing settings on the validation split alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lprnet_edge.model.checkpoint import load_model, save_checkpoint
from lprnet_edge.model.finetune import FinetuneConfig, load_split, record_path
from lprnet_edge.model.interpolate import blend
from lprnet_edge.model.weights import resolve_weights
from lprnet_edge.runtime.charset import load_charset
from lprnet_edge.runtime.files import sha256_file, write_json_atomic


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--a", type=float, default=None, help="mixing weight (default: auto)")
    ap.add_argument("--base", default=None, help="pretrained weights (default: bundled)")
    args = ap.parse_args(argv)
    rec = json.loads(record_path(args.run).read_text(encoding="utf-8"))
    c = rec["config"]
    cfg = FinetuneConfig(data=Path(c["data"]), val=Path(c["val"]) if c["val"] else None,
                         val_split=c["val_split"], seed=c["seed"])
    cs = load_charset()
    val = load_split(cfg, cs).split()[1]
    if list(val.names) != rec["split"]["val_files"]:
        raise SystemExit(f"{args.run}: the validation split rebuilt from its record differs")
    base = resolve_weights(args.base)
    if sha256_file(base) != rec["base_weights"]["sha256"]:
        raise SystemExit(f"{base} is not the pretrained weights {args.run} started from")
    model, interp = blend(load_model(base), load_model(args.run), val, cs, args.a)
    save_checkpoint(model, args.out, finetuned_from=rec["base_weights"]["sha256"],
                    epoch=rec["best_epoch"])
    point = next(p for p in interp.sweep if p.a == interp.a)
    rec.update(weights=args.out.name, weights_sha256=sha256_file(args.out),
               interpolation=interp.to_dict(), interpolated_from=args.run.name)
    rec["accuracy"] = {"val": {**rec["accuracy"]["val"], "after": point.val_accuracy},
                       "test": {"before": None, "after": None}}
    write_json_atomic(record_path(args.out), rec)
    print(f"a = {interp.a:g}: validation {point.val_accuracy:.3f} (the run alone "
          f"{interp.finetuned_val_accuracy:.3f}), kept {point.val_kept}, drift "
          f"{point.val_drift}")


if __name__ == "__main__":
    main()
