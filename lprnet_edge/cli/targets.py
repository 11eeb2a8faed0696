"""``lprnet-edge targets``: the compilation targets this machine knows, and one resolved.

Added to the root group by :mod:`lprnet_edge.cli.main` (``COMMANDS``).
"""

from __future__ import annotations

import click

from lprnet_edge.cli.common import echo_json, table
from lprnet_edge.compiler.target import load_target, target_names
from lprnet_edge.compiler.toolchain import candidates, find_compiler
from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError


@click.group("targets")
def targets_group() -> None:
    """Compilation targets: built-in, $LPRNET_EDGE_TARGETS, ~/.config/lprnet-edge/targets."""


@targets_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets_list(as_json: bool) -> None:
    """Every known target, with its CPU and whether its compiler is installed.

    \b
    Example:
      lprnet-edge targets list
    """
    rows, data = [], []
    for name in target_names():
        try:
            t = load_target(name, detect_cpu=False)  # `targets show host` names the CPU
        except LprnetEdgeError as e:  # a broken user file: show it, keep listing the others
            rows.append([name, "?", "?", "?", f"INVALID: {e}"])
            data.append({"name": name, "error": str(e)})
            continue
        try:
            cc = find_compiler(t).path
        except ToolchainError:
            pkg = candidates(t)[1]
            cc = f"missing (apt-get install {pkg})" if pkg else "missing"
        rows.append([t.name, t.arch, t.tvm.get("mcpu", "generic"), cc, t.description])
        data.append({**t.to_dict(), "compiler": cc})
    if as_json:
        echo_json(data)
        return
    click.echo(table(rows, ["target", "arch", "cpu", "compiler", "description"]))


@targets_group.command("show")
@click.argument("name", required=False)
@click.option("--target-file", type=click.Path(exists=True, dir_okay=False),
              help="Show a target TOML file instead of a named target.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def targets_show(name: str | None, target_file: str | None, as_json: bool) -> None:
    """The resolved target (host: with the detected CPU), as TOML or JSON.

    \b
    Examples:
      lprnet-edge targets show host
      lprnet-edge targets show rpi4 --json
    """
    if not name and not target_file:
        raise click.UsageError("give a target NAME or --target-file")
    spec = load_target(target_file or name)
    if as_json:
        echo_json(spec.to_dict())
    else:
        click.echo(spec.to_toml(), nl=False)


COMMANDS = (targets_group,)
