"""``lprnet-edge tune``: fill the tuning database a build then applies.

The command is thin: :func:`tune_model` imports the model as ``build`` does and calls
:func:`lprnet_edge.compiler.tuning.tune`; the command prints its summary.
"""

from __future__ import annotations

import os
from typing import Any

import click

from lprnet_edge.cli.common import check_rpc, echo_json, rpc_options, table
from lprnet_edge.compiler.target import load_target
from lprnet_edge.compiler.tuning import TuneConfig, TuneOptions, TuningSummary, tune
from lprnet_edge.model.weights import resolve_weights
from lprnet_edge.runtime.errors import LprnetEdgeError

# ---------------------------------------------------------------- library side


def tune_model(target: str, config: TuneConfig, weights: str | None = None,
               options: TuneOptions | None = None, log: Any = None) -> TuningSummary:
    """Import the model as ``lprnet-edge build`` does and tune it into the database."""
    # PyTorch and the TVM frontend load only when a command tunes: `--help` stays fast.
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.model.checkpoint import load_model

    check_rpc(config.rpc, config.rpc_tracker, config.rpc_key)
    spec = load_target(target)
    if not (config.rpc or config.rpc_tracker) and not spec.is_native and spec.arch != "aarch64":
        raise LprnetEdgeError(
            f"target {spec.name} ({spec.arch}) cannot be measured on this {os.uname().machine} "
            "machine: pass --rpc HOST:PORT or --rpc-tracker HOST:PORT --rpc-key KEY of a device")
    model = load_model(resolve_weights(weights))
    mod, _params = to_relax(model)
    _db, summary = tune(mod, spec, config, log=log, options=options)
    return summary


def search_options(population_size: int | None) -> dict[str, Any]:
    """EvolutionarySearch options for a smaller population (empty: MetaSchedule's own)."""
    if not population_size:
        return {}
    return {"population_size": population_size,
            "init_min_unmeasured": min(50, max(8, population_size // 4))}


def print_summary(summary: TuningSummary) -> None:
    rows = [[t.task, int(t.weight), t.records, "-" if t.best_ms is None else f"{t.best_ms:.3f}"]
            for t in summary.per_task]
    click.echo(table(rows, ["task", "weight", "records", "best ms"]))
    click.echo(f"\ntasks tuned        {summary.tasks_tuned}/{summary.tasks}"
               + ("  (skipped: enough records)" if summary.skipped else ""))
    click.echo(f"new trials         {summary.trials_new} "
               f"({summary.records_total} records for this model)")
    click.echo(f"tuning time        {summary.tune_s:.0f} s")
    click.echo(f"est. latency       {summary.est_before.text()} -> {summary.est_after.text()} "
               "(calls x fastest time per task, tuned or packaged default)")
    if summary.estimated:
        click.echo(f"                   every time is {summary.estimated}: qemu + llvm-mca, "
                   "not measured on a board")
    click.echo(f"database           {summary.db_dir}")


# ---------------------------------------------------------------- commands


@click.command("tune")
@click.option("--target", default="host", show_default=True,
              help="Target name (lprnet-edge targets) or a .toml path.")
@click.option("--trials", type=click.IntRange(min=1), default=600, show_default=True,
              help="Total measured candidates wanted (records already in the database count).")
@click.option("--trials-per-task", type=click.IntRange(min=1),
              help="Cap per task (tasks that have this many records are skipped).")
@rpc_options
@click.option("--tuning-db", type=click.Path(file_okay=False),
              help="Database directory (default: the cache, keyed by target and model).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="PyTorch weights (default: $LPRNET_EDGE_WEIGHTS, $LPRNET_EDGE_DATA, cache).")
@click.option("--task", "tasks", multiple=True, metavar="SUBSTRING",
              help="Only tune tasks whose name contains SUBSTRING (repeatable), e.g. conv2d.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds allowed to build or run one candidate (and to reach the device).")
@click.option("--scheduler", type=click.Choice(["balanced", "gradient", "round-robin"]),
              default="balanced", show_default=True,
              help="balanced: a first round for every task (heaviest first), then the rest of "
                   "the budget by FLOPs x calls; gradient / round-robin: MetaSchedule's own.")
@click.option("--trials-per-iter", type=click.IntRange(min=1), default=16, show_default=True,
              help="Candidates measured per batch.")
@click.option("--population-size", type=click.IntRange(min=8),
              help="Evolutionary search population (MetaSchedule's default: 512). Smaller "
                   "searches faster per batch and finds worse schedules.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def tune_cmd(target: str, trials: int, trials_per_task: int | None, rpc: str | None,
             rpc_tracker: str | None, rpc_key: str | None, tuning_db: str | None,
             weights: str | None, tasks: tuple[str, ...], timeout: float, scheduler: str,
             trials_per_iter: int, population_size: int | None, as_json: bool) -> None:
    """Tune the model with MetaSchedule and fill the tuning database (build reuses it).

    Records are saved as they are measured: after Ctrl-C or a crash the same command resumes.
    Running it again with the same --trials measures nothing.

    \b
    Examples:
      lprnet-edge tune --target host --trials 600
      lprnet-edge tune --target rpi4 --trials 300 --rpc 192.168.1.20:9090
      lprnet-edge tune --target rpi4 --trials 300   # no board: estimated A72 cycles
      lprnet-edge tune --target rpi4 --rpc-tracker 127.0.0.1:9190 --rpc-key rpi4
      lprnet-edge build --target host --tune --trials 600     # applies the records
    """
    config = TuneConfig(trials=trials, trials_per_task=trials_per_task, rpc=rpc,
                        rpc_tracker=rpc_tracker, rpc_key=rpc_key, timeout_s=timeout,
                        db_dir=tuning_db, num_trials_per_iter=trials_per_iter)
    options = TuneOptions(tasks=list(tasks) or None, scheduler=scheduler,
                          search=search_options(population_size))
    summary = tune_model(target, config, weights, options)
    if as_json:
        echo_json({**summary.to_dict(), "target": load_target(target).name})
        return
    print_summary(summary)


COMMANDS = (tune_cmd,)
