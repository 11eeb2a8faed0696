"""TVM RPC against real servers on 127.0.0.1: direct, through a tracker, and unreachable.

Servers and trackers run in their own sessions (``lprnet_edge.compiler.rpc.start_server``) and are
stopped as process groups; every wait is bounded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error

from lprnet_edge.runtime.errors import DeviceError

pytest.importorskip("tvm")
pytestmark = pytest.mark.slow

TASK = "fused_add7_divide_conv2d12_add6_divide1"  # the smallest convolution
SEARCH = {"population_size": 64, "init_min_unmeasured": 16, "genetic_num_iters": 1}


def test_parse_hostport():
    from lprnet_edge.compiler.rpc import parse_hostport
    from lprnet_edge.runtime.errors import LprnetEdgeError

    assert parse_hostport("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert parse_hostport("[::1]:9090") == ("::1", 9090)
    for bad in ("127.0.0.1", "host:", ":9090", "h:99999", "h:port"):
        with pytest.raises(LprnetEdgeError, match="HOST:PORT"):
            parse_hostport(bad)


def test_unreachable_server_and_tracker_fail_fast():
    from lprnet_edge.compiler.rpc import connect, free_port

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="cannot reach the RPC server"):
        connect(rpc=f"127.0.0.1:{port}", timeout=3)
    with pytest.raises(DeviceError, match="cannot reach the RPC tracker"):
        connect(tracker=f"127.0.0.1:{port}", key="k", timeout=3)
    assert time.monotonic() - t0 < 10


@pytest.fixture(scope="module")
def tiny_artifact(tiny_tvm_artifact: Path) -> Path:
    return tiny_tvm_artifact


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from lprnet_edge.compiler.rpc import start_server

    log = tmp_path_factory.mktemp("rpc") / "server.log"
    with start_server("127.0.0.1", log_path=str(log), wait=90) as srv:
        yield srv


@pytest.fixture(scope="module")
def tracker_and_server(tmp_path_factory: pytest.TempPathFactory):
    from lprnet_edge.compiler.rpc import start_server, start_tracker, wait_for_key

    d = tmp_path_factory.mktemp("rpc-tracker")
    with start_tracker("127.0.0.1", log_path=str(d / "tracker.log"), wait=60) as trk:
        with start_server("127.0.0.1", tracker=trk.address, key="lprnet-test",
                          log_path=str(d / "server.log"), wait=90) as srv:
            wait_for_key(trk.address, "lprnet-test", timeout=60)
            yield trk, srv


def test_remote_run_matches_local(tiny_artifact: Path, tmp_path: Path):
    from lprnet_edge.compiler.rpc import start_server
    from lprnet_edge.compiler.session import open_session, run_host, time_module
    from lprnet_edge.runtime.profile import module_inputs

    inp = module_inputs(tiny_artifact)
    # Its own server: a server serves one session at a time, and this test's session may
    # outlive the test until Python collects it.
    with start_server("127.0.0.1", log_path=str(tmp_path / "server.log"), wait=90) as srv:
        sess = open_session(rpc=srv.address, timeout=120)
        res = time_module(sess, inp.lib_path, inp.params, inp.x, inp.entry, repeat=5, warmup=1)
        del sess
    np.testing.assert_allclose(res.output, run_host(inp.lib_path, inp.x, inp.params),
                               rtol=1e-4, atol=1e-4)
    assert res.timing.runs == 5 and res.timing.median_ms > 0
    assert res.timing.threads is None  # the server's TVM_NUM_THREADS decides, not ours


def test_cli_bench_rpc_direct(cli_runner, server, tiny_artifact: Path):
    r = cli_runner("bench", "--artifact", tiny_artifact, "--rpc", server.address,
                   "--runs", "5", "--warmup", "1", "--timeout", "120", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    t = res["time_evaluator"]
    assert t["runs"] == 5 and 0 < t["min_ms"] <= t["p50_ms"] <= t["p90_ms"]
    assert res["output_shape"] == [1, 68, 18]


def test_cli_bench_rpc_unreachable(cli_runner, tiny_artifact: Path):
    from lprnet_edge.compiler.rpc import free_port

    r = cli_runner("bench", "--artifact", tiny_artifact, "--rpc", f"127.0.0.1:{free_port()}",
                   "--timeout", "3")
    assert_user_error(r, "cannot reach the RPC server")
    assert r.exit_code == 7


def test_tune_over_direct_rpc(server, tmp_path: Path):
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.compiler.tuning import TuneConfig, TuneOptions, count_records, tune
    from lprnet_edge.model.lprnet import LPRNet

    mod, _ = to_relax(LPRNet(class_num=68).eval())
    cfg = TuneConfig(trials=4, num_trials_per_iter=4, rpc=server.address,
                     db_dir=str(tmp_path / "db"), timeout_s=60)
    _db, s = tune(mod, load_target("host"), cfg, log=lambda _m: None,
                  options=TuneOptions(tasks=[TASK], search=SEARCH))
    assert s.trials_new == 4 and s.runner.startswith("rpc ")
    assert s.per_task[0].best_ms is not None  # measured on the server, not failed
    assert count_records(tmp_path / "db") == 4


def test_tracker_bench_and_tune(cli_runner, tracker_and_server, tiny_artifact: Path,
                                tmp_path: Path, tiny_checkpoint):
    trk, _srv = tracker_and_server
    r = cli_runner("bench", "--artifact", tiny_artifact, "--rpc-tracker", trk.address,
                   "--rpc-key", "lprnet-test", "--runs", "3", "--warmup", "1",
                   "--timeout", "120", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["time_evaluator"]["runs"] == 3

    r = cli_runner("tune", "--weights", tiny_checkpoint, "--trials", "4", "--task", TASK,
                   "--population-size", "64", "--rpc-tracker", trk.address,
                   "--rpc-key", "lprnet-test", "--tuning-db", tmp_path / "db", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["trials_new"] == 4 and s["est_ms_after"] is not None


def test_tracker_unknown_key(cli_runner, tracker_and_server, tiny_artifact: Path):
    trk, _srv = tracker_and_server
    r = cli_runner("bench", "--artifact", tiny_artifact, "--rpc-tracker", trk.address,
                   "--rpc-key", "no-such-device", "--timeout", "10")
    assert_user_error(r, "no device with key 'no-such-device'", "lprnet-test")


def test_cli_bench_local(cli_runner, tiny_artifact: Path):
    r = cli_runner("bench", "--artifact", tiny_artifact, "--runs", "3", "--warmup", "1",
                   "--threads", "1", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    for key in ("end_to_end", "model_only", "time_evaluator"):
        assert res[key]["runs"] == 3 and res[key]["p50_ms"] > 0, key
    assert res["end_to_end"]["include_preprocess"] is True
