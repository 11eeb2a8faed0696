"""MetaSchedule tuning: the database is filled as measured, survives a crash, is reused.

The slow tests tune one small convolution task with a handful of trials,
so they measure the machinery (worker process, records, resume, reuse), not speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error

from lprnet_edge.compiler.tuning import TuneConfig, TuneOptions, count_records, list_tasks, tune
from lprnet_edge.compiler.tuning.worker import CRASH_TEST_ENV
from lprnet_edge.runtime.errors import DeviceError, LprnetEdgeError

TASK = "fused_add7_divide_conv2d12_add6_divide1"  # the smallest conv: a 1x1 head part
# A small evolutionary search: these tests check the machinery, not schedule quality.
SEARCH = {"population_size": 64, "init_min_unmeasured": 16, "genetic_num_iters": 1}
OPTIONS = TuneOptions(tasks=[TASK], search=SEARCH)


# ---------------------------------------------------------------- fast checks


def test_tune_config_checks():
    with pytest.raises(LprnetEdgeError, match="--rpc-key"):
        TuneConfig(rpc_tracker="127.0.0.1:9190")
    with pytest.raises(LprnetEdgeError, match="trials"):
        TuneConfig(trials=0)


def test_unreachable_device_fails_fast():
    pytest.importorskip("tvm")
    from lprnet_edge.compiler.rpc import free_port

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

    from lprnet_edge.compiler.compile import build, prepare_for_tuning
    from lprnet_edge.compiler.frontend import INPUT_SHAPE
    from lprnet_edge.compiler.session import run_host

    model, mod, params = relax_model
    assert TASK in {t["name"] for t in list_tasks(mod, host)}
    db_dir = tmp_path / "db"
    cfg = TuneConfig(trials=8, num_trials_per_iter=4, db_dir=str(db_dir), timeout_s=60)
    lines: list[str] = []

    # 1. The worker crashes (SIGSEGV) after its first measured batch of 4.
    monkeypatch.setenv(CRASH_TEST_ENV, "1")
    with pytest.raises(LprnetEdgeError, match="SIGSEGV") as e:
        tune(mod, host, cfg, log=lines.append, options=OPTIONS)
    assert "resumes" in str(e.value)
    assert count_records(db_dir) == 4
    monkeypatch.delenv(CRASH_TEST_ENV)

    # 2. The same call tunes only the remaining budget.
    lines.clear()
    db, summary = tune(mod, host, cfg, log=lines.append, options=OPTIONS)
    assert summary.records_before == 4 and summary.trials_new == 4
    assert count_records(db_dir) == 8
    assert summary.est_after.ms is not None and summary.est_after.ms > 0
    assert any("best" in ln and TASK in ln for ln in lines), lines  # per-task progress
    assert any(ln.startswith("tuning summary") for ln in lines), lines

    # 3. Again: nothing is measured, the records are reused.
    lines.clear()
    t0 = time.monotonic()
    db, summary = tune(mod, host, cfg, log=lines.append, options=OPTIONS)
    assert summary.skipped and summary.trials_new == 0
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
