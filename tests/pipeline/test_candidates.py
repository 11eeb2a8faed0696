"""The search's timing of its candidates: each distinct graph built by the pipeline's steps
and timed on the target, here over a real RPC server and on the emulated Pi."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import copy_images

from lprnet_edge.pipeline.build import BuildOptions
from lprnet_edge.pipeline.candidates import candidate_latencies

pytestmark = pytest.mark.slow
pytest_plugins = ["emulated_device"]  # tests/emulated_device.py: the emulated Pi fixture


@pytest.fixture(scope="module")
def small_calib(data_dir: Path, tmp_path_factory) -> Path:
    calib = sorted((data_dir / "calib").glob("*.jpg"))[:120]
    return copy_images(calib, tmp_path_factory.mktemp("candidates-data") / "calib")


def test_candidate_latencies_over_rpc(weights_path, small_calib, tmp_path):
    """The search's timing over a real RPC server (127.0.0.1): two candidates with the same
    graph, one build, timed on the server's session."""
    from lprnet_edge.compiler.rpc import start_server
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.compress.configs import Fp16WeightsConfig, UnstructuredPruneConfig
    from lprnet_edge.compress.select import Candidate

    calib = small_calib
    cands = [Candidate("original"),
             Candidate("sparse80+fp16", UnstructuredPruneConfig(sparsity=0.8),
                       Fp16WeightsConfig())]
    logs: list[str] = []
    with start_server("127.0.0.1", log_path=str(tmp_path / "server.log"), wait=90) as srv:
        opts = BuildOptions(target=load_target("host"), out=tmp_path / "unused",
                            weights=weights_path, calib_dir=calib, optimize="latency",
                            latency_rpc=srv.address)
        figs = candidate_latencies(cands, opts, logs.append)
    assert set(figs) == {"original", "sparse80+fp16"}
    o, s = figs["original"], figs["sparse80+fp16"]
    assert o is s and o.measured_as == "original" and o.where == srv.address
    assert o.latency_ms > 0 and o.timing["repeat"] > 0 and o.timing["threads"] is None
    assert any(srv.address in m for m in logs)


@pytest.mark.device
def test_candidate_latencies_on_the_emulated_pi(emulated_pi, weights_path, small_calib, tmp_path):
    """``--optimize latency --host``'s timing path against the emulated Pi (qemu: the
    figure is not a board's, only the path is checked): a cross build for rpi4, timed on
    the device through a TVM RPC server started there over SSH and an SSH tunnel (the RPC
    client in a child process), with a tiny budget of 2 runs."""
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.compress.configs import Int8WeightsConfig
    from lprnet_edge.compress.select import Candidate
    from lprnet_edge.device.device import Device
    from lprnet_edge.device.ssh import SshConnection
    from lprnet_edge.device.tunnel import device_rpc

    calib = small_calib
    cands = [Candidate("original"), Candidate("int8w", None, Int8WeightsConfig())]
    conn = SshConnection(f"{emulated_pi.user}@{emulated_pi.host}:{emulated_pi.port}",
                         key=emulated_pi.key_path, known_hosts=emulated_pi.known_hosts_path,
                         timeout=60).connect()
    try:
        with device_rpc(Device(conn), server_timeout=300) as lport:
            opts = BuildOptions(target=load_target("rpi4"), out=tmp_path / "unused",
                                weights=weights_path, calib_dir=calib, optimize="latency",
                                latency_rpc=f"127.0.0.1:{lport}")
            figs = candidate_latencies(cands, opts, lambda m: None, runs=2)
    finally:
        conn.close()
    o = figs["original"]
    assert figs["int8w"] is o and o.measured_as == "original"
    assert o.where == f"127.0.0.1:{lport}" and o.latency_ms > 0 and o.timing["repeat"] == 2
