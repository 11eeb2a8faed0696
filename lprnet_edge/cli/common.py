"""What the command modules share: output helpers and the options defined once."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from lprnet_edge.device.device import DEFAULT_REMOTE_DIR
from lprnet_edge.device.ssh import CONNECT_TIMEOUT
from lprnet_edge.runtime.baselines import comparison_title, format_comparison
from lprnet_edge.runtime.errors import LprnetEdgeError
from lprnet_edge.runtime.metrics import EvalResult
from lprnet_edge.runtime.profile import Profile


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        padded = (c + " " * (w - _width(c)) for c, w in zip(row, widths, strict=True))
        lines.append("  ".join(padded).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _width(s: str) -> int:
    # CJK characters take two columns on a terminal.
    return sum(2 if ord(ch) > 0x2E80 else 1 for ch in s)


@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (plain label when not a terminal)."""
    with click.progressbar(length=total, label=label, file=sys.stderr,
                           show_pos=True, show_eta=True) as bar:
        last = [0]

        def update(done: int, total_now: int) -> None:
            # The real total may only be known once work starts (a download's Content-Length).
            if total_now and total_now != bar.length:
                bar.length = total_now
            bar.update(done - last[0])
            last[0] = done

        yield update


def open_recognizer(artifact: str | None, weights: str | None, threads: int | None = None):
    """A Recognizer from ``--artifact`` (any backend) or ``--weights`` (PyTorch reference)."""
    from lprnet_edge.runtime.recognizer import Recognizer

    if artifact and weights:
        raise click.UsageError("give either --artifact or --weights, not both")
    if artifact:
        return Recognizer.from_artifact(artifact, num_threads=threads)
    try:
        from lprnet_edge.model.reference import reference_recognizer
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise LprnetEdgeError("--weights runs the PyTorch model, and PyTorch is not installed "
                              "here: pip install 'lprnet-edge[host]', or run a compiled "
                              "artifact with --artifact") from None
    return reference_recognizer(weights)


artifact_option = click.option(
    "--artifact", type=click.Path(exists=True, file_okay=False),
    help="Artifact directory built by `lprnet-edge build`.")
weights_option = click.option(
    "--weights", type=click.Path(exists=True, dir_okay=False),
    help="PyTorch weights (default: $LPRNET_EDGE_WEIGHTS, $LPRNET_EDGE_DATA, or the cache).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def format_latency(stats: dict[str, Any]) -> str:
    return table([[f"{stats['p50_ms']:.2f}", f"{stats['p90_ms']:.2f}", f"{stats['p99_ms']:.2f}",
                   f"{stats['min_ms']:.2f}", f"{stats['throughput_fps']:.1f}", stats["runs"]]],
                 ["p50 ms", "p90 ms", "p99 ms", "min ms", "plates/s", "runs"])


def print_metrics(m: EvalResult) -> None:
    """The headline figures of an evaluation, as ``eval`` and ``remote eval`` print them."""
    skipped = f" ({m.skipped_count} skipped)" if m.skipped else ""
    click.echo(f"plates            {m.count}{skipped}")
    click.echo(f"accuracy          {m.accuracy:.3f}  ({m.correct}/{m.count})")
    click.echo(f"char accuracy     {m.char_accuracy:.3f}")
    click.echo(f"mean edit dist    {m.mean_edit_distance:.3f}")


def print_regions(m: EvalResult) -> None:
    """An evaluation's accuracy per province."""
    rows = [[r, v["count"], f"{v['accuracy']:.3f}"] for r, v in m.per_region.items()]
    click.echo("\n" + table(rows, ["province", "plates", "accuracy"]))


def print_comparison(comp: dict[str, Any] | None) -> None:
    """The side-by-side table (artifact, ONNX Runtime, PyTorch) after the latency tables."""
    if not comp:
        return
    where = f" on {comp['host']}" if comp.get("host") else ""
    title = comparison_title(comp).rstrip(":") if comp.get("rows") else "Side by side"
    click.echo(f"\n{title}{where}:\n{format_comparison(comp)}")


def print_profile(profile: dict[str, Any] | None, top: int = 15) -> None:
    """The per-kernel table after the latency tables (``bench --profile``)."""
    if not profile:
        return
    prof = Profile.from_dict(profile)
    how = "VM instrument" if prof.method == "instrument" else "each kernel called over RPC"
    click.echo(f"\nPer kernel ({how}, slowest first):\n{prof.format(top)}")


# ---------------------------------------------------------------- options defined once


def out_option(help: str, **kw: Any) -> Callable:
    """``-o/--out DIR``: every command that writes a directory takes it the same way."""
    return click.option("-o", "--out", type=click.Path(file_okay=False), help=help, **kw)


def threads_option(help: str = "Runtime threads (default: the artifact's, i.e. the "
                   "target's cores).") -> Callable:
    return click.option("--threads", type=click.IntRange(min=1), help=help)


def rpc_options(fn: Callable) -> Callable:
    """``--rpc HOST:PORT`` (always an address), ``--rpc-tracker HOST:PORT``, ``--rpc-key``."""
    opts = [
        click.option("--rpc", metavar="HOST:PORT",
                     help="A device's TVM RPC server (python -m tvm.exec.rpc_server)."),
        click.option("--rpc-tracker", metavar="HOST:PORT",
                     help="A TVM RPC tracker the device is registered with."),
        click.option("--rpc-key", metavar="KEY", help="Device key to request from the tracker."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def check_rpc(rpc: str | None, rpc_tracker: str | None, rpc_key: str | None) -> None:
    """The combinations ``rpc_options`` allows, as usage errors."""
    if rpc and rpc_tracker:
        raise click.UsageError("give either --rpc or --rpc-tracker, not both")
    if rpc_key and not rpc_tracker:
        raise click.UsageError("--rpc-key goes with --rpc-tracker")
    if rpc_tracker and not rpc_key:
        raise click.UsageError("--rpc-tracker needs --rpc-key (the device key to request)")


def grouped(name: str, factory: Callable[..., Any], *options: Callable) -> Callable:
    """Add ``options`` to a command and hand their values to it as one argument,
    ``name=factory(**values)``: a command takes a few typed groups, not 30 parameters."""
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = factory(**{k: kwargs.pop(k) for k in keys})
            return fn(*args, **kwargs)

        params = wrapper.__dict__.setdefault("__click_params__", [])
        wrapper.__click_params__ = params = list(params)
        before = len(params)
        for o in reversed(options):
            wrapper = o(wrapper)
        keys = [p.name for p in wrapper.__click_params__[before:]]
        return wrapper
    return deco


def runs_option(default: int) -> Callable:
    return click.option("--runs", type=click.IntRange(min=1), default=default,
                        show_default=True, help="Timed runs.")


def warmup_option(default: int) -> Callable:
    return click.option("--warmup", type=click.IntRange(min=0), default=default,
                        show_default=True, help="Untimed runs before the timed ones.")


# ---------------------------------------------------------------- a device over SSH

SSH_TIMEOUT = CONNECT_TIMEOUT
SSH_KEYS = ("host", "key", "known_hosts", "accept_new_host", "remote_dir", "remote_python",
            "ssh_timeout")
"""The parameter names :func:`ssh_options` adds (``ssh_kwargs`` takes them out of a command's
keyword arguments, as the dict :func:`lprnet_edge.cli.device.device_from` reads)."""
REMOTE_PYTHON_HELP = ("Python on the device (default: REMOTE_DIR/venv/bin/python, else "
                      "python3).")


def _ssh_options(host_required: bool, python_help: str) -> Callable[[Callable], Callable]:
    opts = [
        click.option("--host", "host", required=host_required, metavar="USER@HOST[:PORT]",
                     help="Device as user@host[:port] (SSH)."),
        click.option("--key", type=click.Path(exists=True, dir_okay=False),
                     help="Private key (default: ~/.ssh/id_* and ssh-agent)."),
        click.option("--known-hosts", type=click.Path(dir_okay=False),
                     help="known_hosts file to check the device's host key against "
                          "(default ~/.ssh/known_hosts)."),
        click.option("--accept-new-host", is_flag=True,
                     help="Trust a device whose host key is not known yet, and record it. "
                          "A changed key is always refused."),
        click.option("--remote-dir", default=DEFAULT_REMOTE_DIR, show_default=True,
                     help="lprnet-edge's directory on the device."),
        click.option("--python", "remote_python", help=python_help),
        click.option("--ssh-timeout", type=click.FloatRange(min=1), default=SSH_TIMEOUT,
                     show_default=True, help="Seconds to connect / authenticate."),
    ]

    def deco(fn: Callable) -> Callable:
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return deco


ssh_options = _ssh_options(True, REMOTE_PYTHON_HELP)
"""``--host --key --known-hosts --accept-new-host --remote-dir --python --ssh-timeout``."""
ssh_options_optional = _ssh_options(False, REMOTE_PYTHON_HELP)
"""The same options with ``--host`` optional (for ``bench``, local unless ``--host``)."""
setup_ssh_options = _ssh_options(True, "Python the venv is created with, on the device "
                                       "(default: python3).")
"""The same options for ``device setup``, where ``--python`` makes the venv."""


def ssh_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """Take the :func:`ssh_options` values out of a command's keyword arguments."""
    return {k: kw.pop(k) for k in SSH_KEYS if k in kw}
