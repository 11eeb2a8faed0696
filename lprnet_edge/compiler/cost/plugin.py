"""The counting plugin and the tools around it: where they are, and building the plugin.

The plugin (``bbcount.c``, shipped beside this module) is compiled at set-up against qemu's
plugin header, which Debian ships only in its qemu source package: ``scripts/setup-host.sh``
fetches the header into the cache and runs ``python -m lprnet_edge.compiler.cost.plugin
--build``. The header's ``QEMU_PLUGIN_VERSION`` must match the qemu that loads the plugin, so
both come from the same Debian release.

The plugin needs Debian's *dynamic* ``qemu-user`` (``/usr/bin/qemu-aarch64``): the static
build used for binfmt cannot load plugins.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lprnet_edge.errors import ToolchainError
from lprnet_edge.paths import cache_dir

SOURCE = Path(__file__).with_name("bbcount.c")
SETUP_HINT = "run scripts/setup-host.sh (as root) to install it"
# The one LLVM whose llvm-mca weighs every block, x86 and aarch64 alike (Debian 12 ships it):
# the oldest with a Neoverse N1 model, the closest LLVM has to the Cortex-A76 (LLVM 14
# schedules the A76 as a Cortex-A57, with half its FMA width).
LLVM_VERSION = 19
MCA = f"llvm-mca-{LLVM_VERSION}"
QEMU = {"aarch64": "qemu-aarch64", "x86_64": "qemu-x86_64"}


def plugin_dir() -> Path:
    """Where the header and the compiled plugin are cached."""
    return cache_dir() / "qemu-plugin"


def header_path() -> Path:
    return plugin_dir() / "include" / "qemu-plugin.h"


def plugin_path() -> Path:
    return plugin_dir() / "bbcount.so"


def _which(name: str, what: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolchainError(f"{name} ({what}) is not installed: {SETUP_HINT}")
    return path


def build_plugin(force: bool = False) -> Path:
    """Compile ``bbcount.c`` into the cache (again only when the source is newer)."""
    out = plugin_path()
    if not force and out.is_file() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    if not header_path().is_file():
        raise ToolchainError(f"qemu's plugin header is missing ({header_path()}): {SETUP_HINT}")
    cc = _which("gcc", "the C compiler for the qemu plugin")
    try:
        glib = subprocess.run(["pkg-config", "--cflags", "--libs", "glib-2.0"], check=True,
                              capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise ToolchainError(f"glib-2.0 development files not found ({e}): {SETUP_HINT}") from e
    # A name of its own per build: estimates run in threads or processes side by side may
    # all find the plugin out of date and build it at once.
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=".bbcount-", suffix=".so")
    os.close(fd)
    tmp = Path(name)
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", f"-I{header_path().parent}", str(SOURCE),
           "-o", str(tmp), *glib]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ToolchainError(f"building the qemu plugin failed: {proc.stderr.strip()}")
    tmp.chmod(0o755)
    tmp.replace(out)
    return out


@dataclass(frozen=True)
class Tools:
    """The executables one estimate needs, all checked to exist."""

    qemu: str
    plugin: Path
    mca: str

    def to_dict(self) -> dict[str, str]:
        return {"qemu": self.qemu, "plugin": str(self.plugin), "mca": self.mca}


def find_tools(arch: str) -> Tools:
    """The dynamic qemu for ``arch``, the built plugin and llvm-mca, or an error saying to run
    the setup script."""
    if arch not in QEMU:
        raise ToolchainError(f"no cost instrument for {arch!r} (have: {', '.join(QEMU)})")
    qemu = _which(QEMU[arch], "Debian's dynamic qemu-user, which loads TCG plugins")
    if not plugin_path().is_file():
        if not header_path().is_file():
            raise ToolchainError(f"the qemu counting plugin is not built: {SETUP_HINT}")
        build_plugin()
    return Tools(qemu=qemu, plugin=build_plugin(),
                 mca=_which(MCA, f"llvm-mca from Debian's llvm-{LLVM_VERSION}"))


def portable_files(tools: Tools) -> tuple[tuple[Path, str], ...]:
    """qemu, the plugin, and every x86 shared library they load (``ldd``), each as (local
    file, name to give it), the loader first: what a machine without qemu-user needs to run
    them as ``ld-linux-x86-64.so.2 --library-path DIR qemu-...``."""
    libs: dict[str, Path] = {}
    loader: Path | None = None
    for binary in (Path(tools.qemu), tools.plugin):
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                libs.setdefault(parts[0], Path(parts[2]).resolve())
            elif parts and parts[0].startswith("/") and "ld-linux" in parts[0]:
                loader = Path(parts[0])
    if loader is None:
        raise ToolchainError(f"cannot find the dynamic loader of {tools.qemu} (ldd)")
    return ((loader.resolve(), loader.name), (Path(tools.qemu).resolve(), Path(tools.qemu).name),
            (tools.plugin, tools.plugin.name), *((libs[k], k) for k in sorted(libs)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the qemu counting plugin into the cache.")
    ap.add_argument("--build", action="store_true", help="compile it (if out of date)")
    ap.add_argument("--force", action="store_true", help="compile it even if up to date")
    args = ap.parse_args(argv)
    if args.build or args.force:
        try:
            print(f"==> qemu counting plugin: {build_plugin(force=args.force)}")
        except ToolchainError as e:
            print(f"Error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
