"""Weigh translated blocks with llvm-mca: cycles per execution of each block on one core.

qemu's disassembly (vixl for aarch64, capstone AT&T for x86_64) is close to what LLVM's
assembler accepts; branch and address targets are absolute addresses, which llvm-mca cannot
resolve, so they are replaced by one local label (the target does not change the cost of a
branch in llvm-mca's model, which has no branch predictor). A line LLVM still rejects is
replaced by a ``nop`` and counted in :attr:`Weights.substituted`.

The figure per block is llvm-mca's *Total Cycles / Iterations* over many back-to-back
iterations: the block simulated as a loop body, so a reduction chained through one register is
charged its latency, not only the issue slots (Block RThroughput would make a latency-bound
naive loop look as cheap as an unrolled one). Weights are cached per (llvm-mca, arch, cpu) by a
hash of the rewritten block, so a block seen in another program or run is not weighed again
(and another LLVM's weights are never reused).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lprnet_edge.errors import ToolchainError
from lprnet_edge.paths import cache_dir

ITERATIONS = 100
CHUNK = 400  # blocks per llvm-mca process
LABEL = ".Lt"
TRIPLE = {"aarch64": "aarch64", "x86_64": "x86_64"}
_A64_BRANCH = re.compile(r"^(b|bl|b\.\w+|cbz|cbnz|tbz|tbnz|adr|adrp)\s")
_A64_TARGET = re.compile(r"#0x[0-9a-f]+$")
_X86_BRANCH = re.compile(r"^(j\w+|call\w?|loop\w*|xbegin)\s+0x[0-9a-f]+$")
_X86_TARGET = re.compile(r"0x[0-9a-f]+$")
_ERROR = re.compile(r"^[^:\n]+:(\d+):\d+: error:", re.M)
# x86 string instructions with a rep prefix: qemu runs one element per block execution.
_X86_REP = re.compile(r"^rep\w*\s+(movs|stos|lods|scas|cmps)([bwlq])\b")
_ELEMENT_BYTES = {"b": 1, "w": 2, "l": 4, "q": 8}
STRING_BYTES_PER_CYCLE = 32  # one 256-bit store per cycle: what fast string moves sustain


def rewrite(arch: str, insn: str) -> str:
    """One instruction of qemu's disassembly as assembly llvm-mca accepts."""
    s = insn.strip()
    if arch == "aarch64":
        if _A64_BRANCH.match(s):
            s = _A64_TARGET.sub(LABEL, s)
    elif _X86_BRANCH.match(s):
        s = _X86_TARGET.sub(LABEL, s)
    return s


def rep_element_cycles(arch: str, block: Sequence[str]) -> float | None:
    """Cycles per execution of a block that is one ``rep`` string instruction, or None.

    qemu translates ``rep stosb`` as a block that executes once per element, where llvm-mca
    weighs the instruction as a whole (about 100 cycles): a 4 KB memset would count 400,000
    cycles. One element costs its bytes at the rate fast string moves sustain instead.
    """
    if arch != "x86_64" or len(block) != 1:
        return None
    m = _X86_REP.match(block[0].strip())
    return _ELEMENT_BYTES[m.group(2)] / STRING_BYTES_PER_CYCLE if m else None


def block_key(arch: str, cpu: str, lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join([arch, cpu, *lines]).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Weights:
    """Cycles per execution of each block, in the order given, and how many distinct
    instructions llvm-mca could not read (weighed as ``nop``)."""

    cycles: tuple[float, ...]
    substituted: int
    weighed: int  # blocks not found in the cache

    def to_dict(self) -> dict[str, object]:
        return {"blocks": len(self.cycles), "substituted": self.substituted,
                "weighed": self.weighed}


def _cache_file(mca: str, arch: str, cpu: str) -> Path:
    return cache_dir() / "mca" / f"{Path(mca).name}-{arch}-{cpu}-i{ITERATIONS}.json"


def _load_cache(path: Path) -> dict[str, list[float]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, cache: dict[str, list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".mca-")
    with os.fdopen(fd, "w") as f:
        json.dump(cache, f)
    os.replace(tmp, path)


def _source(blocks: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """The llvm-mca input (one code region per block) and the block of every line (-1: none)."""
    lines, owner = [f"{LABEL}:"], [-1]
    for i, blk in enumerate(blocks):
        lines.append(f"# LLVM-MCA-BEGIN b{i}")
        lines.extend(blk)
        lines.append(f"# LLVM-MCA-END b{i}")
        owner.extend([-1, *([i] * len(blk)), -1])
    return lines, owner


def _parse_regions(out: str, n: int) -> list[float]:
    cycles: list[float] = []
    for sec in re.split(r"\n\[\d+\] Code Region", out)[1:] or [out]:
        it = re.search(r"^Iterations:\s+(\d+)", sec, re.M)
        tc = re.search(r"^Total Cycles:\s+(\d+)", sec, re.M)
        if not it or not tc:
            raise ToolchainError(f"llvm-mca output not understood: {sec[:300]!r}")
        cycles.append(int(tc.group(1)) / int(it.group(1)))
    if len(cycles) != n:
        raise ToolchainError(f"llvm-mca reported {len(cycles)} regions for {n} blocks")
    return cycles


def _run_mca(mca: str, arch: str, cpu: str,
             blocks: list[list[str]]) -> tuple[list[float], list[int]]:
    """Weigh ``blocks`` in one llvm-mca process: cycles and substituted lines per block (a
    line llvm-mca rejects becomes ``nop`` and the chunk is weighed again)."""
    src, owner = _source(blocks)
    substituted = [0] * len(blocks)
    for _ in range(20):
        with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
            f.write("\n".join(src) + "\n")
        try:
            proc = subprocess.run(
                [mca, f"-mtriple={TRIPLE[arch]}", f"-mcpu={cpu}", f"-iterations={ITERATIONS}",
                 "-instruction-info=false", "-resource-pressure=false", f.name],
                capture_output=True, text=True)
        finally:
            os.unlink(f.name)
        if proc.returncode == 0:
            return _parse_regions(proc.stdout, len(blocks)), substituted
        bad = {int(m) for m in _ERROR.findall(proc.stderr)}
        if not bad or any(owner[ln - 1] < 0 for ln in bad):
            raise ToolchainError(f"llvm-mca failed: {proc.stderr.strip()[:500]}")
        for ln in bad:
            src[ln - 1] = "nop"
            substituted[owner[ln - 1]] += 1
    raise ToolchainError("llvm-mca kept rejecting the rewritten blocks")


def weigh(mca: str, arch: str, cpu: str, blocks: Sequence[Sequence[str]],
          cache_file: Path | None = None) -> Weights:
    """Cycles per execution of every block (cached by the hash of its rewritten text, in
    ``cache_file`` or the user's cache)."""
    rewritten = [[rewrite(arch, s) for s in blk] for blk in blocks]
    keys = [block_key(arch, cpu, blk) for blk in rewritten]
    path = cache_file or _cache_file(mca, arch, cpu)
    cache = _load_cache(path)
    for k, blk in zip(keys, rewritten, strict=True):
        if (c := rep_element_cycles(arch, blk)) is not None:
            cache[k] = [c, 0]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in cache}.items())
    for lo in range(0, len(todo), CHUNK):
        part = todo[lo:lo + CHUNK]
        cyc, subs = _run_mca(mca, arch, cpu, [rewritten[i] for _, i in part])
        for (k, _), c, n in zip(part, cyc, subs, strict=True):
            cache[k] = [c, n]
    if todo:
        _save_cache(path, cache)
    return Weights(cycles=tuple(cache[k][0] for k in keys),
                   substituted=sum(int(cache[k][1]) for k in set(keys)),
                   weighed=len(todo))
