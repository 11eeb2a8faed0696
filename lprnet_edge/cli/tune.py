"""``lprnet-edge tune`` (fill the tuning database) and ``lprnet-edge bench`` (time an artifact).

The commands are thin: the work is in :func:`tune_model`, :func:`bench_local` and
:func:`bench_rpc` (another way to reach a device, e.g. over SSH, is one more ``bench_*``
function and one more option).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from lprnet_edge.cli.common import check_rpc, rpc_options
from lprnet_edge.cli.device import print_comparison, print_profile, ssh_options_optional
from lprnet_edge.cli.estimate import bench_estimate, estimate_options
from lprnet_edge.runtime.errors import LprnetEdgeError

# ---------------------------------------------------------------- library side


def tune_model(target: str = "host", trials: int = 600, weights: str | None = None,
               trials_per_task: int | None = None, rpc: str | None = None,
               rpc_tracker: str | None = None, rpc_key: str | None = None,
               tuning_db: str | None = None, tasks: tuple[str, ...] = (),
               timeout: float = 60.0, log: Any = None, scheduler: str = "balanced",
               trials_per_iter: int = 16, population_size: int | None = None
               ) -> dict[str, Any]:
    """Import the model as ``lprnet-edge build`` does and tune it into the database."""
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.compiler.tune import tune
    from lprnet_edge.compress.configs import TuneConfig
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.weights import resolve_weights

    check_rpc(rpc, rpc_tracker, rpc_key)
    spec = load_target(target)
    if not (rpc or rpc_tracker) and not spec.is_native:
        raise LprnetEdgeError(
            f"target {spec.name} ({spec.arch}) cannot be measured on this {os.uname().machine} "
            "machine: pass --rpc HOST:PORT or --rpc-tracker HOST:PORT --rpc-key KEY of a device")
    cfg = TuneConfig(trials=trials, trials_per_task=trials_per_task, rpc=rpc,
                     rpc_tracker=rpc_tracker, rpc_key=rpc_key, timeout_s=timeout,
                     db_dir=tuning_db, num_trials_per_iter=trials_per_iter)
    model = load_model(resolve_weights(weights))
    mod, _params = to_relax(model)
    search = None
    if population_size:
        search = {"population_size": population_size,
                  "init_min_unmeasured": min(50, max(8, population_size // 4))}
    _db, summary = tune(mod, spec, cfg, log=log, tasks=list(tasks) or None,
                        scheduler=scheduler, search=search)
    summary["target"] = spec.name
    return summary


def bench_local(artifact: str | Path, runs: int = 200, warmup: int = 20,
                threads: int | None = None, profile: bool = False,
                profile_runs: int = 20, compare: bool = False, rounds: int = 5,
                weights: str | None = None) -> dict[str, Any]:
    """Time an artifact here: Recognizer end to end, model only, and the module through the
    one timing path (:func:`lprnet_edge.compiler.session.time_artifact`, a local session);
    ``profile`` adds the per-kernel table; ``compare`` the side-by-side with ONNX Runtime fp32
    and PyTorch eager at the same thread count (:func:`lprnet_edge.model.onnx.compare_on_host`,
    ``runs`` split over ``rounds`` interleaved rounds)."""
    from lprnet_edge.compiler.session import time_artifact
    from lprnet_edge.runtime.recognizer import Recognizer

    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    rec = Recognizer.from_artifact(artifact, num_threads=threads)
    res: dict[str, Any] = {"artifact": str(artifact), "where": "local",
                           "backend": rec.backend_name, "threads": threads}
    res["end_to_end"] = rec.benchmark(runs=runs, warmup=warmup, include_preprocess=True)
    res["model_only"] = rec.benchmark(runs=runs, warmup=warmup, include_preprocess=False)
    timed = time_artifact(rec.artifact or artifact, repeat=runs, warmup=warmup,
                          threads=threads, profile=profile, profile_runs=profile_runs)
    res["threads"] = timed.timing.threads
    res["time_evaluator"] = timed.timing.to_dict()
    if timed.profile is not None:
        res["profile"] = timed.profile.to_dict()
    if compare:
        from lprnet_edge.model.onnx import compare_on_host

        res["compare"] = compare_on_host(rec.artifact or artifact, threads=res["threads"],
                                         rounds=rounds, runs=max(1, runs // rounds),
                                         warmup=min(warmup, 10), weights=weights)
    return res


def default_compare(weights: str | None = None) -> bool:
    """``bench`` compares with the baselines by default when PyTorch is installed here (it
    exports the ONNX file and runs the eager row) and the weights can be found; a missing ONNX
    Runtime becomes a row that says how to install it. ``--compare`` insists (and errors)."""
    import importlib.util

    try:
        if importlib.util.find_spec("torch") is None:
            return False
    except (ImportError, ValueError):
        return False
    from lprnet_edge.model.weights import resolve_weights
    from lprnet_edge.runtime.errors import WeightsError

    try:
        resolve_weights(weights)
    except WeightsError:
        click.echo("note: no LPRNet weights found, so no ONNX Runtime / PyTorch comparison "
                   "(pass --weights or set LPRNET_EDGE_DATA; --compare to insist)", err=True)
        return False
    return True


def bench_rpc(artifact: str | Path, rpc: str | None = None, rpc_tracker: str | None = None,
              rpc_key: str | None = None, runs: int = 200, warmup: int = 20,
              timeout: float = 30.0, profile: bool = False) -> dict[str, Any]:
    """Upload the artifact's ``model.so`` to an RPC device, send its params, time the entry
    (the same code as locally, on a remote session); ``profile``: each kernel timed there
    too (``LoadedModule.profile_calls``).

    The device side needs only the TVM runtime (``tvm.runtime.vm.VirtualMachine``). Threads
    on the device: start its server with ``TVM_NUM_THREADS=N``.
    """
    from lprnet_edge.compiler.session import open_session, time_artifact
    from lprnet_edge.runtime.artifact import Artifact
    from lprnet_edge.runtime.profile import kernel_table

    art = Artifact.open(artifact, check_arch=False)  # the device's, not this machine's
    if profile:  # refused before connecting when the build recorded no kernel signatures
        kernel_table(art.manifest.records)
    session = open_session(rpc, rpc_tracker, rpc_key, timeout=timeout)
    return time_artifact(art, session, repeat=runs, warmup=warmup, profile=profile,
                         profile_runs=max(3, min(runs, 20))).to_dict()


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
      lprnet-edge tune --target rpi4 --rpc-tracker 127.0.0.1:9190 --rpc-key rpi4
      lprnet-edge build --target host --tune --trials 600     # applies the records
    """
    from lprnet_edge.cli.common import echo_json, table

    summary = tune_model(target, trials, weights, trials_per_task, rpc, rpc_tracker, rpc_key,
                         tuning_db, tasks, timeout, scheduler=scheduler,
                         trials_per_iter=trials_per_iter, population_size=population_size)
    if as_json:
        echo_json(summary)
        return
    rows = [[t["task"], int(t["weight"]), t["records"],
             "-" if t["best_ms"] is None else f"{t['best_ms']:.3f}"]
            for t in summary.get("per_task", [])]
    click.echo(table(rows, ["task", "weight", "records", "best ms"]))

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f} ms"

    click.echo(f"\ntasks tuned        {summary['tasks_tuned']}/{summary['tasks']}"
               + ("  (skipped: enough records)" if summary.get("skipped") else ""))
    click.echo(f"new trials         {summary['trials_new']} "
               f"({summary['records_total']} records for this model)")
    click.echo(f"tuning time        {summary['tune_s']:.0f} s")
    click.echo(f"est. latency       {ms(summary['est_ms_before'])} -> "
               f"{ms(summary['est_ms_after'])} (sum of the tuned kernels)")
    click.echo(f"database           {summary['db_dir']}")


@click.command("bench")
@click.option("--artifact", type=click.Path(exists=True, file_okay=False),
              help="Artifact directory built by `lprnet-edge build` (with --host: optional, "
                   "checked against the deployed one).")
@rpc_options
@click.option("--runs", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--threads", type=click.IntRange(min=1),
              help="Runtime threads (local; for RPC start the server with TVM_NUM_THREADS).")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds allowed to reach the RPC device (its server starts a process "
                   "per session).")
@click.option("--tunnel", is_flag=True,
              help="With --host: time the model with time_evaluator through a TVM RPC server "
                   "started on the device and reached through an SSH tunnel (model only).")
@click.option("--profile", is_flag=True,
              help="Also time every kernel: ms, share, calls, GFLOP/s of the convolutions, "
                   "tuned or default schedule. Here and on a board with --host (VM "
                   "instrument), or over --rpc (each kernel called on the device).")
@click.option("--compare/--no-compare", default=None,
              help="Also time ONNX Runtime fp32 and PyTorch eager (denormals flushed) on the "
                   "fp32 original, interleaved with the artifact at the same thread count, "
                   "and print the artifact's speed-ups. With --host: ONNX Runtime on the "
                   "board (when installed in its venv). Default: on when PyTorch is installed.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved rounds of the comparison (--runs are split over them).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="PyTorch weights the baselines run (default: resolved like every command; "
                   "checked against the artifact's source weights).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@estimate_options
@ssh_options_optional
def bench_cmd(artifact: str | None, rpc: str | None, rpc_tracker: str | None, rpc_key: str | None,
              runs: int, warmup: int, threads: int | None, timeout: float, tunnel: bool,
              profile: bool, compare: bool | None, rounds: int, weights: str | None,
              as_json: bool, estimate: bool, cpu: str | None, **ssh: Any) -> None:
    """Latency of an artifact at batch 1: here, or on a device through TVM RPC.

    Locally: the Recognizer with and without pre/post-processing, and TVM's time_evaluator
    on the module. Over RPC: model.so is uploaded, its params sent, and time_evaluator runs
    on the device.

    Side by side (--compare, default when PyTorch is installed): the artifact's model next to
    ONNX Runtime fp32 and PyTorch eager on the fp32 original, same input, same threads,
    timed in interleaved rounds, with the artifact's speed-up over each. On a board (--host)
    the ONNX file is uploaded and timed there (pip install onnxruntime in its venv).

    \b
    Examples:
      lprnet-edge bench --artifact build/lprnet-host --threads 1
      lprnet-edge bench --artifact build/lprnet-rpi4 --rpc 192.168.1.20:9090 --runs 500
      lprnet-edge bench --host pi@raspberrypi.local      # the deployed model, over SSH
      lprnet-edge bench --host pi@raspberrypi.local --tunnel --artifact build/lprnet-rpi4
      lprnet-edge bench --artifact build/lprnet-host --profile     # per-kernel table
      lprnet-edge bench --host pi@raspberrypi.local --profile      # ... on the board
      lprnet-edge bench --artifact build/lprnet-host --threads 1 --no-compare
      lprnet-edge bench --artifact build/lprnet-rpi4 --estimate   # est. Cortex-A72 cycles
    """
    from lprnet_edge.cli.common import echo_json, format_latency

    if estimate:  # counted under qemu, weighed with llvm-mca (lprnet_edge.cli.estimate)
        explicit = click.get_current_context().get_parameter_source("runs")
        return bench_estimate(artifact, cpu, runs if explicit.name != "DEFAULT" else 1,
                              as_json, ssh)

    if ssh.get("host"):  # on a device over SSH (lprnet_edge.cli.device)
        from lprnet_edge.cli.device import bench_over_ssh, print_bench

        if rpc or rpc_tracker:
            raise click.UsageError("--host reaches the device over SSH: drop --rpc/--rpc-tracker "
                                   "(--tunnel times it through an RPC server started there)")
        if tunnel and profile:
            raise LprnetEdgeError("--profile runs on the board through its agent, not over "
                                  "RPC: drop --tunnel (lprnet-edge bench --host USER@HOST "
                                  "--profile)")
        if tunnel and compare:
            raise click.UsageError("--compare runs on the board through its agent, not over "
                                   "RPC: drop --tunnel")
        if compare is None:
            compare = not tunnel and default_compare(weights)
        print_bench(bench_over_ssh(ssh, rpc=tunnel, artifact=artifact, runs=runs,
                                   warmup=warmup, threads=threads, profile=profile,
                                   compare=compare, rounds=rounds, weights=weights), as_json)
        return
    if tunnel:
        raise click.UsageError("--tunnel goes with --host (the device to start the server on)")
    if not artifact:
        raise click.UsageError("give --artifact (or --host to time the model deployed there)")
    check_rpc(rpc, rpc_tracker, rpc_key)
    if (rpc or rpc_tracker) and compare:
        raise click.UsageError("--compare runs here or on a board over SSH (--host USER@HOST), "
                               "not over --rpc")
    if rpc or rpc_tracker:
        res = bench_rpc(artifact, rpc, rpc_tracker, rpc_key, runs, warmup, timeout,
                        profile=profile)
    else:
        res = bench_local(artifact, runs, warmup, threads, profile=profile,
                          profile_runs=max(1, min(runs, 20)),
                          compare=default_compare(weights) if compare is None else compare,
                          rounds=rounds, weights=weights)
    if as_json:
        echo_json(res)
        return
    click.echo(f"artifact  {res['artifact']}  ({res['where']})")
    for key, label in (("end_to_end", "Recognizer, with pre/post-processing"),
                       ("model_only", "Recognizer, model only"),
                       ("time_evaluator", "TVM time_evaluator (module)")):
        if key in res:
            click.echo(f"\n{label}:\n{format_latency(res[key])}")
    print_profile(res.get("profile"))
    print_comparison(res.get("compare"))


COMMANDS = (tune_cmd, bench_cmd)
