"""``lprnet-edge finetune``: adapt the pretrained model to a folder of labelled plates.

Thin: the training is :func:`lprnet_edge.model.finetune.finetune`; this module reads the
options, lists what was skipped, writes the checkpoint at each best epoch (so Ctrl-C keeps
it) and the JSON record beside it, and prints the accuracy before and after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lprnet_edge.cli.common import echo_json, json_option, table, weights_option
from lprnet_edge.pipeline.interrupt import InterruptGuard


@click.command("finetune")
@click.option("--data", required=True, type=click.Path(exists=True),
              help="Plate crops named by their text (京PL3N67.jpg), or a CSV of file,text rows.")
@click.option("--val", type=click.Path(exists=True),
              help="Validation plates (folder or CSV); default: a split of --data.")
@click.option("--val-split", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.2, show_default=True,
              help="Fraction of --data held out for validation (by file, seeded).")
# Options left out take FinetuneConfig's defaults (the settings docs/finetuning.md measures;
# `build --finetune` uses the same), so they are given here as None.
@click.option("--epochs", type=click.IntRange(min=1), help="[default: 30]")
@click.option("--patience", type=click.IntRange(min=1),
              help="Stop after this many epochs without a better validation accuracy.  "
                   "[default: 10]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="SGD learning rate (cosine schedule).  [default: 0.02]")
@click.option("--distill", type=click.FloatRange(min=0),
              help="Learning without forgetting: weight of the pull of each frame's "
                   "prediction towards the pretrained model's on the same image, 0 for "
                   "none.  [default: 2]")
@click.option("--distill-read-only/--distill-all", default=None,
              help="Distil only on the images the pretrained model reads right, or on all.  "
                   "[default: read-only]")
@click.option("--anchor", type=click.FloatRange(min=0),
              help="L2-SP: weight of the pull towards the pretrained weights, 0 for none.  "
                   "[default: 0]")
@click.option("--freeze-below", type=click.IntRange(min=0),
              help="Backbone layers below this index keep their pretrained weights.  "
                   "[default: 0]")
@click.option("--balance", type=click.FloatRange(0, 1),
              help="Draw a plate with weight (plates of its province)^-B: 0 as they come, "
                   "1 every province equally often.  [default: 0]")
@click.option("--interpolate", "interpolate", default="auto", show_default=True,
              metavar="auto|A",
              help="Keep (1-A) x pretrained + A x best-epoch weights (WiSE-FT); auto: the "
                   "smallest A on a 0.05 grid whose validation accuracy is within one plate "
                   "of the best; 1: the best epoch as it is.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="PyTorch threads (the weights a seed gives depend on it).")
@click.option("--test-dir", type=click.Path(exists=True, file_okay=False),
              help="Evaluated only, for what was forgotten  [default: $LPRNET_EDGE_DATA/test]")
@click.option("--no-test", is_flag=True,
              help="Do not evaluate test/ at all (runs that compare settings: they must be "
                   "chosen on the validation split alone).")
@weights_option
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Fine-tuned checkpoint to write (a JSON record goes beside it).")
@json_option
def finetune_cmd(data: str, val: str | None, val_split: float, epochs: int | None,
                 patience: int | None, lr: float | None, distill: float | None,
                 distill_read_only: bool | None, anchor: float | None,
                 freeze_below: int | None, balance: float | None, interpolate: str,
                 seed: int, threads: int,
                 test_dir: str | None, no_test: bool, weights: str | None, out: str,
                 as_json: bool) -> None:
    """Fine-tune the pretrained LPRNet on your labelled plates.

    The best epoch by exact-plate accuracy on the validation split is kept and written to
    OUT as soon as it is found: Ctrl-C leaves the best weights so far. Use OUT anywhere the
    toolchain takes --weights. SIGTERM stops it the same way.

    \b
    Examples:
      lprnet-edge finetune --data my-plates/ --val-split 0.2 -o my-lprnet.pth
      lprnet-edge finetune --data labels.csv --val held-out/ --epochs 30 -o my-lprnet.pth
      lprnet-edge build --target rpi4 --weights my-lprnet.pth --quantize int8
    """
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.finetune import FinetuneConfig, run_finetune
    from lprnet_edge.model.weights import resolve_weights

    given = {k: v for k, v in {"epochs": epochs, "patience": patience, "lr": lr,
                               "distill": distill, "distill_read_only": distill_read_only,
                               "anchor": anchor, "freeze_below": freeze_below,
                               "balance": balance}.items() if v is not None}
    cfg = FinetuneConfig(data=Path(data), val=Path(val) if val else None, val_split=val_split,
                         interpolate=_mixing_weight(interpolate), seed=seed, threads=threads,
                         evaluate_test=not no_test,
                         test_dir=Path(test_dir) if test_dir else None, **given)
    base = resolve_weights(weights)
    # SIGTERM (a job scheduler, `kill`) stops like Ctrl-C, and Ctrl-C works even where the
    # shell started the command with SIGINT ignored (a background job): the best epoch so
    # far is on disk, and the record is written.
    with InterruptGuard().installed():
        result, record = run_finetune(load_model(base), cfg, base, Path(out), log=_log)
    if as_json:
        echo_json(result.to_dict())
        return
    _print_result(result.to_dict(), Path(out), record)


def _mixing_weight(value: str) -> float | None:
    if value.strip().lower() == "auto":
        return None
    try:
        a = float(value)
    except ValueError:
        a = -1.0
    if not 0 <= a <= 1:
        raise click.BadParameter(f"{value!r}: give auto or a number between 0 and 1",
                                 param_hint="--interpolate")
    return a


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _print_result(d: dict[str, Any], out: Path, record: Path) -> None:
    acc = d["accuracy"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = [[f"validation ({d['split']['val']} plates)", fmt(acc["val"]["before"]),
             fmt(acc["val"]["after"])],
            ["test/ (evaluated only)", fmt(acc["test"]["before"]), fmt(acc["test"]["after"])]]
    click.echo(table(rows, ["exact-plate accuracy", "pretrained", "fine-tuned"]))
    threads = f"{d['threads']} thread" + ("s" if d["threads"] > 1 else "")
    mixed = d.get("interpolation")
    click.echo(f"best epoch {d['best_epoch']} ({d['stopped']}), {d['seconds']:.0f}s on "
               f"{threads}" + (f"; kept a = {mixed['a']:g} of the way from the pretrained "
                               "weights to it" if mixed else ""))
    click.echo(f"weights: {out}\nrecord:  {record}")


COMMANDS = (finetune_cmd,)
