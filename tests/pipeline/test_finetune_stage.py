"""``build --finetune DIR``: the fine-tuning runs first, and every later stage works on the
fine-tuned model and on the fine-tuning's validation split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import copy_images

from lprnet_edge.compiler.target import load_target
from lprnet_edge.compress.accuracy import Budget, check_model
from lprnet_edge.compress.configs import FINETUNED_QUANT_DISTILL, Int8WeightsConfig, QuantizeConfig
from lprnet_edge.pipeline.build import BuildOptions
from lprnet_edge.pipeline.stages import plan
from lprnet_edge.pipeline.steps import calibration_set, load_torch, quantize_model

torch = pytest.importorskip("torch")

from lprnet_edge.model.calib import accuracy  # noqa: E402
from lprnet_edge.model.checkpoint import load_model  # noqa: E402
from lprnet_edge.model.finetune import FinetuneConfig, run_finetune  # noqa: E402
from lprnet_edge.pipeline.finetune import finetune_stage  # noqa: E402


@pytest.fixture(scope="module")
def plates(data_dir: Path, tmp_path_factory) -> Path:
    return copy_images(sorted((data_dir / "calib").glob("*.jpg"))[:20],
                       tmp_path_factory.mktemp("ftb") / "plates")


@pytest.fixture(scope="module")
def small_test(data_dir: Path, tmp_path_factory) -> Path:
    return copy_images(sorted((data_dir / "test").glob("*.jpg"))[:8],
                       tmp_path_factory.mktemp("ftb") / "test")


def _cfg(plates: Path, small_test: Path) -> FinetuneConfig:
    return FinetuneConfig(data=plates, epochs=1, batch_size=8, threads=1, test_dir=small_test)


def test_plan_fine_tunes_first(tmp_path: Path, plates: Path):
    opts = BuildOptions(target=load_target("rpi4"), out=tmp_path, quantize=QuantizeConfig(),
                        finetune=FinetuneConfig(data=plates))
    assert [s.name for s in plan(opts)][:3] == ["load", "finetune", "quantize"]


def test_later_stages_use_the_fine_tuned_model_and_its_split(weights_path: Path,
                                                             plates: Path, small_test: Path):
    art = load_torch(weights_path)
    result = finetune_stage(art, _cfg(plates, small_test), log=lambda _m: None)
    assert "validation" in result and "test/" in result
    _, val = art.calib.split()
    assert len(val) == 4 and art.original is art.model  # the guard's reference: fine-tuned
    assert art.reports["finetune"]["split"]["val_files"] == val.names
    art = quantize_model(art, Int8WeightsConfig(), None)
    check = check_model(art.original, art.reference, calibration_set(None, art), Budget.of(100.0))
    assert check.images == 4
    assert check.original == pytest.approx(accuracy(art.original, val))


def test_weights_fine_tuned_on_the_same_data_are_not_trained_again(
        weights_path: Path, plates: Path, small_test: Path, tmp_path: Path):
    cfg = _cfg(plates, small_test)
    mine = tmp_path / "mine.pth"
    run_finetune(load_model(weights_path), cfg, weights_path, mine, progress=None)
    art = load_torch(mine)
    result = finetune_stage(art, cfg, log=lambda _m: None)
    assert "not trained again" in result and art.stages["finetune"]["reused"] == "mine.json"
    assert art.model is art.original and len(art.calib.split()[1]) == 4
    other = load_torch(mine)  # another split of the same files: a new fine-tuning
    finetune_stage(other, FinetuneConfig(**{**cfg.__dict__, "seed": 1}), log=lambda _m: None)
    assert "reused" not in other.stages["finetune"]


@pytest.mark.slow
def test_cli_build_with_finetune(cli_runner, weights_path: Path, plates: Path,
                                 small_test: Path, tmp_path: Path):
    pytest.importorskip("tvm")
    out = tmp_path / "ft"
    r = cli_runner("build", "--target", "host", "--weights", weights_path, "--finetune", plates,
                   "--test-dir", small_test, "--quantize", "int8",
                   "--max-accuracy-drop", "100", "--verify-images", "4", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    assert "[2/" in r.stderr and "finetune" in r.stderr
    m = json.loads(r.stdout)
    assert m["stages"]["finetune"]["data"] == str(plates)
    rep = m["reports"]["finetune"]
    assert rep["split"]["val"] == 4 and rep["accuracy"]["val"]["after"] is not None
    assert m["reports"]["accuracy_check"]["split"] == {
        "source": "the fine-tuning's validation split", "images": 4}
    # int8 of a fine-tuned model is distilled from it by default (--quant-distill)
    assert m["stages"]["quantize"]["distill_epochs"] == FINETUNED_QUANT_DISTILL
    assert len(m["reports"]["quantize"]["distill"]["epochs"]) == FINETUNED_QUANT_DISTILL
