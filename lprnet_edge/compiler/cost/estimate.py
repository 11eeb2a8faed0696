"""Estimated cycles of a program on one core: count blocks under qemu, weigh with llvm-mca.

``estimate_cycles(program, cpu)`` is the one entry point (a MetaSchedule runner can call it
with a candidate's program). Estimated cycles = sum over the blocks executed in the measured
region of executions x llvm-mca cycles per execution of the block, divided by the runs in the
region. What the model leaves out is in :data:`CAVEATS`, printed with every figure.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lprnet_edge.errors import LprnetEdgeError

from . import mca
from .counting import Counts, run_counted
from .cpus import CpuModel, cpu_model
from .plugin import find_tools
from .rootfs import GUEST_PYTHON, aarch64_rootfs, guest_site_packages, lay_cpuinfo
from .symbols import Attributor

CAVEATS = ("estimated: one core's pipeline as llvm-mca models it (a block repeated back to "
           "back); left out: caches and memory bandwidth (every load hits L1), branch "
           "mispredictions, TLB misses, the other cores, the operating system")
# Changes whenever the way blocks are counted or weighed changes: stored estimates made by
# another method are not reused.
METHOD = 3
PACKAGE_ROOT = Path(__file__).resolve().parents[3]  # the folder holding lprnet_edge/
# The guest loads TVM's runtime library only (as a board does), not the compiler: a far
# shorter start-up to translate under qemu; the counted region is the same.
RUNTIME_ONLY = ("TVM_USE_RUNTIME_LIB", "1")


@dataclass(frozen=True)
class Program:
    """A guest command that runs ``runs`` inferences inside ``measured_region()`` and prints
    the cost runner's JSON; ``lib`` is the local copy of the model's shared object, if any."""

    label: str
    argv: tuple[str, ...]
    arch: str
    runs: int
    rootfs: Path | None = None
    env: tuple[tuple[str, str], ...] = ()
    lib: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "argv": list(self.argv), "arch": self.arch,
                "runs": self.runs, "rootfs": str(self.rootfs) if self.rootfs else None,
                "lib": str(self.lib) if self.lib else None}


@dataclass(frozen=True)
class KernelCost:
    """One kernel's (or library's) share of a run, per inference."""

    name: str
    instructions: float
    cycles: float
    share: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "instructions": self.instructions, "cycles": self.cycles,
                "share": self.share}


@dataclass(frozen=True)
class CostEstimate:
    """Per inference at one thread: instructions and estimated cycles, and ms at the clocks."""

    label: str
    cpu: CpuModel
    runs: int
    instructions: float
    cycles: float
    blocks: int
    substituted: int
    kernels: tuple[KernelCost, ...] = ()
    caveats: str = CAVEATS
    guest: dict[str, Any] = field(default_factory=dict)

    def ms_at(self, ghz: float) -> float:
        """Estimated milliseconds per inference at ``ghz``."""
        return self.cycles / (ghz * 1e6)

    @property
    def ipc(self) -> float:
        return self.instructions / self.cycles if self.cycles else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "cpu": self.cpu.to_dict(), "runs": self.runs,
                "instructions": self.instructions, "estimated_cycles": self.cycles,
                "estimated_ms": {f"{g:g}GHz": self.ms_at(g) for g in self.cpu.clocks_ghz},
                "ipc": self.ipc, "blocks": self.blocks,
                "substituted_instructions": self.substituted,
                "kernels": [k.to_dict() for k in self.kernels], "caveats": self.caveats}


def python_program(label: str, args: tuple[str, ...], cpu: CpuModel, runs: int = 1,
                   lib: Path | None = None) -> Program:
    """``python ARGS`` (e.g. ``-m lprnet_edge.runtime.cost_runner ...``) on this machine as a
    guest of ``cpu``: aarch64 runs the rootfs's Python with the device venv, x86_64 this
    interpreter; the package itself comes from this checkout."""
    if cpu.arch == "x86_64":
        return Program(label, (sys.executable, *args), "x86_64", runs,
                       env=(("PYTHONPATH", str(PACKAGE_ROOT)), RUNTIME_ONLY), lib=lib)
    root = aarch64_rootfs()
    lay_cpuinfo(root, cpu)
    path = f"{PACKAGE_ROOT}:{guest_site_packages(root)}"
    return Program(label, (str(root / GUEST_PYTHON.lstrip("/")), *args), "aarch64", runs,
                   rootfs=root, env=(("PYTHONPATH", path), RUNTIME_ONLY), lib=lib)


def local_program(label: str, source: tuple[str, str], cpu: CpuModel, runs: int = 1,
                  warmup: int = 1, lib: Path | None = None) -> Program:
    """The cost runner on this machine: ``source`` is ``("--artifact", DIR)`` or
    ``("--onnx", FILE)``."""
    args = ("-m", "lprnet_edge.runtime.cost_runner", source[0], str(Path(source[1]).resolve()),
            "--runs", str(runs), "--warmup", str(warmup))
    return python_program(label, args, cpu, runs, lib)


def artifact_program(artifact: str | Path, cpu: CpuModel, runs: int = 1,
                     warmup: int = 1) -> Program:
    """A TVM artifact's model (no pre/post-processing) ``runs`` times, 1 thread."""
    art = Path(artifact)
    lib = art / "model.so"
    return local_program(art.name, ("--artifact", str(art)), cpu, runs, warmup,
                         lib if lib.is_file() else None)


def estimate_cycles(program: Program, cpu: CpuModel | str, kernels: bool = True,
                    timeout: float = 1800.0) -> CostEstimate:
    """Count ``program`` under qemu for ``cpu`` and weigh every executed block with llvm-mca.

    Deterministic for a deterministic program (same input, one thread): two calls give the
    same cycles.
    """
    cpu = cpu_model(cpu) if isinstance(cpu, str) else cpu
    if cpu.arch != program.arch:
        raise LprnetEdgeError(f"{program.label} is an {program.arch} program; {cpu.name} is "
                              f"{cpu.arch}")
    tools = find_tools(cpu.arch)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QEMU_")}
    counts = run_counted(tools, cpu, list(program.argv), {**env, **dict(program.env)},
                         program.rootfs, timeout)
    return weigh_counts(program, cpu, counts, tools.mca, kernels)


def weigh_counts(program: Program, cpu: CpuModel, counts: Counts, mca_path: str,
                 kernels: bool = True, cache_file: Path | None = None) -> CostEstimate:
    """The estimate from counted blocks (also used for counts made on a board)."""
    w = mca.weigh(mca_path, cpu.arch, cpu.mca_cpu, [b.insns for b in counts.blocks], cache_file)
    runs = max(1, int(counts.guest.get("runs", program.runs)))
    cycles = sum(b.executions * c for b, c in zip(counts.blocks, w.cycles, strict=True))
    table: tuple[KernelCost, ...] = ()
    if kernels:
        table = kernel_table(program, counts, w.cycles, runs)
    return CostEstimate(label=program.label, cpu=cpu, runs=runs,
                        instructions=counts.instructions / runs, cycles=cycles / runs,
                        blocks=len(counts.blocks), substituted=w.substituted, kernels=table,
                        guest={k: v for k, v in counts.guest.items() if k != "maps"})


def kernel_table(program: Program, counts: Counts, cycles: tuple[float, ...],
                 runs: int) -> tuple[KernelCost, ...]:
    """Per kernel (``model.so`` symbol) or library: instructions and cycles per inference."""
    names = Attributor(counts.guest.get("maps", []), counts.guest.get("lib") or None,
                       program.lib, program.arch)
    ins: dict[str, float] = defaultdict(float)
    cyc: dict[str, float] = defaultdict(float)
    for b, c in zip(counts.blocks, cycles, strict=True):
        k = names.name(b.vaddr)
        ins[k] += b.executions * len(b.insns)
        cyc[k] += b.executions * c
    total = sum(cyc.values()) or 1.0
    rows = [KernelCost(k, ins[k] / runs, cyc[k] / runs, cyc[k] / total) for k in cyc]
    return tuple(sorted(rows, key=lambda r: (-r.cycles, r.name)))
