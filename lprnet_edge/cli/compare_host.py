"""``--compare-host`` for ``remote eval`` and ``remote recognize``: each device read beside the
host's, and how many differ (the board should read exactly what the host measured)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from lprnet_edge.cli.common import open_recognizer, table


def compare_host_options(fn: Callable) -> Callable:
    """``--compare-host [--host-artifact DIR | --host-weights FILE]``."""
    opts = [
        click.option("--compare-host", is_flag=True,
                     help="Also read every image here and list, per image, the host's text, "
                          "the device's text and how many differ."),
        click.option("--host-artifact", type=click.Path(exists=True, file_okay=False),
                     help="With --compare-host: read here with this artifact (e.g. the same "
                          "model built with --target host) instead of the PyTorch weights."),
        click.option("--host-weights", type=click.Path(exists=True, dir_okay=False),
                     help="With --compare-host: PyTorch weights to read with here (default: "
                          "$LPRNET_EDGE_WEIGHTS, $LPRNET_EDGE_DATA, or the cache)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def host_recognizer(compare_host: bool, host_artifact: str | None,
                    host_weights: str | None) -> Any:
    """The host's reader for ``--compare-host`` (None without it)."""
    if not compare_host:
        if host_artifact or host_weights:
            raise click.UsageError("--host-artifact / --host-weights go with --compare-host")
        return None
    return open_recognizer(host_artifact, host_weights)


def echo_agreement(agreement: Any, only_differing: bool) -> None:
    """The per-image table (all reads, or only the differing ones) and the count."""
    rows = [[r.name, r.host, r.device, "" if r.same else "DIFFERS"]
            for r in agreement.reads if not (only_differing and r.same)]
    if rows:
        click.echo("\n" + table(rows, ["image", "host", "device", ""]))
    click.echo(f"\nhost vs device    {agreement.differ} of {len(agreement.reads)} reads differ "
               f"(host: {agreement.host_reader})")
