"""The TVM RPC server started on the device over SSH and the tunnel to it, against a real sshd
on 127.0.0.1 (x86): the host is the device (see ``host_device``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from host_device import make_device

from lprnet_edge.device.tunnel import rpc_bench

pytest_plugins = ["sshd_fixture", "host_device"]
pytestmark = pytest.mark.slow  # builds a TVM artifact once per session


def test_bench_over_rpc_through_the_ssh_tunnel(host_sshd, host_artifact, remote_dir):
    """A TVM RPC server started over SSH on the device's 127.0.0.1, reached through a
    direct-tcpip tunnel, timed with time_evaluator, and stopped (process group) afterwards."""
    dev = make_device(host_sshd, remote_dir)
    stats = rpc_bench(dev, host_artifact, number=1, repeat=3)
    assert stats.mode == "rpc" and stats.latency["runs"] == 3 and stats.latency["p50_ms"] > 0
    assert stats.latency["output_shape"] == [1, 68, 18]
    assert not stats.latency["include_preprocess"]
    port = stats.latency["port"]
    left = subprocess.run(["pgrep", "-f", f"rpc_server.*--port {port}"],
                          capture_output=True, text=True).stdout.split()
    assert not [p for p in left if Path(f"/proc/{p}/cwd").resolve() == remote_dir / "tmp"]
    assert not list((remote_dir / "tmp").glob("rpc-*.log"))
    dev.conn.close()
