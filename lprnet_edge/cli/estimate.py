"""``lprnet-edge bench --estimate``: estimated cycles per plate on a board's core, no board.

Small pieces so that the ``bench`` command (wherever it lives) takes them with three lines:
the :func:`estimate_options` decorator, and ``if estimate: return bench_estimate(...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from lprnet_edge.cli.common import echo_json, table
from lprnet_edge.compiler.cost.cpus import CPUS, TARGET_CPU, CpuModel, cpu_model
from lprnet_edge.compiler.cost.estimate import CostEstimate, artifact_program, estimate_cycles
from lprnet_edge.compiler.cost.plugin import find_tools
from lprnet_edge.runtime.artifact import load_manifest
from lprnet_edge.runtime.errors import LprnetEdgeError

KERNEL_ROWS = 15


def estimate_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--estimate`` and ``--cpu`` for the bench command."""
    f = click.option("--cpu", type=click.Choice([*sorted(CPUS), "host"]),
                     help="Core to estimate for (default: the artifact's target: rpi4 "
                          "cortex-a72, rpi5 cortex-a76; host: this x86 CPU, up to AVX2).")(f)
    return click.option(
        "--estimate", is_flag=True,
        help="Estimated cycles per plate on one core of the board's CPU, without the board: "
             "the model runs under qemu with a counting plugin and every executed block is "
             "weighed with llvm-mca (1 thread; --runs inferences counted, default 1). With "
             "--host: counted on that (emulated) board, weighed here.")(f)


def resolve_cpu(artifact: str | None, cpu: str | None) -> CpuModel:
    """``--cpu``, else the core of the artifact's target (rpi4, rpi5)."""
    if cpu:
        return cpu_model(cpu)
    if artifact:
        target = load_manifest(artifact).target
        name = TARGET_CPU.get(target.name) or (target.tvm or {}).get("mcpu")
        if name in CPUS:
            return CPUS[name]
        if target.arch == "x86_64":
            return cpu_model("host")
    raise click.UsageError("say which core to estimate for: --cpu cortex-a72|cortex-a76")


def bench_estimate(artifact: str | None, cpu: str | None, runs: int, as_json: bool,
                   ssh: dict[str, Any]) -> None:
    """Estimate locally (``--artifact``) or on the board of ``ssh["host"]``, and print it."""
    model = resolve_cpu(artifact, cpu)
    if ssh.get("host"):
        from lprnet_edge.cli.device import device_from
        from lprnet_edge.device.cost import remote_estimate

        with device_from(ssh) as dev:
            est = remote_estimate(dev, model, runs=runs, artifact=artifact)
    elif artifact:
        if load_manifest(artifact).target.arch != model.arch:
            raise LprnetEdgeError(f"{artifact} is not built for {model.arch} ({model.name}): "
                                  "build it with --target rpi4 or rpi5")
        find_tools(model.arch)  # first: a missing qemu/plugin/llvm-mca says to run set-up
        est = estimate_cycles(artifact_program(artifact, model, runs=runs), model)
    else:
        raise click.UsageError("give --artifact (or --host to estimate the model deployed there)")
    if as_json:
        echo_json(est.to_dict())
    else:
        click.echo(format_estimate(est))


def format_estimate(est: CostEstimate, rows: int = KERNEL_ROWS) -> str:
    """The estimate as text: per plate, then the costliest kernels, then what is left out."""
    clocks = ", ".join(f"{est.ms_at(g):.2f} ms at {g:g} GHz" for g in est.cpu.clocks_ghz)
    where = est.guest.get("where", "here, under qemu")
    lines = [
        f"{est.label}: estimated on one {est.cpu.name} core ({est.cpu.board}), {where}; "
        f"1 thread, {est.runs} run(s) counted",
        f"instructions / plate           {est.instructions / 1e6:.2f} M",
        f"estimated cycles / plate       {est.cycles / 1e6:.2f} M  (IPC {est.ipc:.2f})",
        f"estimated time / plate         {clocks}",
        f"blocks weighed                 {est.blocks}"
        + (f" ({est.substituted} instructions llvm-mca could not read, weighed as nop)"
           if est.substituted else ""),
    ]
    if est.kernels:
        g = est.cpu.clocks_ghz[0] if est.cpu.clocks_ghz else 1.0
        body = [[k.name[:60], f"{k.instructions / 1e6:.2f}", f"{k.cycles / 1e6:.2f}",
                 f"{k.share * 100:.1f}%", f"{k.cycles / (g * 1e6):.3f}"]
                for k in est.kernels[:rows]]
        lines += ["", table(body, ["kernel (estimated)", "M instr", "M cycles", "share",
                                   f"ms @{g:g}GHz"])]
    lines += ["", f"Note: {est.caveats}."]
    return "\n".join(lines)
