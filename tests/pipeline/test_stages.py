"""The plan: which stages a build runs, decided once from its options."""

from __future__ import annotations

from pathlib import Path

from lprnet_edge.compiler.target import load_target
from lprnet_edge.compiler.tuning import TuneConfig
from lprnet_edge.compress.configs import PruneConfig, QuantizeConfig
from lprnet_edge.pipeline.build import BuildOptions
from lprnet_edge.pipeline.stages import plan


def test_plan_lists_the_stages(tmp_path: Path):
    host = load_target("rpi4")
    assert [s.name for s in plan(BuildOptions(target=host, out=tmp_path))] == [
        "load", "import", "compile", "verify", "package"]
    opts = BuildOptions(target=host, out=tmp_path, prune=PruneConfig(), quantize=QuantizeConfig(),
                        tune=TuneConfig(trials=8), eval_test=True)
    # A build that changes the model is checked on calib/ before anything compiles.
    assert [s.name for s in plan(opts)] == ["load", "prune", "quantize", "accuracy", "import",
                                            "tune", "compile", "verify", "eval", "package"]
    # The search's choice is applied by the prune and quantize stages, planned up front.
    opts = BuildOptions(target=host, out=tmp_path, max_accuracy_drop=1.0)
    assert [s.name for s in plan(opts)] == ["load", "select", "prune", "quantize", "test",
                                            "import", "compile", "verify", "package"]
