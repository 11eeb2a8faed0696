"""Run a guest program under qemu with the counting plugin and read what it counted."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lprnet_edge.errors import LprnetEdgeError, ToolchainError
from lprnet_edge.runtime.cost_marker import GETPPID

from .cpus import CpuModel
from .plugin import Tools

# One thread, a fixed hash seed: two runs execute the same instructions.
DETERMINISTIC_ENV = {"PYTHONHASHSEED": "0", "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                     "OPENBLAS_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True)
class CountedBlock:
    """One translated block executed in the measured region."""

    vaddr: int
    size: int
    executions: int
    insns: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"vaddr": self.vaddr, "size": self.size, "executions": self.executions,
                "insns": list(self.insns)}


@dataclass(frozen=True)
class Counts:
    """What the plugin counted inside the region, and the guest program's own report."""

    instructions: int
    executions: int
    regions: int
    blocks: tuple[CountedBlock, ...]
    guest: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"instructions": self.instructions, "executions": self.executions,
                "regions": self.regions, "blocks": len(self.blocks), "guest": self.guest}


def parse_report(text: str) -> Counts:
    """The plugin's report (see bbcount.c for the format)."""
    head: dict[str, int] = {}
    blocks: list[CountedBlock] = []
    cur: tuple[int, int, int] | None = None
    insns: list[str] = []
    for line in text.splitlines():
        if line.startswith("I "):
            insns.append(line[2:])
        elif line.startswith("B "):
            if cur:
                blocks.append(CountedBlock(*cur, tuple(insns)))
            _, va, size, _n, ex = line.split()
            cur, insns = (int(va, 16), int(size), int(ex)), []
        elif line.strip():
            k, v = line.split()
            head[k] = int(v)
    if cur:
        blocks.append(CountedBlock(*cur, tuple(insns)))
    if head.get("bbcount") != 1:
        raise ToolchainError("the counting plugin's report is not version 1")
    return Counts(instructions=head["instructions"], executions=head["executions"],
                  regions=head["regions"], blocks=tuple(blocks))


def qemu_command(tools: Tools, cpu: CpuModel, report: Path, argv: list[str],
                 rootfs: Path | None) -> list[str]:
    """The qemu command line that runs ``argv`` with the plugin writing ``report``.

    Address randomisation is off (``setarch -R``): where buffers land changes alignment, and
    with it the paths memcpy and the kernels' edge loops take, so two runs would differ."""
    cmd = [*_no_aslr(), tools.qemu, "-cpu", cpu.qemu_cpu]
    if rootfs is not None:
        cmd += ["-L", str(rootfs)]
    return cmd + ["-plugin", f"{tools.plugin},out={report},nr={GETPPID[cpu.arch]}", *argv]


def _no_aslr() -> list[str]:
    setarch = shutil.which("setarch")
    return [setarch, "-R"] if setarch else []


def run_counted(tools: Tools, cpu: CpuModel, argv: list[str], env: dict[str, str],
                rootfs: Path | None = None, timeout: float = 1800.0) -> Counts:
    """Run ``argv`` under qemu for ``cpu``; the guest must print one JSON document
    (``{"ok": true, "result": ...}``) and bracket its work with ``measured_region()``."""
    with tempfile.TemporaryDirectory(prefix="lprnet-cost-") as tmp:
        report = Path(tmp) / "blocks.txt"
        cmd = qemu_command(tools, cpu, report, argv, rootfs)
        try:
            proc = subprocess.run(cmd, env={**env, **DETERMINISTIC_ENV}, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LprnetEdgeError(f"the counted run took more than {timeout:.0f} s") from e
        if proc.returncode != 0 or not report.is_file():
            raise LprnetEdgeError(f"the counted run failed (exit {proc.returncode}): "
                                  f"{proc.stderr.strip()[-800:]}")
        counts = parse_report(report.read_text())
    return with_guest(counts, proc.stdout)


def with_guest(counts: Counts, stdout: str, **extra: Any) -> Counts:
    """``counts`` with the guest's JSON report (its last line on stdout) and ``extra``."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    doc = json.loads(lines[-1]) if lines else {}
    if lines and "ok" not in doc:  # a guest that prints its result alone (runtime/peers.py)
        doc = {"ok": True, "result": doc}
    if not doc.get("ok"):
        raise LprnetEdgeError(f"the counted program did not report success: {stdout[-500:]}")
    if counts.regions < 1:
        raise LprnetEdgeError("the counted program never closed a measured region "
                              "(lprnet_edge.runtime.cost_marker.measured_region)")
    return Counts(counts.instructions, counts.executions, counts.regions, counts.blocks,
                  guest={**doc["result"], **extra})
