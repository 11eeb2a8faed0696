"""Which function (kernel) a counted block belongs to.

The guest reports the executable segments of its loaded libraries, as its dynamic loader
placed them (start, end, the segment's ELF virtual address as ``offset``, the file). A block
inside the compiled model's shared object is named by the ``model.so`` symbol that contains
it (``nm``: TVM names each kernel after its fused operators); a block in any other library
is attributed to that library as a whole (``[libtvm_runtime.so]``). An address's ELF virtual
address is ``addr - start + offset``.
"""

from __future__ import annotations

import bisect
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lprnet_edge.errors import ToolchainError

NM = {"aarch64": "aarch64-linux-gnu-nm", "x86_64": "nm"}


@dataclass(frozen=True, order=True)
class FileMap:
    """One executable file mapping of the guest process."""

    start: int
    end: int
    offset: int
    path: str


@dataclass(frozen=True)
class SymbolTable:
    """Function start addresses of one shared object, sorted, with their kernel names.

    An address belongs to the nearest symbol at or below it, whatever that symbol's size:
    LLVM emits a kernel's parallel bodies as unnamed local functions right after the kernel's
    ``*_compute_`` function, so they count for that kernel.
    """

    starts: tuple[int, ...]
    names: tuple[str, ...]
    end: int

    def lookup(self, addr: int) -> str | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        return self.names[i] if 0 <= i and addr < self.end else None


def kernel_name(symbol: str) -> str:
    """TVM's kernel name of a symbol: its packed wrapper and its body count as one."""
    for prefix in ("__tvm_ffi_",):
        symbol = symbol.removeprefix(prefix)
    return symbol.removesuffix("_compute_")


def read_symbols(lib: Path, arch: str) -> SymbolTable:
    """The text symbols of ``lib`` (``nm -S -n --defined-only``)."""
    nm = shutil.which(NM.get(arch, "nm")) or shutil.which("nm")
    if nm is None:
        raise ToolchainError("nm (binutils) is not installed: run scripts/setup-host.sh")
    proc = subprocess.run([nm, "-S", "-n", "--defined-only", str(lib)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"nm {lib} failed: {proc.stderr.strip()}")
    rows: list[tuple[int, str]] = []
    end = 0
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tTwW":
            start, size = int(parts[0], 16), int(parts[1], 16)
            rows.append((start, kernel_name(parts[3])))
            end = max(end, start + size)
    rows.sort()
    return SymbolTable(tuple(r[0] for r in rows), tuple(r[1] for r in rows), end)


def parse_maps(maps: Sequence[Mapping[str, Any]]) -> list[FileMap]:
    return sorted(FileMap(int(m["start"]), int(m["end"]), int(m["offset"]), str(m["path"]))
                  for m in maps)


class Attributor:
    """Names blocks by kernel: ``model.so`` symbols, else the library's file name."""

    def __init__(self, maps: Sequence[Mapping[str, Any]], lib_guest_path: str | None,
                 lib_local: Path | None, arch: str) -> None:
        self.maps = parse_maps(maps)
        self.starts = [m.start for m in self.maps]
        self.lib_guest = Path(lib_guest_path).name if lib_guest_path else None
        self.symbols = read_symbols(lib_local, arch) if lib_local else None
        self.cache: dict[int, str] = {}

    def name(self, addr: int) -> str:
        if addr not in self.cache:
            self.cache[addr] = self._name(addr)
        return self.cache[addr]

    def _name(self, addr: int) -> str:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0 or addr >= self.maps[i].end:
            return "[anonymous]"
        m = self.maps[i]
        base = Path(m.path).name
        if self.symbols is not None and base == self.lib_guest:
            return self.symbols.lookup(addr - m.start + m.offset) or f"[{base}]"
        return f"[{base}]"
