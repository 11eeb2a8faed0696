"""``bench --estimate --host``: the deployed rpi4 model counted on the emulated Pi itself
(its Python, TVM runtime and artifact, under the host's qemu copied there), weighed here; the
figures equal a local estimate of the same artifact (the same instructions run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from host_device import build_rpi4

from lprnet_edge.compiler.cost.cpus import CPUS
from lprnet_edge.compiler.cost.estimate import artifact_program, estimate_cycles
from lprnet_edge.compiler.cost.plugin import find_tools
from lprnet_edge.errors import ToolchainError

pytest_plugins = ["emulated_device"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rpi4_artifact(tmp_path_factory, weights_path) -> Path:
    """$LPRNET_EDGE_RPI4_ARTIFACT, else built here."""
    if os.environ.get("LPRNET_EDGE_RPI4_ARTIFACT"):
        return Path(os.environ["LPRNET_EDGE_RPI4_ARTIFACT"])
    return build_rpi4(tmp_path_factory, weights_path)


@pytest.mark.slow
@pytest.mark.device
def test_estimate_on_the_emulated_pi_equals_the_local_one(emulated_pi, rpi4_artifact):
    try:
        find_tools("aarch64")
    except ToolchainError as e:
        pytest.skip(str(e))
    host = ["--host", f"{emulated_pi.user}@{emulated_pi.host}:{emulated_pi.port}",
            "--key", str(emulated_pi.key_path), "--known-hosts", str(emulated_pi.known_hosts_path)]
    cli = [sys.executable, "-m", "lprnet_edge.cli.main"]
    r = subprocess.run([*cli, "deploy", str(rpi4_artifact), *host], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([*cli, "bench", "--estimate", "--artifact", str(rpi4_artifact), "--json",
                        *host], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    board = json.loads(r.stdout)
    assert board["cpu"]["name"] == "cortex-a72"
    assert board["kernels"][0]["name"].startswith("fused_conv2d")
    cpu = CPUS["cortex-a72"]
    local = estimate_cycles(artifact_program(rpi4_artifact, cpu), cpu)
    # The model's kernels execute the same blocks on the board and here; only the
    # interpreter's few blocks around them may differ (paths, environment).
    model = {k["name"]: k["cycles"] for k in board["kernels"] if not k["name"].startswith("[")}
    here = {k.name: k.cycles for k in local.kernels if not k.name.startswith("[")}
    assert model == pytest.approx(here, rel=1e-9)
    assert board["estimated_cycles"] == pytest.approx(local.cycles, rel=0.01)
