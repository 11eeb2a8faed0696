"""``lprnet-edge bench``: the latency of an artifact, here, over TVM RPC, or on a board over SSH.

The command is thin: :func:`bench_options` parses, :class:`BenchRequest` holds what was asked,
:func:`check_request` refuses contradictions, :func:`run_bench` picks the way to the device
(:func:`bench_local`, :func:`bench_rpc`, or ``cli.device.bench_over_ssh``) and
:func:`print_result` formats. Another way of timing is one more option in
:func:`bench_options`, one more field and one more branch in :func:`run_bench`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from lprnet_edge.cli.common import (
    check_rpc,
    echo_json,
    format_latency,
    print_comparison,
    print_profile,
    rpc_options,
    ssh_options_optional,
)
from lprnet_edge.cli.device import bench_over_ssh, print_bench
from lprnet_edge.cli.estimate import bench_estimate, estimate_options
from lprnet_edge.compiler.session import open_session, time_artifact
from lprnet_edge.device.remote import DeviceBench
from lprnet_edge.model.weights import resolve_weights
from lprnet_edge.runtime.artifact import Artifact
from lprnet_edge.runtime.errors import LprnetEdgeError, WeightsError
from lprnet_edge.runtime.profile import kernel_table
from lprnet_edge.runtime.recognizer import Recognizer

# ---------------------------------------------------------------- library side


def bench_local(artifact: str | Path, runs: int = 200, warmup: int = 20,
                threads: int | None = None, profile: bool = False,
                profile_runs: int = 20, compare: bool = False, rounds: int = 5,
                weights: str | None = None) -> dict[str, Any]:
    """Time an artifact here: Recognizer end to end, model only, and the module through the
    one timing path (:func:`lprnet_edge.compiler.session.time_artifact`, a local session);
    ``profile`` adds the per-kernel table; ``compare`` the side-by-side with ONNX Runtime fp32
    and PyTorch eager at the same thread count (:func:`lprnet_edge.model.onnx.compare_on_host`,
    ``runs`` split over ``rounds`` interleaved rounds)."""
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
        # PyTorch and ONNX Runtime are loaded only when a comparison is asked for.
        from lprnet_edge.model.onnx import compare_on_host

        res["compare"] = compare_on_host(rec.artifact or artifact, threads=res["threads"],
                                         rounds=rounds, runs=max(1, runs // rounds),
                                         warmup=min(warmup, 10), weights=weights)
    return res


def default_compare(weights: str | None = None) -> bool:
    """``bench`` compares with the baselines by default when PyTorch is installed here (it
    exports the ONNX file and runs the eager row) and the weights can be found; a missing ONNX
    Runtime becomes a row that says how to install it. ``--compare`` insists (and errors)."""
    try:
        if importlib.util.find_spec("torch") is None:
            return False
    except (ImportError, ValueError):
        return False
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
    art = Artifact.open(artifact, check_arch=False)  # the device's, not this machine's
    if profile:  # refused before connecting when the build recorded no kernel signatures
        kernel_table(art.manifest.records)
    session = open_session(rpc, rpc_tracker, rpc_key, timeout=timeout)
    return time_artifact(art, session, repeat=runs, warmup=warmup, profile=profile,
                         profile_runs=max(3, min(runs, 20))).to_dict()


# ---------------------------------------------------------------- the command


@dataclass(frozen=True)
class BenchRequest:
    """What ``bench`` was asked for, as parsed from its options."""

    artifact: str | None = None
    rpc: str | None = None
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    runs: int = 200
    warmup: int = 20
    threads: int | None = None
    timeout: float = 60.0
    tunnel: bool = False
    profile: bool = False
    compare: bool | None = None  # None: on when PyTorch and the weights are here
    rounds: int = 5
    weights: str | None = None
    ssh: dict[str, Any] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return bool(self.rpc or self.rpc_tracker)


def bench_options(fn: Callable) -> Callable:
    """The options of ``bench``, in the order ``--help`` shows them."""
    opts = [
        click.option("--artifact", type=click.Path(exists=True, file_okay=False),
                     help="Artifact directory built by `lprnet-edge build` (with --host: "
                          "optional, checked against the deployed one)."),
        rpc_options,
        click.option("--runs", type=click.IntRange(min=1), default=200, show_default=True,
                     help="Timed runs of each measurement (percentiles are over them)."),
        click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True,
                     help="Untimed runs before each measurement (caches, thread pool)."),
        click.option("--threads", type=click.IntRange(min=1),
                     help="Runtime threads (local; for RPC start the server with "
                          "TVM_NUM_THREADS)."),
        click.option("--timeout", type=float, default=60.0, show_default=True,
                     help="Seconds allowed to reach the RPC device (its server starts a "
                          "process per session)."),
        click.option("--tunnel", is_flag=True,
                     help="With --host: time the model with time_evaluator through a TVM RPC "
                          "server started on the device and reached through an SSH tunnel "
                          "(model only)."),
        click.option("--profile", is_flag=True,
                     help="Also time every kernel: ms, share, calls, GFLOP/s of the "
                          "convolutions, tuned or default schedule. Here and on a board with "
                          "--host (VM instrument), or over --rpc (each kernel called on the "
                          "device)."),
        click.option("--compare/--no-compare", default=None,
                     help="Also time ONNX Runtime fp32 and PyTorch eager (denormals flushed) "
                          "on the fp32 original, in rounds with the artifact at the same "
                          "thread count (above one thread each runtime in a process of its "
                          "own), and print the artifact's speed-ups. With --host: "
                          "ONNX Runtime on the board (when installed in its venv). Default: "
                          "on when PyTorch is installed."),
        click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Rounds of the comparison (--runs are split over them)."),
        click.option("--weights", type=click.Path(exists=True, dir_okay=False),
                     help="PyTorch weights the baselines run (default: resolved like every "
                          "command; checked against the artifact's source weights)."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text."),
        ssh_options_optional,
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def check_request(req: BenchRequest) -> None:
    """Refuse option combinations that name two ways to the device or a mode it lacks."""
    if req.ssh.get("host"):
        if req.remote:
            raise click.UsageError("--host reaches the device over SSH: drop --rpc/--rpc-tracker "
                                   "(--tunnel times it through an RPC server started there)")
        if req.tunnel and req.profile:
            raise LprnetEdgeError("--profile runs on the board through its agent, not over "
                                  "RPC: drop --tunnel (lprnet-edge bench --host USER@HOST "
                                  "--profile)")
        if req.tunnel and req.compare:
            raise click.UsageError("--compare runs on the board through its agent, not over "
                                   "RPC: drop --tunnel")
        return
    if req.tunnel:
        raise click.UsageError("--tunnel goes with --host (the device to start the server on)")
    if not req.artifact:
        raise click.UsageError("give --artifact (or --host to time the model deployed there)")
    check_rpc(req.rpc, req.rpc_tracker, req.rpc_key)
    if req.remote and req.compare:
        raise click.UsageError("--compare runs here or on a board over SSH (--host USER@HOST), "
                               "not over --rpc")


def run_bench(req: BenchRequest) -> dict[str, Any] | DeviceBench:
    """Time what ``req`` names: on a board over SSH, over RPC, or here."""
    if req.ssh.get("host"):
        compare = req.compare
        if compare is None:
            compare = not req.tunnel and default_compare(req.weights)
        return bench_over_ssh(req.ssh, rpc=req.tunnel, artifact=req.artifact, runs=req.runs,
                              warmup=req.warmup, threads=req.threads, profile=req.profile,
                              compare=compare, rounds=req.rounds, weights=req.weights)
    assert req.artifact is not None  # check_request
    if req.remote:
        return bench_rpc(req.artifact, req.rpc, req.rpc_tracker, req.rpc_key, req.runs,
                         req.warmup, req.timeout, profile=req.profile)
    compare = default_compare(req.weights) if req.compare is None else req.compare
    return bench_local(req.artifact, req.runs, req.warmup, req.threads, profile=req.profile,
                       profile_runs=max(1, min(req.runs, 20)), compare=compare,
                       rounds=req.rounds, weights=req.weights)


def print_result(res: dict[str, Any], as_json: bool) -> None:
    """The latency tables, then the per-kernel profile and the comparison when present."""
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


@click.command("bench")
@bench_options
@estimate_options
def bench_cmd(as_json: bool, estimate: bool, cpu: str | None, **options: Any) -> None:
    """Latency of an artifact at batch 1: here, or on a device through TVM RPC.

    Locally: the Recognizer with and without pre/post-processing, and TVM's time_evaluator
    on the module. Over RPC: model.so is uploaded, its params sent, and time_evaluator runs
    on the device.

    Side by side (--compare, default when PyTorch is installed): the artifact's model next to
    ONNX Runtime fp32 and PyTorch eager on the fp32 original, same input, same threads,
    timed in alternating rounds, with the artifact's speed-up over each; above one thread
    each runtime runs in a process of its own (spinning thread pools sharing a process slow
    each other). On a board (--host)
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
    fields_ = set(BenchRequest.__dataclass_fields__)
    if estimate:  # counted under qemu, weighed with llvm-mca (lprnet_edge.cli.estimate)
        explicit = click.get_current_context().get_parameter_source("runs")
        bench_estimate(options.get("artifact"), cpu,
                       options["runs"] if explicit.name != "DEFAULT" else 1, as_json,
                       {k: v for k, v in options.items() if k not in fields_})
        return
    req = BenchRequest(**{k: v for k, v in options.items() if k in fields_},
                       ssh={k: v for k, v in options.items() if k not in fields_})
    check_request(req)
    res = run_bench(req)
    if isinstance(res, DeviceBench):
        print_bench(res, as_json)
    else:
        print_result(res, as_json)


COMMANDS = (bench_cmd,)
