"""MetaSchedule tuning: the database is filled as measured, survives a crash, is reused.

The slow tests tune a single tiny elementwise task (``multiply1``) with a handful of trials,
so they measure the machinery (worker process, records, resume, reuse), not speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error

from lprnet_edge.compress.configs import TuneConfig
from lprnet_edge.runtime.errors import DeviceError, LprnetEdgeError

TASK = "fused_add7_divide_conv2d12_add6_divide1"  # the smallest conv: a 1x1 head part
# A small evolutionary search: these tests check the machinery, not schedule quality.
SEARCH = {"population_size": 64, "init_min_unmeasured": 16, "genetic_num_iters": 1}


# ---------------------------------------------------------------- fast checks


def test_target_key_is_canonical():
    from lprnet_edge.compiler.tune import target_key

    a = {"kind": "llvm", "mcpu": "znver1", "num-cores": 2}
    b = {"num-cores": 2, "kind": "llvm", "mcpu": "znver1"}
    assert target_key(a) == target_key(b)
    assert target_key(a) != target_key({**a, "mcpu": "cortex-a72"})


def test_count_records(tmp_path: Path):
    from lprnet_edge.compiler.tune import DB_FILES, count_records, has_records

    assert count_records(tmp_path) == 0 and not has_records(tmp_path)
    (tmp_path / DB_FILES[1]).write_text('[0, 1]\n[0, 2]\n\n')
    assert count_records(tmp_path) == 2 and has_records(tmp_path)


def test_worker_env_keeps_torch_out():
    import subprocess
    import sys

    from lprnet_edge.compiler.tune import worker_env

    code = ("import sys\ntry:\n    import torch\nexcept ImportError:\n    pass\n"
            "import inspect\nprint('torch' in sys.modules, "
            "inspect.getmodule.__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=worker_env(), text=True,
                         capture_output=True, check=True).stdout.split()
    assert out == ["False", "_getmodule"]


def test_tune_config_checks():
    with pytest.raises(LprnetEdgeError, match="--rpc-key"):
        TuneConfig(rpc_tracker="127.0.0.1:9190")
    with pytest.raises(LprnetEdgeError, match="trials"):
        TuneConfig(trials=0)


def test_unreachable_device_fails_fast():
    pytest.importorskip("tvm")
    from lprnet_edge.compiler.rpc import free_port
    from lprnet_edge.compiler.tune import tune

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=f"127.0.0.1:{port}"):
        tune(None, {"kind": "llvm"}, TuneConfig(trials=8, rpc=f"127.0.0.1:{port}",
                                                timeout_s=5), log=lambda _m: None)
    assert time.monotonic() - t0 < 15


def test_cli_tune_rejects_both_rpc_forms(cli_runner):
    r = cli_runner("tune", "--rpc", "127.0.0.1:1", "--rpc-tracker", "127.0.0.1:2",
                   "--rpc-key", "k")
    assert r.exit_code != 0
    assert "not both" in r.output


def test_cli_tune_unreachable(cli_runner, tiny_checkpoint):
    pytest.importorskip("tvm")
    from lprnet_edge.compiler.rpc import free_port

    r = cli_runner("tune", "--weights", tiny_checkpoint, "--trials", "4", "--timeout", "5",
                   "--rpc", f"127.0.0.1:{free_port()}")
    assert_user_error(r, "cannot reach the RPC server")
    assert r.exit_code == 7


# ---------------------------------------------------------------- real tuning


@pytest.fixture(scope="module")
def relax_model():
    pytest.importorskip("tvm")
    torch = pytest.importorskip("torch")
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.model.lprnet import LPRNet

    torch.manual_seed(0)
    model = LPRNet(class_num=68).eval()
    mod, params = to_relax(model)
    return model, mod, params


@pytest.fixture(scope="module")
def host():
    from lprnet_edge.compiler.target import load_target

    return load_target("host")


@pytest.mark.slow
def test_tune_crash_resume_and_reuse(relax_model, host, tmp_path: Path, monkeypatch):
    """A crash keeps the records; the same call resumes; a third call measures nothing; the
    build applies the records and still computes what PyTorch computes."""
    from lprnet_edge.compiler.build import build, prepare_for_tuning
    from lprnet_edge.compiler.frontend import INPUT_SHAPE
    from lprnet_edge.compiler.session import run_host
    from lprnet_edge.compiler.tune import CRASH_TEST_ENV, count_records, list_tasks, tune

    model, mod, params = relax_model
    assert TASK in {t["name"] for t in list_tasks(mod, host)}
    db_dir = tmp_path / "db"
    cfg = TuneConfig(trials=8, num_trials_per_iter=4, db_dir=str(db_dir), timeout_s=60)
    lines: list[str] = []

    # 1. The worker crashes (SIGSEGV) after its first measured batch of 4.
    monkeypatch.setenv(CRASH_TEST_ENV, "1")
    with pytest.raises(LprnetEdgeError, match="SIGSEGV") as e:
        tune(mod, host, cfg, log=lines.append, tasks=[TASK], search=SEARCH)
    assert "resumes" in str(e.value)
    assert count_records(db_dir) == 4
    monkeypatch.delenv(CRASH_TEST_ENV)

    # 2. The same call tunes only the remaining budget.
    lines.clear()
    db, summary = tune(mod, host, cfg, log=lines.append, tasks=[TASK], search=SEARCH)
    assert summary["records_before"] == 4 and summary["trials_new"] == 4
    assert count_records(db_dir) == 8
    assert summary["est_ms_after"] is not None and summary["est_ms_after"] > 0
    assert any("best" in ln and TASK in ln for ln in lines), lines  # per-task progress
    assert any(ln.startswith("tuning summary") for ln in lines), lines

    # 3. Again: nothing is measured, the records are reused.
    lines.clear()
    t0 = time.monotonic()
    db, summary = tune(mod, host, cfg, log=lines.append, tasks=[TASK], search=SEARCH)
    assert summary["skipped"] and summary["trials_new"] == 0
    assert count_records(db_dir) == 8
    assert any("skipped" in ln for ln in lines), lines
    assert time.monotonic() - t0 < 120

    # 4. The database schedules the task, and a build with it is still correct.
    import tvm
    from tvm.s_tir import meta_schedule as ms

    prepared = prepare_for_tuning(mod, host)
    task = next(t for t in ms.relax_integration.extract_tasks(prepared, host.tvm_target())
                if t.task_name == TASK)
    assert db.query_tuning_record(task.dispatched[0], host.tvm_target(), TASK) is not None
    assert isinstance(db.query_ir_module(task.dispatched[0], host.tvm_target(), TASK),
                      tvm.IRModule)
    lib = tmp_path / "model.so"
    build(mod, host, lib, None, database=db)
    x = np.random.default_rng(0).standard_normal(INPUT_SHAPE).astype(np.float32)
    got = run_host(lib, x, params)
    import torch

    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    meta = json.loads((db_dir / "lprnet-edge-tuning.json").read_text())
    assert meta["target"] == host.tvm


@pytest.mark.slow
def test_cli_tune_then_reuse(cli_runner, tiny_checkpoint, tmp_path: Path):
    db_dir = tmp_path / "shared-db"
    args = ("tune", "--weights", tiny_checkpoint, "--trials", "4", "--task", TASK,
            "--population-size", "64", "--tuning-db", db_dir, "--json")
    r = cli_runner(*args)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["trials_new"] == 4 and s["records_total"] == 4
    assert (db_dir / "database_tuning_record.json").is_file()
    r = cli_runner(*args)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["skipped"] and s["trials_new"] == 0


# ---------------------------------------------------------------- the balanced budget plan

# Shares like LPRNet's: four convolutions, three cheap kernels (pooling, means, reshapes).
COSTS = [40.0, 30.0, 20.0, 9.0, 0.5, 0.3, 0.2]


def _totals(rounds: list[list[tuple[int, int]]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in rounds:
        for i, t in r:
            out[i] = out.get(i, 0) + t
    return out


def test_plan_gives_every_task_a_first_round_before_any_second():
    from lprnet_edge.compiler.tune import CHEAP_TRIALS, plan_budget

    rounds = plan_budget(COSTS, [0] * 7, 200, 16)
    first = dict(rounds[0])
    assert sorted(first) == list(range(7))
    assert [first[i] for i in range(4)] == [16] * 4
    assert [first[i] for i in range(4, 7)] == [CHEAP_TRIALS] * 3
    later = {i for r in rounds[1:] for i, _t in r}
    assert later <= {0, 1, 2, 3}  # cheap tasks get no second round
    tot = _totals(rounds)
    assert sum(tot.values()) == 200
    assert tot[0] >= tot[1] >= tot[2] >= tot[3]  # the rest follows FLOPs x calls


def test_plan_small_budget_tunes_the_heaviest_first():
    from lprnet_edge.compiler.tune import plan_budget

    assert plan_budget(COSTS, [0] * 7, 40, 16) == [[(0, 16), (1, 16), (2, 8)]]


def test_plan_counts_existing_records_and_the_cap():
    from lprnet_edge.compiler.tune import plan_budget

    have = [16, 16, 16, 16, 4, 4, 4]
    rounds = plan_budget(COSTS, have, 100, 16, cap=48)
    tot = _totals(rounds)
    assert all(have[i] + t <= 48 for i, t in tot.items())
    assert not any(i >= 4 for i in tot)  # first rounds already done: nothing for cheap ones
    assert sum(tot.values()) == 100
    assert plan_budget(COSTS, have, 0, 16) == []
