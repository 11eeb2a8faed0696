"""The one run path (local session, RPC session) and the per-kernel profiler, on a real host
build of a small random LPRNet: through the library, the CLI, a real RPC server on 127.0.0.1
(stopped by pid) and the device agent run as a subprocess here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_user_error

pytest.importorskip("tvm")
pytestmark = pytest.mark.slow

TIMING_KEYS = {"mean_ms", "median_ms", "p90_ms", "min_ms", "runs", "number", "repeat",
               "threads"}


@pytest.fixture(scope="module")
def artifact(tiny_tvm_artifact: Path) -> Path:
    return tiny_tvm_artifact


@pytest.fixture(scope="module")
def profile(artifact: Path):
    from lprnet_edge.compiler.session import time_artifact

    return time_artifact(artifact, repeat=5, warmup=1, profile=True, profile_runs=3)


def test_local_session_times_and_profiles(artifact: Path, profile):
    from lprnet_edge.runtime.profile import Profile, Timing

    res = profile
    assert res.where == "local" and res.output_shape == [1, 68, 18]
    t = res.timing
    assert isinstance(t, Timing) and t.runs == t.number * t.repeat == 5
    assert 0 < t.min_ms <= t.median_ms <= t.p90_ms and t.threads and t.threads >= 1
    p = res.profile
    assert isinstance(p, Profile) and p.runs == 3
    # Sum of kernels vs the uninstrumented call: the same work, within a sane factor.
    assert 0.3 < p.kernels_ms / p.wall.median_ms < 3, (p.kernels_ms, p.wall.median_ms)
    assert [r.ms for r in p.rows] == sorted((r.ms for r in p.rows), reverse=True)
    assert abs(sum(r.share for r in p.rows) - 1) < 1e-6
    convs = [r for r in p.rows if "conv2d" in r.name]
    assert len(convs) >= 10
    assert all(r.gflops is not None and r.gflops > 0 for r in convs)
    assert all(r.gflops is None for r in p.rows if "conv" not in r.name)
    # Every compiled kernel says how it was scheduled; the VM's builtins do not.
    kinds = {"tuned", "default", "transferred", "injective", "naive"}
    assert all(r.schedule in kinds for r in p.rows if not r.is_builtin)
    assert all(r.schedule is None for r in p.rows if r.is_builtin)
    assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    table = p.format(top=5)
    assert "other (" in table and "GFLOP/s" in table and "uninstrumented" in table


def test_conv_flops_from_shapes():
    from lprnet_edge.runtime.profile import conv_flops

    # NCHW out 1x64x18x44, OIHW weight 64x64x3x1: out x 2 x 64 x 3 x 1.
    shapes = [[1, 64, 20, 44], [64, 64, 3, 1], [1, 64, 1, 1], [1, 64, 18, 44]]
    assert conv_flops("fused_conv2d6_add3_relu3", shapes) == 64 * 18 * 44 * 2 * 64 * 3
    # The same convolution in NCHWc (weight OIHW4i8o, output 1x8x18x44x8).
    nchwc = [[1, 16, 20, 44, 4], [8, 16, 3, 1, 4, 8], [1, 8, 18, 44, 8]]
    assert conv_flops("fused_conv2d_NCHWc", nchwc) == 64 * 18 * 44 * 2 * 64 * 3
    assert conv_flops("max_pool2d", [[1, 64, 22, 92], [1, 64, 20, 90]]) is None


def test_conv_flops_of_every_dot_product_packing():
    """The profile knows every packing ``compiler.dot`` makes (its kernel names and weight
    shapes), without importing the compiler on the device."""
    from lprnet_edge.compiler.dot import KINDS
    from lprnet_edge.runtime.profile import DOT_KINDS, conv_flops

    assert set(DOT_KINDS) == set(KINDS)
    for kind in KINDS.values():  # int8 NHWC 64 -> 64, 3x1, out 1x18x44x64
        w = [64 // kind.lanes, 3, 1, 64 // 4, kind.groups, kind.lanes, kind.group_size]
        shapes = [[1, 20, 44, 64], w, [1, 18, 44, 64]]
        assert conv_flops(f"fused_{kind.name}_conv2d3_cast", shapes) == 64 * 18 * 44 * 2 * 64 * 3


def test_schedules_from_the_manifest(artifact: Path):
    from lprnet_edge.runtime.artifact import Artifact
    from lprnet_edge.runtime.profile import KernelSchedules

    records = Artifact.open(artifact).manifest.records
    s = KernelSchedules.from_records(records)
    listed = records["reports"]["compile"]["kernel_schedules"]  # {} without defaults packaged
    assert isinstance(listed, dict) and all(s.of(k) == v for k, v in listed.items())
    assert s.of("a_kernel_no_schedule_covered") == "naive"
    # A tuning summary alone (older builds): a task with records is tuned, others naive.
    old = {"reports": {"tune": {"per_task": [{"task": "a", "records": 3},
                                             {"task": "b", "records": 0}]}}}
    s = KernelSchedules.from_records(old)
    assert (s.of("a"), s.of("b"), s.of("c")) == ("tuned", "naive", "naive")
    assert KernelSchedules.from_records({}).of("a") is None


def test_cli_bench_profile_json_and_table(cli_runner, artifact: Path):
    r = cli_runner("bench", "--artifact", artifact, "--runs", "3", "--warmup", "1",
                   "--threads", "1", "--profile", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert TIMING_KEYS <= set(res["time_evaluator"]) and res["time_evaluator"]["threads"] == 1
    prof = res["profile"]
    assert prof["rows"] and prof["kernels_ms"] > 0 and prof["wall"]["median_ms"] > 0
    assert {"name", "ms", "share", "calls", "gflops", "schedule"} <= set(prof["rows"][0])

    r = cli_runner("bench", "--artifact", artifact, "--runs", "3", "--warmup", "1",
                   "--profile")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.index("TVM time_evaluator") < out.index("Per kernel") < out.index("sum of kernels")
    assert "GFLOP/s" in out and "schedule" in out


def test_rpc_session_gives_the_same_result_shape(artifact: Path, profile, tmp_path: Path):
    from lprnet_edge.compiler.rpc import start_server
    from lprnet_edge.compiler.session import BenchResult, open_session, time_artifact

    with start_server("127.0.0.1", log_path=str(tmp_path / "server.log"), wait=90) as srv:
        sess = open_session(rpc=srv.address, timeout=120)
        res = time_artifact(artifact, sess, repeat=4, warmup=1)
        remote = time_artifact(artifact, sess, repeat=4, warmup=1, profile=True,
                               profile_runs=5).profile
        del sess
    # Over RPC every kernel of the build is called from here (no instrument on the device).
    assert remote is not None and remote.method == "rpc-calls"
    local_kernels = {r.name for r in profile.profile.rows if not r.is_builtin}
    assert {r.name for r in remote.rows} == local_kernels
    assert remote.kernels_ms > 0 and all(r.ms >= 0 for r in remote.rows)
    assert any(r.gflops for r in remote.rows if "conv2d" in r.name)
    assert "round trips" in remote.format()
    assert isinstance(res, BenchResult) and type(res.timing) is type(profile.timing)
    assert res.where == srv.address and res.output_shape == profile.output_shape
    assert res.timing.runs == res.timing.repeat == 4 and res.timing.median_ms > 0
    assert set(res.to_dict()) == set(profile.to_dict()) - {"profile"}
    assert set(res.to_dict()["time_evaluator"]) == set(profile.to_dict()["time_evaluator"])


def test_cli_rpc_profile(cli_runner, artifact: Path, tmp_path: Path):
    from lprnet_edge.compiler.rpc import free_port, start_server

    with start_server("127.0.0.1", log_path=str(tmp_path / "server.log"), wait=90) as srv:
        r = cli_runner("bench", "--artifact", artifact, "--rpc", srv.address, "--runs", "3",
                       "--warmup", "1", "--profile")
    assert r.exit_code == 0, r.output
    assert "Per kernel" in r.stdout and "round trips" in r.stdout and "conv2d" in r.stdout

    # An artifact whose build recorded no kernel signatures is refused before connecting.
    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["reports"]["compile"]["kernels"]
    (old / "manifest.json").write_text(json.dumps(m))
    r = cli_runner("bench", "--artifact", old, "--rpc", f"127.0.0.1:{free_port()}",
                   "--profile")
    assert_user_error(r, "no kernel signatures", "rebuild the artifact", "--host USER@HOST")


def test_cli_host_rpc_profile_is_a_clear_error(cli_runner):
    # Refused before SSH is tried: the profile runs in the device agent, not over RPC.
    r = cli_runner("bench", "--host", "pi@127.0.0.1:1", "--tunnel", "--profile")
    assert_user_error(r, "drop --tunnel", "--host USER@HOST --profile")


def test_agent_bench_profile(artifact: Path):
    """The device agent's ``bench --profile``, run here as it runs on a board (torch blocked,
    JSON on stdout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LPRNET_EDGE_AGENT_ALLOW_TORCH", None)
    r = subprocess.run([sys.executable, "-m", "lprnet_edge.runtime.agent", "bench",
                        "--artifact", str(artifact), "--runs", "3", "--warmup", "1",
                        "--threads", "1", "--profile"],
                       capture_output=True, text=True, env=env, timeout=300)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"], r.stderr
    res = doc["result"]
    assert res["runs"] == 3 and res["threads"] == 1
    prof = res["profile"]
    assert prof["wall"]["threads"] == 1 and prof["runs"] == 3
    convs = [row for row in prof["rows"] if "conv2d" in row["name"]]
    assert convs and all(row["gflops"] > 0 for row in convs)
    assert np.isclose(sum(row["share"] for row in prof["rows"]), 1.0)
