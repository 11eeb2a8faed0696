"""Tuning for a board without the board: an rpi4 tuning with no device measures candidates
by the cost instrument's estimated Cortex-A72 cycles (real qemu, llvm-mca and TVM).

One small convolution task and a handful of trials: the machinery, not schedule quality.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lprnet_edge.compiler.cost.plugin import find_tools
from lprnet_edge.compiler.cost.rootfs import aarch64_rootfs
from lprnet_edge.compiler.target import load_target
from lprnet_edge.compiler.tuning import TuneConfig, TuneOptions, count_records, tune
from lprnet_edge.compiler.tuning.estimate_runner import estimate_spec
from lprnet_edge.errors import ToolchainError

TASK = "fused_add7_divide_conv2d12_add6_divide1"  # the smallest conv: a 1x1 head part
SEARCH = {"population_size": 64, "init_min_unmeasured": 16, "genetic_num_iters": 1}


def test_estimate_is_chosen_only_without_a_board():
    rpi4, rpi5, host = (load_target(n) for n in ("rpi4", "rpi5", "host"))
    assert estimate_spec(rpi4, TuneConfig()).cpu == "cortex-a72"
    assert estimate_spec(rpi5, TuneConfig()).cpu == "cortex-a76"
    assert estimate_spec(rpi4, TuneConfig(rpc="127.0.0.1:9090")) is None
    assert estimate_spec(host, TuneConfig()) is None
    assert "Cortex-A72" in estimate_spec(rpi4, TuneConfig()).label()


@pytest.mark.slow
def test_tune_rpi4_against_the_estimate(tmp_path: Path):
    pytest.importorskip("tvm")
    torch = pytest.importorskip("torch")
    try:
        find_tools("aarch64")
        aarch64_rootfs()
    except ToolchainError as e:
        pytest.skip(str(e))
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.model.lprnet import LPRNet

    torch.manual_seed(0)
    mod, _params = to_relax(LPRNet(class_num=68).eval())
    rpi4 = load_target("rpi4")
    db_dir = tmp_path / "db"
    lines: list[str] = []
    cfg = TuneConfig(trials=6, num_trials_per_iter=6, db_dir=str(db_dir), timeout_s=120)
    _db, summary = tune(mod, rpi4, cfg, log=lines.append,
                        options=TuneOptions(tasks=[TASK], search=SEARCH))
    assert count_records(db_dir) == summary.trials_new == 6
    assert summary.runner.startswith("estimate cortex-a72")
    assert summary.estimated and "Cortex-A72" in summary.estimated
    assert summary.est_after.ms is not None and summary.est_after.ms > 0
    # Every figure says it is an estimate: progress, summary.
    batches = [ln for ln in lines if ln.startswith("[") and TASK in ln]
    assert batches and all("estimated" in ln for ln in batches), lines
    assert any(ln.startswith("tuning summary") and "not measured on a board" in ln
               for ln in lines), lines
