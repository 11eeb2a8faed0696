"""What the command modules share: output helpers and the options defined once."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from lprnet_edge.runtime.errors import LprnetEdgeError


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
