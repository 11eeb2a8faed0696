"""test/ accuracy of an aarch64 artifact, read by the board's own runtime under qemu.

The ARM table's goals weigh speed against accuracy (the smallest variant within 0.5 point of
the original). A cross-built artifact cannot run on this host, and its PyTorch reference is
not what the board computes: the runtime's ``agent eval`` (what ``lprnet-edge eval --host``
runs on a board) reads every plate of test/ under ``qemu-aarch64 -cpu`` of the board's core,
at batch 1, with the artifact's own preprocessing. Results are kept by artifact identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from lprnet_edge.compiler.cost.cpus import CpuModel
from lprnet_edge.compiler.cost.estimate import python_program
from lprnet_edge.compiler.cost.plugin import QEMU


def test_accuracy(artifact: Path, cpu: CpuModel, test_dir: Path,
                  timeout: float = 3 * 3600) -> dict[str, Any]:
    """``{"accuracy", "correct", "count"}`` of ``artifact`` on ``test_dir`` under qemu."""
    prog = python_program("eval", ("-m", "lprnet_edge.runtime.agent", "eval", "--artifact",
                                   str(artifact.resolve()), "--data", str(test_dir.resolve()),
                                   "--threads", "1"), cpu)
    r = subprocess.run([QEMU[cpu.arch], "-cpu", cpu.qemu_cpu, "-L", str(prog.rootfs),
                        *prog.argv],
                       capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **dict(prog.env)})
    lines = r.stdout.strip().splitlines()
    doc = json.loads(lines[-1]) if lines else {}
    if not doc.get("ok"):
        raise RuntimeError(f"eval of {artifact} under qemu failed: "
                           f"{doc.get('error') or r.stderr.strip()[-500:]}")
    res = doc["result"]
    return {"accuracy": res["accuracy"], "correct": res["correct"], "count": res["count"]}


def artifact_key(artifact: Path) -> str:
    """An artifact's identity for reuse: its manifest (which holds every file's hash)."""
    return hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()[:24]
