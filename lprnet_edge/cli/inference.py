"""Commands that read plates on this machine: weights, eval, recognize."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click

from lprnet_edge.cli.common import (
    artifact_option,
    echo_json,
    json_option,
    open_recognizer,
    print_metrics,
    print_regions,
    progress,
    table,
    weights_option,
)
from lprnet_edge.runtime.errors import DataError

# ---------------------------------------------------------------- weights


@click.group()
def weights() -> None:
    """Get and locate the pretrained LPRNet weights."""


@weights.command("download")
@click.option("--url", help="Mirror or file:// URL (the pinned sha256 is still enforced).")
@click.option("--force", is_flag=True, help="Download again even if the cache is valid.")
def weights_download(url: str | None, force: bool) -> None:
    """Download the sirius-ai LPRNet weights into the cache and verify their sha256.

    \b
    Example:
      lprnet-edge weights download
      lprnet-edge weights download --url file:///mnt/usb/Final_LPRNet_model.pth
    """
    from lprnet_edge.model.weights import SIRIUS, download

    with ExitStack() as stack:
        bars: list[Callable[[int, int], None]] = []

        def report(done: int, total: int) -> None:
            # A bar in bytes, opened by the first block (none when the cache is already valid);
            # its length is the response's Content-Length (0 if unknown: position only).
            if not bars:
                bars.append(stack.enter_context(progress("Downloading weights", total)))
            bars[0](done, total)

        path = download(SIRIUS, url=url, force=force, progress=report)
    click.echo(f"{path}  sha256 {SIRIUS.sha256}  verified")


@weights.command("path")
@weights_option
def weights_path(weights: str | None) -> None:
    """Print which weights file would be used.

    \b
    Example:
      lprnet-edge weights path
    """
    from lprnet_edge.model.weights import resolve_weights

    click.echo(str(resolve_weights(weights)))


# ---------------------------------------------------------------- eval / recognize / bench


@click.command("eval")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of plate images named by their text.")
@artifact_option
@weights_option
@click.option("--skip-bad", is_flag=True,
              help="Skip unreadable images and unknown characters (counted) instead of failing.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N images.")
@click.option("--threads", type=click.IntRange(min=1), help="Runtime threads (TVM artifacts).")
@json_option
def eval_cmd(data: str, artifact: str | None, weights: str | None, skip_bad: bool,
             limit: int | None, threads: int | None, as_json: bool) -> None:
    """Exact-plate accuracy (batch 1), per-character accuracy, edit distance, per province.

    \b
    Examples:
      lprnet-edge eval --data $LPRNET_EDGE_DATA/test
      lprnet-edge eval --data plates/ --artifact build/lprnet-host --json
    """
    from lprnet_edge.runtime.evaluate import evaluate

    rec = open_recognizer(artifact, weights, threads)
    n = len([p for p in Path(data).iterdir() if p.is_file()])
    with _eval_progress(min(n, limit or n)) as bar:
        res = evaluate(rec, data, skip_bad=skip_bad, limit=limit, progress=bar)
    if as_json:
        echo_json({"backend": rec.backend_name, "data": str(data), **res.to_dict()})
        return
    click.echo(f"backend           {rec.backend_name}")
    print_metrics(res)
    print_regions(res)
    if res.skipped:
        click.echo("\n" + table([[path, reason] for path, reason in res.skipped],
                                ["skipped file", "reason"]))


@contextmanager
def _eval_progress(total: int, every_s: float = 10.0) -> Iterator[Callable[[int, int], None]]:
    """A bar on a terminal; in a log (stderr not a terminal), a line every ``every_s`` seconds
    and at the end, each saying how far, how fast and how long is left."""
    if sys.stderr.isatty():
        with progress("Evaluating", total) as bar:
            yield bar
        return
    click.echo(f"evaluating {total} images", err=True)
    t0 = time.monotonic()
    last = [t0]

    def line(done: int, total_now: int) -> None:
        now = time.monotonic()
        if done < total_now and now - last[0] < every_s:
            return
        last[0] = now
        rate = done / max(now - t0, 1e-9)
        left = (f", about {(total_now - done) / rate:.0f} s left"
                if done < total_now and rate else "")
        click.echo(f"evaluated {done}/{total_now} images ({rate:.1f}/s{left})", err=True)

    yield line


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@artifact_option
@weights_option
@click.option("--skip-bad", is_flag=True,
              help="Report an unreadable image on its row and go on (exit 0) instead of "
                   "stopping there (the reads before it are printed either way).")
@json_option
def recognize(images: tuple[str, ...], artifact: str | None, weights: str | None,
              skip_bad: bool, as_json: bool) -> None:
    """Read the plate in each image and print it with its confidence.

    \b
    Examples:
      lprnet-edge recognize plate.jpg --artifact build/lprnet-host
      lprnet-edge recognize *.jpg --json --skip-bad
    """
    rec = open_recognizer(artifact, weights)
    rows: list[dict[str, Any]] = []
    try:
        for path in images:
            try:
                rows.append(rec.recognize(path).to_dict())
            except DataError as e:
                if not skip_bad:
                    raise
                rows.append({"source": path, "error": str(e)})
    finally:  # a bad image stops the run (without --skip-bad) but never hides earlier reads
        _print_reads(rows, as_json)


def _print_reads(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        echo_json(rows)
    elif rows:
        click.echo(table([[r["source"], r.get("text", "-"),
                           f"{r['confidence']:.3f}" if "confidence" in r else "-",
                           r.get("error", "")] for r in rows],
                         ["image", "plate", "confidence", "error"]))


COMMANDS = (weights, eval_cmd, recognize)
