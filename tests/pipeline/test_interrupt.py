"""SIGINT at any stage of ``build --force`` leaves the previous artifact untouched, every time.

Each case runs the real CLI in a subprocess over an existing artifact and sends SIGINT once the
stage has started (``LPRNET_EDGE_PAUSE_BEFORE_STAGE`` holds the build just before it, so even the
millisecond ``package`` stage is hit at a known point).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tvm")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_weights(tiny_tvm_artifact: Path) -> Path:
    return tiny_tvm_artifact.parent / "tiny.pth"


def _build_cmd(weights: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lprnet_edge.cli.main", "build", "--target", "host",
            "--weights", str(weights), "-o", str(out), "--force", "--verify-images", "2"]


@pytest.fixture(scope="module")
def existing(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("interrupt") / "art"
    r = subprocess.run(_build_cmd(tiny_weights, out), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def _interrupt_at(stage: str, weights: Path, out: Path, pause: bool) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if pause:
        env["LPRNET_EDGE_PAUSE_BEFORE_STAGE"] = f"{stage}:3"
    p = subprocess.Popen(_build_cmd(weights, out), stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 600
    marker = f"] {stage}"
    assert p.stderr is not None
    for line in p.stderr:
        if marker in line:
            break
        assert time.monotonic() < deadline, f"stage {stage} never started"
    else:
        pytest.fail(f"build ended before stage {stage} (rc {p.wait()})")
    if pause:
        time.sleep(0.5)  # inside the pause that precedes the stage
    p.send_signal(signal.SIGINT)
    p.stderr.read()
    p.wait(timeout=300)
    return p


@pytest.mark.parametrize("stage, pause", [
    ("load", True), ("import", True), ("compile", False), ("verify", True),
    ("package", True),
])
def test_sigint_at_each_stage_keeps_the_previous_artifact(existing: Path, tiny_weights: Path,
                                                          stage: str, pause: bool):
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    p = _interrupt_at(stage, tiny_weights, existing, pause)
    assert p.returncode == 130, p.returncode
    assert {q.name: q.read_bytes() for q in existing.iterdir()} == before
    leftovers = [q.name for q in existing.parent.iterdir() if q.name.startswith(".art")]
    assert leftovers == [], leftovers
