"""``lprnet-edge report`` and ``lprnet-edge compress``: the compression commands."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from lprnet_edge.cli.common import out_option

# The report's default folder, without importing the report (torch) for --help.
DEFAULT_OUT = "lprnet-edge-report"


def _command(ctx: click.Context) -> str:
    """The command as given (options from the command line only), quoted for a shell: the
    report records it at its top so that it can be run again as written."""
    from click.core import ParameterSource

    parts = ["lprnet-edge", ctx.info_name or "report"]
    for p in ctx.command.params:
        if (not isinstance(p, click.Option) or p.name is None
                or ctx.get_parameter_source(p.name) != ParameterSource.COMMANDLINE):
            continue
        value = ctx.params[p.name]
        flag = max(p.opts, key=len)
        if p.is_flag:
            parts.append(flag)
        elif p.multiple:
            parts += [f"{flag} {shlex.quote(str(v))}" for v in value]
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def _echo_report(rep: dict) -> None:
    """One line per variant, then one per goal (met / missed / not evaluated, and why)."""
    for r in rep["variants"]:
        lat = (f"{r['latency_ms']:6.2f} ms ({r['latency_backend']})"
               if r.get("latency_ms") is not None
               else f"n/a: {r.get('latency_error', 'not measured')}")
        if r.get("latency_comparable") is False:
            lat += " [unequal tuning: not compared]"
        click.echo(f"{r['name']:<38} acc {r['test_accuracy']:.3f} "
                   f"({r['accuracy_change_points']:+.1f} pt)  "
                   f"{r['stored_bytes'] / 1e3:7.1f} kB  {r['flops'] / 1e6:6.0f} MFLOPs"
                   f" ({_mflops(r.get('flops_executed'))} executed)  {lat}")
    for g in rep["goals"].values():
        if isinstance(g, dict) and "status" in g:
            click.echo(f"goal {g['goal']}: {g['status']}: {g['detail']}")


def _mflops(flops: float | None) -> str:
    return "-" if flops is None else f"{flops / 1e6:.0f}"


@click.command("report")
@out_option("Folder for compression-report.md/.json/.png (the repository's docs/ are "
            "regenerated on purpose with --out docs).", default=DEFAULT_OUT, show_default=True)
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
              help="Measure latency with PyTorch eager or TVM host artifacts (tuned with "
                   "--trials).")
@click.option("--trials", type=click.IntRange(min=0), default=200, show_default=True,
              help="With --latency tvm: MetaSchedule trials per workload, spent on the "
                   "convolutions by the build's tune stage, the same for every variant (a "
                   "tuning database of the report's own per budget; 0: no variant is tuned, "
                   "every kernel gets the packaged default schedules, transferred to new "
                   "shapes).")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved latency rounds (the median of the per-round medians).")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed runs per variant and round.")
@click.option("--refresh-latency", is_flag=True,
              help="Only re-measure the latency column of the report in --out (keeps the "
                   "accuracy, size and FLOPs columns).")
@click.option("--variant", "variants", multiple=True, metavar="NAME",
              help="With --refresh-latency: only these variants (repeatable).")
@click.option("--calibrators", is_flag=True,
              help="Measure the int8 calibrators (minmax, percentile, entropy, mse) on "
                   "test/ and add them to the report in --out.")
@click.option("--goals", "goals_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML file of [[goal]] tables to check the variants against (met / "
                   "missed, by how much), e.g. benchmarks/compression-goals.toml. A refresh "
                   "re-checks the goals the report was given.")
@click.pass_context
def report_cmd(ctx: click.Context, out: str, quick: bool, weights: str | None,
               calib_dir: str | None, test_dir: str | None, latency: str, trials: int,
               rounds: int, runs: int, refresh_latency: bool, variants: tuple[str, ...],
               calibrators: bool, goals_file: str | None) -> None:
    """Compression report: accuracy on test/, stored size, FLOPs, latency per variant.

    \b
    Examples:
      lprnet-edge report --quick
      lprnet-edge report --latency tvm --trials 0 --goals benchmarks/compression-goals.toml
      # the repository's docs/compression-report.md, regenerated on purpose:
      lprnet-edge report -o docs --latency tvm --trials 0 --goals benchmarks/compression-goals.toml
      lprnet-edge report --refresh-latency --latency tvm --trials 0 --variant int8-sim
      lprnet-edge report --calibrators
    """
    from click.core import ParameterSource

    from lprnet_edge.report import calibrators as calibrators_report
    from lprnet_edge.report import variants as variants_report
    from lprnet_edge.report.goals import load_goals

    if (latency != "tvm"
            and ctx.get_parameter_source("trials") == ParameterSource.COMMANDLINE):
        raise click.UsageError("--trials applies to --latency tvm")
    if variants and not refresh_latency:
        raise click.UsageError("--variant applies to --refresh-latency")
    has_report = (Path(out) / "compression-report.json").is_file()
    if (refresh_latency or calibrators) and not has_report:
        raise click.UsageError(f"no compression-report.json in {out}: run `lprnet-edge "
                               "report` first")
    command = _command(ctx)
    goals = load_goals(goals_file) if goals_file else None
    n_trials = trials if latency == "tvm" and trials > 0 else None
    if calibrators:
        rep = calibrators_report.refresh_calibrators(out, weights=weights, calib_dir=calib_dir,
                                                     test_dir=test_dir, command=command)
        for r in rep["calibrators"]["rows"]:
            click.echo(f"{r['calibrator']:<11} head {'fp32' if r['head_fp32'] else 'int8'}"
                       f"  acc {r['test_accuracy']:.3f} "
                       f"({r['accuracy_change_points']:+.1f} pt)  agreement "
                       f"{r['agreement_with_original']:.3f}")
    if refresh_latency:
        rep = variants_report.refresh_latency(out, latency=latency, trials=n_trials,
                                              rounds=rounds, runs=runs, only=variants or None,
                                              weights=weights, calib_dir=calib_dir,
                                              command=command, goals=goals)
    elif not calibrators:
        rep = variants_report.run_report(out, quick=quick, weights=weights,
                                         calib_dir=calib_dir, test_dir=test_dir,
                                         latency=latency, trials=n_trials, rounds=rounds,
                                         runs=runs, command=command, goals=goals)
    if refresh_latency or not calibrators:
        _echo_report(rep)
    click.echo(f"wrote {Path(out) / 'compression-report.md'} (.json, .png)")


@click.command("compress")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Output checkpoint (.pth) with widths metadata.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="PyTorch checkpoint to prune (default: the pretrained weights, resolved "
                   "like every command).")
@click.option("--calib", "calib_dir", type=click.Path(exists=True, file_okay=False),
              help="Images the channel pruning distills on (default: $LPRNET_EDGE_DATA/calib). "
                   "Never test/.")
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True),
              help="Unstructured global magnitude pruning to this sparsity.")
@click.option("--channels", "ratio", type=click.FloatRange(0, 1, max_open=True),
              help="Channel pruning ratio of the block-internal widths (+ dead channels), "
                   "recovered by distillation on calib/.")
@click.option("--epochs", type=click.IntRange(min=0), default=8, show_default=True,
              help="With --channels: distillation epochs on calib/ (0: prune only).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the calib/ train/validation split and the distillation (the same "
                   "seed gives the same checkpoint).")
def compress_cmd(out: str, weights: str | None, calib_dir: str | None,
                 sparsity: float | None, ratio: float | None, epochs: int,
                 seed: int) -> None:
    """Prune (and distill) a checkpoint; build it with `lprnet-edge build --weights OUT`.

    \b
    Examples:
      lprnet-edge compress --channels 0.5 --out lprnet-ch50.pth
      lprnet-edge compress --sparsity 0.8 --out lprnet-sp80.pth
    """
    from lprnet_edge.compress.configs import PruneConfig
    from lprnet_edge.compress.prune import prune
    from lprnet_edge.model.calib import CalibrationSet
    from lprnet_edge.model.checkpoint import load_model, save_checkpoint
    from lprnet_edge.model.weights import resolve_weights
    from lprnet_edge.runtime.errors import LprnetEdgeError

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


COMMANDS = (report_cmd, compress_cmd)
