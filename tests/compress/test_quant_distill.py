"""Quantization-aware distillation: the int8 model trains through its rounding and still
stores exactly what it computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, copy_images

torch = pytest.importorskip("torch")

from lprnet_edge.compress.configs import Int8Config  # noqa: E402
from lprnet_edge.compress.quantize import QuantConv2d, quantize, weight_scales  # noqa: E402
from lprnet_edge.model.calib import CalibrationSet  # noqa: E402
from lprnet_edge.model.checkpoint import load_model  # noqa: E402
from lprnet_edge.runtime.errors import LprnetEdgeError  # noqa: E402


@pytest.fixture(scope="module")
def plates(data_dir: Path, tmp_path_factory) -> CalibrationSet:
    folder = copy_images(sorted((data_dir / "calib").glob("*.jpg"))[:12],
                         tmp_path_factory.mktemp("qd") / "plates")
    return CalibrationSet.load(folder)


def _quants(model) -> dict[str, QuantConv2d]:  # noqa: ANN001
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d)}


def test_distilled_int8_trains_its_convolutions_and_stores_what_it_computes(
        weights_path: Path, plates: CalibrationSet, one_torch_thread):
    model = load_model(weights_path)
    ptq = quantize(model, Int8Config(calib_images=8), plates)
    qat = quantize(model, Int8Config(calib_images=8, distill_epochs=2), plates)
    assert len(qat.report["distill"]["epochs"]) == 2
    assert qat.report["act_scales"] == ptq.report["act_scales"]  # trained under its rounding
    before, after = _quants(ptq.module), _quants(qat.module)
    assert set(after) == set(qat.int8_convs) == set(before)
    moved = [n for n in after if not torch.equal(after[n].conv.weight, before[n].conv.weight)]
    assert moved, "no int8 convolution trained"
    for m in after.values():
        assert not m.ste and not m.conv.weight.requires_grad
        # the stored int8 codes are the weights over this scale: it must be theirs
        assert torch.equal(m.weight_scale, weight_scales(m.conv.weight))
    heads = qat.report["applied_fallback_layers"]
    for h in heads:  # the float head does not train
        assert torch.equal(qat.module.get_submodule(h).weight,
                           ptq.module.get_submodule(h).weight)


def test_the_trainable_rounding_computes_the_integer_form(weights_path: Path,
                                                          plates: CalibrationSet):
    res = quantize(load_model(weights_path), Int8Config(calib_images=8), plates)
    x = torch.from_numpy(np.ascontiguousarray(plates.x[:2]))
    with torch.no_grad():
        exact = res.module(x)
        for m in _quants(res.module).values():
            m.ste = True
        trainable = res.module(x)
    torch.testing.assert_close(trainable, exact, rtol=1e-4, atol=1e-4)


def test_distillation_needs_labelled_plates(weights_path: Path):
    with pytest.raises(LprnetEdgeError, match="needs calibration plates"):
        quantize(load_model(weights_path), Int8Config(calib_images=2, distill_epochs=1),
                 np.zeros((2, 3, 24, 94), np.float32))
    with pytest.raises(LprnetEdgeError, match="--quant-distill"):
        Int8Config(distill_epochs=-1)


def test_cli_quant_distill_goes_with_int8(cli_runner):
    r = cli_runner("build", "--target", "host", "--quantize", "fp16", "--quant-distill", "2")
    assert_user_error(r, "--quant-distill needs --quantize int8")
