"""test/ accuracy of an aarch64 artifact, read by the board's own runtime under qemu.

The ARM table's goals weigh speed against accuracy (the smallest variant within 0.5 point of
the original), and each peer says what it reads too. A cross-built artifact cannot run on
this host, and its PyTorch reference is not what the board computes: the runtime's
``agent eval`` (what ``lprnet-edge eval --host`` runs on a board) reads every plate of test/
under ``qemu-aarch64 -cpu`` of the board's core, at batch 1, with the artifact's own
preprocessing; a peer is read by ``lprnet_edge.runtime.peers evaluate`` the same way.
Results are kept by artifact (or peer model) identity.
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
    args = ("-m", "lprnet_edge.runtime.agent", "eval", "--artifact", str(artifact.resolve()),
            "--data", str(test_dir.resolve()), "--threads", "1")
    doc = _guest_json(args, cpu, timeout, f"eval of {artifact}")
    if not doc.get("ok"):
        raise RuntimeError(f"eval of {artifact} under qemu failed: {doc.get('error')}")
    return _counts(doc["result"])


def peer_accuracy(runtime: str, model: Path, cpu: CpuModel, test_dir: Path,
                  timeout: float = 3 * 3600) -> dict[str, Any]:
    """The same for a peer runtime (``lprnet_edge.runtime.peers evaluate``: the Recognizer's
    preprocessing and decoding around the peer's model) under qemu."""
    args = ("-m", "lprnet_edge.runtime.peers", "evaluate", "--runtime", runtime, "--model",
            str(model.resolve()), "--data", str(test_dir.resolve()), "--threads", "1")
    return _counts(_guest_json(args, cpu, timeout, f"{runtime} on {model.name}"))


def _guest_json(args: tuple[str, ...], cpu: CpuModel, timeout: float, what: str
                ) -> dict[str, Any]:
    """The JSON document a guest Python program prints last, run under ``qemu -cpu``."""
    prog = python_program("eval", args, cpu)
    r = subprocess.run([QEMU[cpu.arch], "-cpu", cpu.qemu_cpu, "-L", str(prog.rootfs),
                        *prog.argv],
                       capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **dict(prog.env)})
    lines = r.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"{what} under qemu failed (exit {r.returncode}): "
                           f"{r.stderr.strip()[-500:]}") from None


def _counts(res: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": res["accuracy"], "correct": res["correct"], "count": res["count"]}


def artifact_key(artifact: Path) -> str:
    """An artifact's identity for reuse: its manifest (which holds every file's hash)."""
    return hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()[:24]


def peer_key(runtime: str, model: Path, cpu: CpuModel) -> str:
    """A peer's identity for reuse: the runtime, its model file and the guest core (which
    chooses the runtime's kernels)."""
    h = hashlib.sha256(f"{runtime} {cpu.qemu_cpu}".encode())
    h.update(model.read_bytes())
    return h.hexdigest()[:24]
