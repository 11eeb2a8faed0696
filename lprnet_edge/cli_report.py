"""``lprnet-edge report`` and ``lprnet-edge compress``: the compression commands."""

from __future__ import annotations

import json
from pathlib import Path

import click


def register(cli: click.Group) -> None:
    @cli.command("report")
    @click.option("--out", type=click.Path(file_okay=False), default="docs", show_default=True,
                  help="Folder for compression-report.md/.json/.png.")
    @click.option("--quick", is_flag=True,
                  help="Fewer variants, a short distillation, no selection table.")
    @click.option("--weights", type=click.Path(exists=True, dir_okay=False),
                  help="PyTorch weights (default: resolved like every command).")
    @click.option("--calib", "calib_dir", type=click.Path(exists=True, file_okay=False),
                  help="Calibration folder (default: $LPRNET_EDGE_DATA/calib). Never test/.")
    @click.option("--test", "test_dir", type=click.Path(exists=True, file_okay=False),
                  help="Evaluation folder (default: $LPRNET_EDGE_DATA/test).")
    @click.option("--latency", type=click.Choice(["torch", "tvm"]), default="torch",
                  show_default=True,
                  help="Measure latency with PyTorch eager or compiled (untuned) TVM artifacts.")
    def report_cmd(out: str, quick: bool, weights: str | None, calib_dir: str | None,
                   test_dir: str | None, latency: str) -> None:
        """Compression report: accuracy on test/, stored size, FLOPs, latency per variant.

        \b
        Examples:
          lprnet-edge report --quick
          lprnet-edge report --out docs/ --latency tvm
        """
        from lprnet_edge.report import run_report

        rep = run_report(out, quick=quick, weights=weights, calib_dir=calib_dir,
                         test_dir=test_dir, latency=latency)
        for r in rep["variants"]:
            click.echo(f"{r['name']:<38} acc {r['test_accuracy']:.3f} "
                       f"({r['accuracy_change_points']:+.1f} pt)  "
                       f"{r['stored_bytes'] / 1e3:7.1f} kB  {r['flops'] / 1e6:6.0f} MFLOPs  "
                       f"{r['latency_ms']:6.2f} ms ({r['latency_backend']})")
        click.echo(f"wrote {Path(out) / 'compression-report.md'} (.json, .png)")

    @cli.command("compress")
    @click.option("--out", required=True, type=click.Path(dir_okay=False),
                  help="Output checkpoint (.pth) with widths metadata.")
    @click.option("--weights", type=click.Path(exists=True, dir_okay=False))
    @click.option("--calib", "calib_dir", type=click.Path(exists=True, file_okay=False))
    @click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True),
                  help="Unstructured global magnitude pruning to this sparsity.")
    @click.option("--channels", "ratio", type=click.FloatRange(0, 1, max_open=True),
                  help="Channel pruning ratio of the block-internal widths (+ dead channels), "
                       "recovered by distillation on calib/.")
    @click.option("--epochs", type=click.IntRange(min=0), default=8, show_default=True)
    @click.option("--seed", type=int, default=0, show_default=True)
    def compress_cmd(out: str, weights: str | None, calib_dir: str | None,
                     sparsity: float | None, ratio: float | None, epochs: int,
                     seed: int) -> None:
        """Prune (and distill) a checkpoint; build it with `lprnet-edge build --weights OUT`.

        \b
        Examples:
          lprnet-edge compress --channels 0.5 --out lprnet-ch50.pth
          lprnet-edge compress --sparsity 0.8 --out lprnet-sp80.pth
        """
        from lprnet_edge.calib import CalibrationSet
        from lprnet_edge.configs import PruneConfig
        from lprnet_edge.errors import LprnetEdgeError
        from lprnet_edge.model_io import load_model, save_checkpoint
        from lprnet_edge.prune import prune
        from lprnet_edge.weights import resolve_weights

        if (sparsity is None) == (ratio is None):
            raise LprnetEdgeError("give exactly one of --sparsity or --channels")
        model = load_model(resolve_weights(weights))
        if sparsity is not None:
            cfg = PruneConfig(kind="unstructured", sparsity=sparsity, seed=seed)
            calib = None
        else:
            cfg = PruneConfig(kind="channels", ratio=ratio, distill_epochs=epochs, seed=seed)
            calib = CalibrationSet.load(calib_dir, keep_raw=True)
        pm, rep = prune(model, cfg, calib)
        save_checkpoint(pm, out, compression=json.dumps(
            {k: v for k, v in rep.items() if k not in ("layers",)}, default=str))
        keys = ("global_sparsity", "flops_reduction", "val_accuracy_original",
                "val_accuracy_pruned", "val_accuracy_distilled")
        for k in keys:
            if k in rep:
                click.echo(f"{k:<24} {rep[k]:.4f}")
        click.echo(f"wrote {out}")
