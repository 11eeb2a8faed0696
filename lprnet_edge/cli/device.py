"""Device commands: ``deploy``, ``rollback``, the ``remote`` group and ``device setup`` (over
SSH). The work is in :mod:`lprnet_edge.device`; these commands connect, call it and print.

:func:`device_from`, :func:`deploy_with_progress` and :func:`bench_over_ssh` are also used by
``lprnet-edge build --host`` and ``lprnet-edge bench --host``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from lprnet_edge.cli.common import (
    SSH_TIMEOUT,
    echo_json,
    format_latency,
    json_option,
    print_comparison,
    print_metrics,
    print_profile,
    print_regions,
    progress,
    runs_option,
    setup_ssh_options,
    ssh_kwargs,
    ssh_options,
    table,
    threads_option,
    warmup_option,
)
from lprnet_edge.cli.compare_host import compare_host_options, echo_agreement, host_recognizer
from lprnet_edge.device.agreement import compare_reads, host_file_reads, host_folder_reads
from lprnet_edge.device.deploy import (
    DeployResult,
    DeviceStatus,
    artifact_size,
    deploy,
    rollback,
    status,
)
from lprnet_edge.device.device import DEFAULT_REMOTE_DIR, Device
from lprnet_edge.device.remote import (
    DeviceBench,
    RemoteEval,
    compare_on_device,
    remote_bench,
    remote_eval,
    remote_recognize,
)
from lprnet_edge.device.setup import SetupResult, setup_device
from lprnet_edge.device.ssh import SshConnection
from lprnet_edge.device.tunnel import rpc_bench

_DEVICE_THREADS = "Runtime threads on the device."


@contextlib.contextmanager
def device_from(opts: dict[str, Any]) -> Iterator[Device]:
    """A connected :class:`~lprnet_edge.device.device.Device` from the ``ssh_options``
    values; says so on stderr when a new host key was trusted."""
    conn = SshConnection(opts["host"], key=opts.get("key"), known_hosts=opts.get("known_hosts"),
                         accept_new_host=bool(opts.get("accept_new_host")),
                         timeout=opts.get("ssh_timeout") or SSH_TIMEOUT)
    conn.connect()
    if conn.accepted_host_key:
        click.echo(f"Trusted new host key of {conn.spec}: {conn.accepted_host_key} "
                   f"(recorded in {conn.known_hosts})", err=True)
    try:
        yield Device(conn, opts.get("remote_dir") or DEFAULT_REMOTE_DIR,
                     python=opts.get("remote_python"))
    finally:
        conn.close()


def _with_device(fn: Callable) -> Callable:
    """Hand the command a connected device instead of the ``ssh_options`` values."""
    @functools.wraps(fn)
    def wrapper(**kw: Any) -> Any:
        with device_from(ssh_kwargs(kw)) as dev:
            return fn(dev, **kw)

    return wrapper


def _show(res: Any, as_json: bool, printer: Callable[[Any], None]) -> None:
    """A result as JSON (``--json``) or as the command's text."""
    if as_json:
        echo_json(res.to_dict())
    else:
        printer(res)


def _step(msg: str) -> None:
    click.echo(f"  {msg}", err=True)


def bench_over_ssh(opts: dict[str, Any], rpc: bool = False, artifact: str | None = None,
                   runs: int = 100, warmup: int = 10, threads: int | None = None,
                   image: str | None = None, include_preprocess: bool = True,
                   number: int = 10, repeat: int | None = None,
                   profile: bool = False, compare: bool = False, rounds: int = 5,
                   weights: str | None = None) -> DeviceBench:
    """Benchmark on the device: the deployed Recognizer (default; ``profile`` adds the agent's
    per-kernel table), or with ``rpc`` the model of ``artifact`` through a TVM RPC server on
    the device reached by an SSH tunnel. ``compare`` adds the deployed model beside ONNX
    Runtime fp32 on the device (:func:`lprnet_edge.device.remote.compare_on_device`)."""
    with device_from(opts) as dev:
        if rpc:
            if not artifact:
                raise click.UsageError("--rpc with --host needs --artifact (the model to time)")
            return rpc_bench(dev, artifact, number=number, repeat=repeat or max(1, runs // number))
        stats = remote_bench(dev, runs=runs, warmup=warmup, threads=threads, image=image,
                             include_preprocess=include_preprocess, expect_artifact=artifact,
                             profile=profile)
        if not compare:
            return stats
        comp = compare_on_device(dev, artifact, runs, warmup, rounds, threads, weights)
        return replace(stats, compare=comp)


def deploy_with_progress(dev: Device, artifact: str | Path, name: str | None = None,
                         keep: int = 5) -> DeployResult:
    """:func:`lprnet_edge.device.deploy.deploy` with an upload bar and steps on stderr."""
    click.echo(f"Deploying {artifact} to {dev.spec}:{dev.root}", err=True)
    with progress("Uploading", artifact_size(artifact, with_runtime=True)) as bar:
        return deploy(dev, artifact, name=name, keep=keep, progress=bar, on_step=_step)


def device_verification_summary(v: dict[str, Any] | None) -> str:
    """One line for the on-device comparison with PyTorch (``DeviceCheck.verification``)."""
    if not v:
        return "-"
    if v.get("status") == "absent":
        return "not run on the device: the artifact carries no verify.npz (rebuild it)"
    diff = v.get("max_abs_logit_diff")
    agree = v.get("plate_agreement")
    return (f"{v.get('status')} on the device: max |logit diff| vs PyTorch "
            f"{'non-finite' if diff is None else f'{diff:.2e}'} (tol {v.get('tolerance'):g}) on "
            f"{v.get('inputs')} calib inputs"
            + (f", {agree:.0%} plates agree" if agree is not None else ""))


def print_bench(stats: DeviceBench, as_json: bool) -> None:
    if as_json:
        echo_json(stats.to_dict())
        return
    how = ("model only, time_evaluator over RPC + SSH tunnel" if stats.mode == "rpc"
           else "Recognizer over SSH" + (", with pre/post-processing"
                                         if stats.latency.get("include_preprocess") else ""))
    arch = stats.machine or stats.latency.get("target", {}).get("arch", "?")
    click.echo(f"device    {stats.host}  ({arch})")
    click.echo(f"measured  {how}")
    click.echo(format_latency(stats.latency))
    print_profile(stats.profile)
    print_comparison(stats.compare)


def print_deploy(res: DeployResult) -> None:
    c = res.checks
    click.echo(f"deployed     {res.name}")
    click.echo(f"device       {res.host} ({res.device_arch})")
    click.echo(f"path         {res.path}")
    click.echo(f"previous     {res.previous or '-'}")
    click.echo(f"uploaded     {res.bytes_uploaded / 1e6:.2f} MB in {res.upload_seconds:.1f} s")
    click.echo(f"checks       sha256 ok on the device; model loaded in {c.load_s or 0:.2f} s, "
               f"first run {c.first_inference_s or 0:.2f} s")
    click.echo(f"verification {device_verification_summary(c.verification)}")
    click.echo(f"total        {res.seconds:.1f} s")


def print_eval(res: RemoteEval) -> None:
    m = res.metrics
    click.echo(f"device            {res.host} ({res.machine})")
    click.echo(f"deployment        {res.deployment}")
    click.echo(f"backend           {res.backend}")
    print_metrics(m)
    click.echo(f"time on device    {res.seconds:.1f} s ({res.workers} worker(s))")
    print_regions(m)


def print_status(st: DeviceStatus) -> None:
    info = st.info or {}
    click.echo(f"device       {st.host} ({st.machine})")
    click.echo(f"python       {st.python} {info.get('python', '')}")
    if info:
        click.echo(f"runtime      tvm {info.get('tvm')}, numpy {info.get('numpy')}, "
                   f"opencv {info.get('opencv')}, lprnet_edge {info.get('lprnet_edge')}")
    click.echo(f"remote dir   {st.remote_dir} ({st.free_bytes / 1e6:.0f} MB free)")
    click.echo(f"current      {st.current or '-'}")
    for n in st.deployments:
        click.echo(f"  {'*' if n == st.current else ' '} {n}")


def print_setup(res: SetupResult) -> None:
    v = res.versions
    click.echo(f"venv         {res.venv} (Python {res.python}, {res.machine})")
    click.echo(f"installed    tvm {v.get('tvm')}, numpy {v.get('numpy')}, opencv "
               f"{v.get('opencv')} ({'uploaded wheels' if res.mode == 'offline' else 'pip'})")
    click.echo(f"runtime      lprnet_edge {v.get('lprnet_edge')} in {res.runtime} ({res.pth})")
    click.echo(f"total        {res.seconds:.1f} s")
    click.echo(f"\nNext: lprnet-edge deploy ARTIFACT --host {res.host}")


# ---------------------------------------------------------------- deploy / rollback


@click.command("deploy")
@click.argument("artifact", type=click.Path(exists=True))
@ssh_options
@click.option("--name", help="Deployment name (default: the artifact folder's name).")
@click.option("--keep", type=click.IntRange(min=1), default=5, show_default=True,
              help="Deployments kept on the device (older ones are removed; never the current).")
@json_option
@_with_device
def deploy_cmd(dev: Device, artifact: str, name: str | None, keep: int, as_json: bool) -> None:
    """Install an artifact (a folder, or the .tar.gz of `build --bundle`) on a device over
    SSH, atomically.

    Refuses an artifact built for another architecture than the device's (`uname -m`), a
    manifest naming files outside the artifact, and a device without the free space it needs.
    Uploads the artifact and the lprnet_edge runtime to a staging folder, checks their sha256
    on the device, loads and runs the model there and compares its logits with the host's
    PyTorch ones stored in the artifact (verify.npz), then makes it current with an atomic
    symlink swap. If anything fails, or the logits differ past the build's tolerance, the
    previous deployment stays current and untouched (`lprnet-edge rollback` switches back
    later).

    \b
    Examples:
      lprnet-edge deploy build/lprnet-rpi4 --host pi@raspberrypi.local
      lprnet-edge deploy build/lprnet-rpi4.tar.gz --host pi@raspberrypi.local
      lprnet-edge deploy build/lprnet-rpi4 --host pi@10.0.0.7:2222 --key ~/.ssh/pi_ed25519 \\
          --known-hosts ~/.ssh/known_hosts --accept-new-host
    """
    res = deploy_with_progress(dev, artifact, name=name, keep=keep)
    _show(res, as_json, print_deploy)


@click.command("rollback")
@ssh_options
@click.option("--to", "to", help="Deployment name to switch to (default: the one before).")
@json_option
@_with_device
def rollback_cmd(dev: Device, to: str | None, as_json: bool) -> None:
    """Make the previous deployment current again (atomic symlink swap).

    \b
    Examples:
      lprnet-edge rollback --host pi@raspberrypi.local
      lprnet-edge rollback --host pi@raspberrypi.local --to lprnet-rpi4-20260101T120000.000000Z
    """
    res = rollback(dev, to)
    if as_json:
        echo_json(res.to_dict())
        return
    click.echo(f"current      {res.current}")
    click.echo(f"was          {res.previous or '-'}")


# ---------------------------------------------------------------- remote group


@click.group()
def remote() -> None:
    """Run the deployed model on a device over SSH."""


@remote.command("recognize")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@ssh_options
@threads_option(_DEVICE_THREADS)
@compare_host_options
@json_option
@_with_device
def remote_recognize_cmd(dev: Device, images: tuple[str, ...], threads: int | None,
                         as_json: bool, **compare: Any) -> None:
    """Upload images and read their plates with the device's current deployment.

    \b
    Example:
      lprnet-edge remote recognize --host pi@raspberrypi.local plate1.jpg plate2.jpg
      lprnet-edge remote recognize --host pi@raspberrypi.local *.jpg --compare-host
    """
    host_rec = host_recognizer(**compare)
    results = remote_recognize(dev, list(images), threads=threads)
    agreement = compare_reads(host_file_reads(host_rec, images),
                              {r["source"]: r["text"] for r in results},
                              host_rec.backend_name) if host_rec else None
    if as_json:
        echo_json({"reads": results, "compare_host": agreement.to_dict()} if agreement
                  else results)
        return
    click.echo(table([[r["source"], r["text"], f"{r['confidence']:.3f}"] for r in results],
                     ["image", "plate", "confidence"]))
    if agreement:
        echo_agreement(agreement, only_differing=False)


@remote.command("eval")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of plate images named by their text.")
@ssh_options
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images / unknown characters.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N images.")
@threads_option("Runtime threads per process on the device.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on the device (the images are sharded; same figures).")
@compare_host_options
@json_option
@_with_device
def remote_eval_cmd(dev: Device, data: str, skip_bad: bool, limit: int | None,
                    threads: int | None, workers: int, as_json: bool, **compare: Any) -> None:
    """Upload a labelled folder and measure accuracy on the device (batch 1).

    Same metrics as `lprnet-edge eval`: exact-plate accuracy, per-character accuracy, edit
    distance, per province.

    \b
    Example:
      lprnet-edge remote eval --host pi@raspberrypi.local --data $LPRNET_EDGE_DATA/test
    """
    host_rec = host_recognizer(**compare)
    n = len([p for p in Path(data).iterdir() if p.is_file()])
    with progress("Evaluating on the device", min(n, limit or n)) as bar:
        res = remote_eval(dev, data, skip_bad=skip_bad, limit=limit, threads=threads,
                          workers=workers, progress=bar, reads=host_rec is not None)
    if host_rec is None:
        _show(res, as_json, print_eval)
        return
    agreement = compare_reads(host_folder_reads(host_rec, data, skip_bad, limit),
                              res.reads or {}, host_rec.backend_name)
    if as_json:
        echo_json({**res.to_dict(), "compare_host": agreement.to_dict()})
        return
    print_eval(res)
    echo_agreement(agreement, only_differing=True)


@remote.command("info")
@ssh_options
@json_option
@_with_device
def remote_info_cmd(dev: Device, as_json: bool) -> None:
    """What is deployed on a device, its architecture and runtime versions.

    \b
    Example:
      lprnet-edge remote info --host pi@raspberrypi.local
    """
    st = status(dev)
    _show(st, as_json, print_status)


@remote.command("bench")
@ssh_options
@click.option("--tunnel", "rpc", is_flag=True,
              help="Time the model of --artifact with time_evaluator through a TVM RPC server "
                   "started on the device and an SSH tunnel (model only).")
@click.option("--artifact", type=click.Path(exists=True, file_okay=False),
              help="Local artifact whose model --tunnel times.")
@runs_option(100)
@warmup_option(10)
@threads_option(_DEVICE_THREADS)
@click.option("--image", type=click.Path(exists=True, dir_okay=False),
              help="Plate image to time (default: a synthetic plate).")
@click.option("--no-preprocess", is_flag=True, help="Time the model call only (SSH mode).")
@json_option
def remote_bench_cmd(rpc: bool, artifact: str | None, runs: int, warmup: int,
                     threads: int | None, image: str | None, no_preprocess: bool,
                     as_json: bool, **kw: Any) -> None:
    """Latency on the device: the deployed Recognizer over SSH, or the model over RPC.

    \b
    Examples:
      lprnet-edge remote bench --host pi@raspberrypi.local
      lprnet-edge remote bench --host pi@raspberrypi.local --tunnel --artifact build/lprnet-rpi4
    """
    stats = bench_over_ssh(ssh_kwargs(kw), rpc=rpc, artifact=artifact, runs=runs,
                           warmup=warmup, threads=threads, image=image,
                           include_preprocess=not no_preprocess)
    print_bench(stats, as_json)


# ---------------------------------------------------------------- device group


@click.group("device")
def device_group() -> None:
    """Prepare a board for lprnet-edge over SSH."""


@device_group.command("setup")
@setup_ssh_options
@click.option("--offline", is_flag=True,
              help="The board has no network: download the wheels here (for its platform and "
                   "Python), upload them, check their sha256 there and install them.")
@click.option("--wheels", "wheels_dir", type=click.Path(exists=True, file_okay=False),
              help="Wheels already downloaded for the board (implies --offline).")
@click.option("--rpc-deps", is_flag=True,
              help="Also install TVM's RPC server dependencies (cloudpickle, tornado, psutil) "
                   "for `bench --host --tunnel` and tuning on the board.")
@json_option
def device_setup_cmd(offline: bool, wheels_dir: str | None, rpc_deps: bool, as_json: bool,
                     **kw: Any) -> None:
    """Create the runtime venv on a board and install everything it needs, in one command.

    Creates REMOTE_DIR/venv (python3 -m venv, or --python), installs numpy,
    opencv-python-headless, apache-tvm 0.27 and apache-tvm-ffi 0.1.14.post1 from the board's
    package index (or, with --offline, from aarch64 wheels downloaded on this host), and
    installs lprnet_edge's runtime so `from lprnet_edge import Recognizer` works in that venv
    for your own scripts (a .pth file: the current deployment's runtime, else the set-up copy).
    Safe to run again.

    \b
    Examples:
      lprnet-edge device setup --host pi@raspberrypi.local
      lprnet-edge device setup --host pi@10.0.0.7 --offline
      ~/.lprnet-edge/venv/bin/python -c 'from lprnet_edge import Recognizer'   # on the board
    """
    opts = ssh_kwargs(kw)
    base = opts.pop("remote_python", None) or "python3"
    with device_from(opts) as dev:
        click.echo(f"Setting up {dev.spec}:{dev.root}/venv", err=True)
        with progress("Uploading wheels", 1) as bar:
            res = setup_device(dev, offline=offline, wheels_dir=wheels_dir, base_python=base,
                               rpc=rpc_deps, progress=bar, on_step=_step)
    _show(res, as_json, print_setup)


COMMANDS = (deploy_cmd, rollback_cmd, remote, device_group)
