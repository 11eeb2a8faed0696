"""The ``lprnet-edge`` command line: the root group and its commands, nothing else.

Commands live in one module per verb group and only format what the library returns. An
:class:`LprnetEdgeError` becomes ``Error: ...`` on stderr and its exit code, never a traceback.
"""

from __future__ import annotations

from typing import Any

import click

from lprnet_edge.cli import bench, build, device, finetune, inference, report, targets, tune
from lprnet_edge.runtime import __version__
from lprnet_edge.runtime.errors import LprnetEdgeError


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



for _module in (inference, finetune, build, targets, tune, bench, device, report):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    cli(prog_name="lprnet-edge")


if __name__ == "__main__":
    main()
