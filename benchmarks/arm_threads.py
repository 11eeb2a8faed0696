"""Which kernels of an aarch64 artifact can use the board's cores, from the instrument.

Multi-core time needs the board; what the emulator can say is where the one-thread time
goes (the cost instrument's per-kernel cycles) and how each kernel's work is split (its
parallel loops as built, ``reports.compile.threads`` in the manifest: ``compiler/threads.py``
keeps or drops them per kernel). A loop of ``e`` iterations on ``n`` cores takes
``ceil(e / n) / e`` of its one-thread time at best; a kernel the build runs on one core, or
code outside the kernels, takes all of it. The sum is a bound on the board's time, not an
estimate of it: fork/join, shared caches and memory bandwidth are left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def artifact_threads(artifact: Path) -> dict[str, Any]:
    """The build's per-kernel thread decisions (empty for an artifact built before them)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    return (manifest.get("reports") or {}).get("compile", {}).get("threads") or {}


def share_on(kernel: dict[str, Any] | None, cores: int) -> float:
    """The fraction of a kernel's one-thread time it takes on ``cores`` at best."""
    if not kernel or not kernel["parallel"] or not kernel["extents"]:
        return 1.0
    e = max(kernel["extents"])
    return math.ceil(e / cores) / e


def why(kernel: dict[str, Any] | None, cores: int) -> str:
    """Why a kernel does not run ``cores`` times faster (empty when it may, within 10%)."""
    if kernel is None:
        return "not a compiled kernel"
    if not kernel["extents"]:
        return "no parallel loop"
    if not kernel["parallel"]:
        return f"one core: {kernel['work']:.0f} operations per call"
    e = max(kernel["extents"])
    if e < cores:
        return f"{e} parallel iterations"
    per_core = math.ceil(e / cores)
    uneven = e / (per_core * cores) < 0.9  # a tenth of the cores' time idle, or more
    return f"{e} iterations: {per_core} on the busiest core" if uneven else ""


def core_lines(label: str, row: dict[str, Any], threads: dict[str, Any], cores: int,
               ghz: float, n: int = 10) -> list[str]:
    """The section for one artifact: its heaviest kernels, their split on ``cores``, and the
    bound on the whole."""
    kernels = row["kernels"]
    total = sum(k["cycles"] for k in kernels)
    bound = sum(k["cycles"] * share_on(threads.get(k["name"]), cores) for k in kernels)
    compiled = [k for k in kernels if k["name"] in threads]
    held = [k for k in compiled if why(threads[k["name"]], cores)]
    held_share = 1 - sum(k["cycles"] for k in compiled if k not in held) / total
    serial = sum(1 for k in threads.values() if k["extents"] and not k["parallel"])
    lines = ["", f"{label} on {cores} cores: at most **{total / bound:.2f}x** its one-thread "
             f"speed ({bound / 1e6:.2f} M cycles = {bound / (ghz * 1e6):.2f} ms at {ghz:g} GHz, "
             f"a bound). {len(held)} of its {len(compiled)} kernels cannot use every core; "
             f"with the code outside the kernels they are {held_share:.1%} of the one-thread "
             f"time. The build runs {serial} kernels on one core: their work is too small to "
             "split.", "",
             f"| kernel | est. M cycles, 1 thread | parallel loops | on {cores} cores, "
             "at best | why not all cores |", "|---|---:|---|---:|---|"]
    for k in kernels[:n]:
        t = threads.get(k["name"])
        loops = ", ".join(str(e) for e in t["extents"]) if t and t["extents"] else "-"
        lines.append(f"| {k['name']} | {k['cycles'] / 1e6:.2f} | {loops} | "
                     f"{k['cycles'] * share_on(t, cores) / 1e6:.2f} | "
                     f"{why(t, cores) or '-'} |")
    return lines
