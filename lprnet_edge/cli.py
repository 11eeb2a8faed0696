"""The ``lprnet-edge`` command line: thin click commands, one per verb.

Every command returns data from the library and only formats it here. An
:class:`LprnetEdgeError` becomes ``Error: ...`` on stderr and its exit code, never a traceback.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click

from lprnet_edge import __version__
from lprnet_edge.errors import LprnetEdgeError

# Modules that add their own commands to the root group (``register(cli)``).
COMMAND_MODULES = ("cli_build", "cli_tune", "cli_device", "cli_report")


class _Root(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LprnetEdgeError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lprnet-edge")
def cli() -> None:
    """LPRNet licence plate recognition for edge devices.

    \b
    Typical use:
      lprnet-edge weights download
      lprnet-edge build --target rpi4
      lprnet-edge eval --artifact build/lprnet-rpi4 --data plates/
    """


# ---------------------------------------------------------------- shared helpers


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
    from lprnet_edge.recognizer import Recognizer

    if artifact and weights:
        raise click.UsageError("give either --artifact or --weights, not both")
    if artifact:
        return Recognizer.from_artifact(artifact, num_threads=threads)
    return Recognizer.from_weights(weights)


artifact_option = click.option(
    "--artifact", type=click.Path(exists=True, file_okay=False),
    help="Artifact directory built by `lprnet-edge build`.")
weights_option = click.option(
    "--weights", type=click.Path(exists=True, dir_okay=False),
    help="PyTorch weights (default: $LPRNET_EDGE_WEIGHTS, $LPRNET_EDGE_DATA, or the cache).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


# ---------------------------------------------------------------- weights


@cli.group()
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
    from lprnet_edge.weights import SIRIUS, download

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
    from lprnet_edge.weights import resolve_weights

    click.echo(str(resolve_weights(weights)))


# ---------------------------------------------------------------- eval / recognize / bench


@cli.command("eval")
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
    from lprnet_edge.evaluate import evaluate

    rec = open_recognizer(artifact, weights, threads)
    n = len([p for p in Path(data).iterdir() if p.is_file()])
    with progress("Evaluating", min(n, limit or n)) as bar:
        res = evaluate(rec, data, skip_bad=skip_bad, limit=limit, progress=bar)
    if as_json:
        echo_json({"backend": rec.backend_name, "data": str(data), **res.to_dict()})
        return
    click.echo(f"backend           {rec.backend_name}")
    skipped = f" ({res.skipped} skipped)" if res.skipped else ""
    click.echo(f"plates            {res.count}{skipped}")
    click.echo(f"accuracy          {res.accuracy:.3f}  ({res.correct}/{res.count})")
    click.echo(f"char accuracy     {res.char_accuracy:.3f}")
    click.echo(f"mean edit dist    {res.mean_edit_distance:.3f}")
    rows = [[r, v["count"], f"{v['accuracy']:.3f}"] for r, v in res.per_region.items()]
    click.echo("\n" + table(rows, ["province", "plates", "accuracy"]))


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@artifact_option
@weights_option
@json_option
def recognize(images: tuple[str, ...], artifact: str | None, weights: str | None,
              as_json: bool) -> None:
    """Read the plate in each image and print it with its confidence.

    \b
    Examples:
      lprnet-edge recognize plate.jpg --artifact build/lprnet-host
      lprnet-edge recognize *.jpg --json
    """
    rec = open_recognizer(artifact, weights)
    results = rec.recognize(list(images))
    if as_json:
        echo_json([r.to_dict() for r in results])
        return
    click.echo(table([[r.source, r.text, f"{r.confidence:.3f}"] for r in results],
                     ["image", "plate", "confidence"]))


def format_latency(stats: dict[str, Any]) -> str:
    return table([[f"{stats['p50_ms']:.2f}", f"{stats['p90_ms']:.2f}", f"{stats['p99_ms']:.2f}",
                   f"{stats['min_ms']:.2f}", f"{stats['throughput_fps']:.1f}", stats["runs"]]],
                 ["p50 ms", "p90 ms", "p99 ms", "min ms", "plates/s", "runs"])


def main() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"lprnet_edge.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lprnet_edge.{name}":
                raise
            continue
        mod.register(cli)
    cli(prog_name="lprnet-edge")


if __name__ == "__main__":
    main()
