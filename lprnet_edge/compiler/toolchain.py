"""Finding the C++ compiler that links TVM's object code into ``model.so`` for a target.

TVM generates the machine code itself (LLVM); the compiler only links. For the host that is
the system ``g++``; for a device it is a cross toolchain (``cross_compile/toolchains.toml``:
GNU triple -> candidate compilers and the Debian package that provides them).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from lprnet_edge.compiler.target import TargetSpec, triple_arch
from lprnet_edge.runtime.errors import ToolchainError


@dataclass(frozen=True)
class Compiler:
    """A compiler found for a target: ``path`` is what ``export_library`` runs."""

    path: str
    triple: str | None  # what ``-dumpmachine`` reports (None if it could not be asked)
    cross: bool
    options: tuple[str, ...] = ()
    version: str = ""
    tried: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"compiler": self.path, "triple": self.triple, "cross": self.cross,
                "options": list(self.options), "version": self.version}


@functools.lru_cache(maxsize=1)
def toolchains() -> dict[str, dict[str, Any]]:
    """``cross_compile/toolchains.toml``: triple -> {compilers, debian_package, arch}."""
    res = resources.files("lprnet_edge.cross_compile") / "toolchains.toml"
    try:
        return dict(tomllib.loads(res.read_text(encoding="utf-8")).get("triples", {}))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ToolchainError(f"{res}: unreadable toolchain table ({e})") from e


def _as_list(v: Any) -> list[str]:
    if not v:
        return []
    return [v] if isinstance(v, str) else list(v)


def candidates(target: TargetSpec) -> tuple[list[str], str | None]:
    """Compilers to try for ``target`` in order, and the Debian package that provides them."""
    tc = target.toolchain
    names = _as_list(tc.get("compiler"))
    package = tc.get("debian_package")
    triple = tc.get("triple")
    known = toolchains().get(triple or "", {})
    if not known and target.is_native:
        known = next((t for t in toolchains().values() if t.get("arch") == target.arch), {})
    names += [c for c in _as_list(known.get("compilers")) if c not in names]
    if target.is_native:
        cxx = os.environ.get("CXX")
        extra = ([cxx] if cxx else []) + ["g++", "c++", "clang++", "cc"]
        names += [c for c in extra if c not in names]
    return names, package or known.get("debian_package")


def find_compiler(target: TargetSpec, cc_override: str | None = None) -> Compiler:
    """The compiler for ``target`` (``--cc`` wins), checked to produce code for its arch."""
    options = tuple(_as_list(target.toolchain.get("options")))
    if cc_override:
        path = shutil.which(cc_override)
        if path is None:
            raise ToolchainError(f"--cc {cc_override}: no such compiler (not on PATH and not "
                                 "an executable file)")
        return _checked(target, path, options, tried=(cc_override,))
    names, package = candidates(target)
    for name in names:
        path = shutil.which(name)
        if path:
            return _checked(target, path, options, tried=tuple(names))
    how = f"`apt-get install {package}`" if package else "your distribution's cross g++"
    script = " (or cross_compile/install-debian.sh)" if not target.is_native else ""
    raise ToolchainError(
        f"no C++ compiler for target {target.name!r} ({target.triple or target.arch}): tried "
        f"{names or ['(none listed)']}. Install it with {how}{script}, "
        "or pass --cc /path/to/compiler"
    )


def _checked(target: TargetSpec, path: str, options: tuple[str, ...],
             tried: tuple[str, ...]) -> Compiler:
    triple = dumpmachine(path)
    arch = triple_arch(triple) if triple else None
    if arch is not None and arch != target.arch:
        raise ToolchainError(
            f"compiler {path} produces code for {triple} ({arch}), but target "
            f"{target.name!r} is {target.arch}; pass the right one with --cc"
        )
    return Compiler(path=path, triple=triple, cross=not target.is_native, options=options,
                    version=compiler_version(path), tried=tried)


@functools.lru_cache(maxsize=32)
def dumpmachine(path: str) -> str | None:
    try:
        out = subprocess.run([path, "-dumpmachine"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


@functools.lru_cache(maxsize=32)
def compiler_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else ""

