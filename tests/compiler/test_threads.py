"""compiler/threads.py: per-kernel parallelism, decided on the schedules a build applies."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

from lprnet_edge.compiler.target import load_target  # noqa: E402


@pytest.fixture(scope="module")
def model():
    """The checkpoint's architecture, random weights: its small and large kernels."""
    from lprnet_edge.model.lprnet import LPRNet

    torch.manual_seed(0)
    return LPRNet(class_num=68).eval()


@pytest.fixture(scope="module")
def relax_model(model):
    from lprnet_edge.compiler.frontend import to_relax

    return to_relax(model, "torch.export")


@pytest.fixture(scope="module")
def scheduled(relax_model):
    """The host build's database (packaged defaults) and its prepared module."""
    from lprnet_edge.compiler import schedules
    from lprnet_edge.compiler.compile import prepare_for_tuning, schedule_database

    if not schedules.has_defaults():
        pytest.skip("no packaged default schedules (benchmarks/make_default_schedules.py)")
    mod, _ = relax_model
    host = load_target("host")
    target = host.tvm_target()
    prepared = prepare_for_tuning(mod, target)
    db, _cover = schedule_database(mod, target, prepared=prepared)
    return db, prepared, target


def test_small_kernels_run_on_one_core_and_large_ones_on_all(scheduled):
    from lprnet_edge.compiler.threads import ThreadConfig, parallel_extents, plan_threads

    db, prepared, target = scheduled
    new_db, plan = plan_threads(db, prepared, target, ThreadConfig(cores=4))
    by_name = {k.name: k for k in plan}
    convs = [k for k in plan if "conv2d" in k.name and k.extents]
    assert convs and all(k.parallel for k in convs if k.work / 4 >= 1e6)
    serial = [k for k in plan if k.extents and not k.parallel]
    assert serial and all(k.work / min(4, max(k.extents)) < ThreadConfig(4).min_work_per_thread
                          for k in serial)
    # The database built with: those kernels' schedules have no parallel loop left.
    from tvm.s_tir import meta_schedule as ms

    for task in ms.relax_integration.extract_tasks(prepared, target):
        if task.task_name in {k.name for k in serial}:
            sch = new_db.query_schedule(task.dispatched[0], target, "main")
            assert parallel_extents(sch.mod) == []
        elif by_name.get(task.task_name) and by_name[task.task_name].parallel:
            sch = new_db.query_schedule(task.dispatched[0], target, "main")
            assert parallel_extents(sch.mod) == list(by_name[task.task_name].extents)


def test_one_core_keeps_no_parallel_loop_and_zero_threshold_keeps_all(scheduled):
    from lprnet_edge.compiler.threads import ThreadConfig, plan_threads

    db, prepared, target = scheduled
    _db, one = plan_threads(db, prepared, target, ThreadConfig(cores=1))
    assert one and not any(k.parallel for k in one)
    same_db, every = plan_threads(db, prepared, target, ThreadConfig(4, min_work_per_thread=0))
    assert all(k.parallel for k in every if k.extents) and same_db is db


@pytest.mark.slow
def test_a_build_with_serial_kernels_computes_the_same(relax_model, model, tmp_path):
    """Dropping a schedule's parallel instructions leaves its loops, so its arithmetic:
    bit for bit the output of the build that keeps them; the plan is in the build info."""
    from lprnet_edge.compiler import schedules
    from lprnet_edge.compiler.compile import build
    from lprnet_edge.compiler.session import run_host
    from lprnet_edge.compiler.threads import ThreadConfig
    from lprnet_edge.compiler.toolchain import find_compiler

    if not schedules.has_defaults():
        pytest.skip("no packaged default schedules")
    mod, params = relax_model
    host = load_target("host")
    x = np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 24, 94)).astype(np.float32)
    outs, infos = {}, {}
    for name, cfg in {"planned": ThreadConfig(4), "all": ThreadConfig(4, 0.0)}.items():
        infos[name] = build(mod, host, tmp_path / f"{name}.so", find_compiler(host),
                            thread_config=cfg)
        outs[name] = np.asarray(run_host(tmp_path / f"{name}.so", x, params))
    planned = infos["planned"]["threads"]
    assert any(k["extents"] and not k["parallel"] for k in planned.values())
    assert all(k["parallel"] for k in infos["all"]["threads"].values() if k["extents"])
    np.testing.assert_array_equal(outs["planned"], outs["all"])
