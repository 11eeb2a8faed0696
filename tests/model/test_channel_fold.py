"""Lossless folding of constant channels (lprnet_edge.model.channel_fold)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from lprnet_edge.model import flops  # noqa: E402
from lprnet_edge.model.bn_fold import fold_batchnorm  # noqa: E402
from lprnet_edge.model.channel_fold import (  # noqa: E402
    CONVS,
    EDGES,
    FoldedLPRNet,
    fold_constant_channels,
    foldable,
)
from lprnet_edge.model.checkpoint import load_model  # noqa: E402


def _kill(model: nn.Module, name: str, channels: list[int]) -> None:
    """Zero the filters ``channels`` of conv ``name`` (their output becomes relu(bias))."""
    conv = dict(model.named_modules())[name]
    with torch.no_grad():
        conv.weight[channels] = 0


def _unread(model: nn.Module, name: str, channels: list[int]) -> None:
    """Zero the consumer weights that read input ``channels`` of conv ``name``."""
    conv = dict(model.named_modules())[name]
    with torch.no_grad():
        conv.weight[:, channels] = 0


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():  # batch 1: the global-context mean is over the batch
        return max(float((a(x[i:i + 1]) - b(x[i:i + 1])).abs().max()) for i in range(len(x)))


@pytest.fixture
def dead_model(tiny_model):
    """A BN-folded random LPRNet with dead filters in every kind of place."""
    m = fold_batchnorm(tiny_model)
    _kill(m, "backbone.0", [1, 5, 6, 9, 20])  # feeds a 1x1 conv and the global context
    _kill(m, "backbone.4.block.6", list(range(0, 128, 3)))  # channel stride 2 + context
    _kill(m, "backbone.8.block.6", list(range(3, 256)))  # consumer 1x1, no context
    _kill(m, "backbone.11.block.6", list(range(1, 256, 2)))  # channel stride 4 + context
    _kill(m, "backbone.16", list(range(10, 200)))  # consumer 13x1
    _kill(m, "backbone.20", [0, 7, 30])  # global context only
    _kill(m, "backbone.8.block.0", [2])  # feeds a padded 3x1 conv: must stay
    _unread(m, "backbone.20", [200, 201])  # live 1x4 outputs nobody reads
    return m


@pytest.mark.parametrize("multiple", [1, 8, 16])
def test_folded_model_computes_the_same_logits(dead_model, multiple):
    folded, report = fold_constant_channels(dead_model, multiple)
    assert isinstance(folded, FoldedLPRNet)
    x = torch.randn(6, 3, 24, 94, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scale = float(dead_model(x[:1]).abs().max())
    assert _max_diff(dead_model, folded, x) <= 1e-5 * max(scale, 1.0)
    assert report.dropped > 0
    for name, (kept, orig) in report.kept.items():
        assert kept == orig or kept % multiple == 0, (name, kept, orig)


def test_multiple_one_keeps_only_what_is_read(dead_model):
    _, report = fold_constant_channels(dead_model, multiple=1)
    assert report.kept["backbone.8.block.6"] == (3, 256)
    # 190 dead 1x4 filters, and the two live ones that the 13x1 convolution does not read
    assert report.kept["backbone.16"] == (256 - 190 - 2, 256)
    assert report.kept["backbone.20"] == (65, 68)


def test_filters_before_a_padded_convolution_are_kept(dead_model):
    folded, _ = fold_constant_channels(dead_model, multiple=1)
    conv = dict(folded.named_modules())["backbone.8.block.0"]
    assert conv.out_channels == 64  # its consumer is the padded 3x1 convolution
    assert not any(e[0] == "backbone.8.block.0" for e in EDGES)


def test_input_model_is_not_modified(dead_model):
    before = {k: v.clone() for k, v in dead_model.state_dict().items()}
    fold_constant_channels(dead_model)
    after = dead_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_only_float_lprnet_is_foldable(dead_model):
    from lprnet_edge.compress.quantize import QuantConv2d

    assert foldable(dead_model)
    folded, _ = fold_constant_channels(dead_model)
    assert not foldable(folded)  # never folded twice
    assert set(CONVS) <= {n for n, _ in dead_model.named_modules()}
    conv = dead_model.backbone[16]
    dead_model.backbone[16] = QuantConv2d(conv, act_scale=0.05)  # what int8 builds compile
    assert not foldable(dead_model)


def test_pretrained_checkpoint_halves_its_flops(weights_path, test_images):
    from lprnet_edge.runtime.preprocess import Preprocess, read_image

    model = load_model(weights_path)
    folded, report = fold_constant_channels(fold_batchnorm(model))
    pre = Preprocess()
    x = torch.cat([torch.from_numpy(pre(read_image(p))) for p in test_images[:8]])
    assert _max_diff(model, folded, x) < 1e-3
    before, after = flops.count(model), flops.count(folded)
    assert after["flops"] < 0.6 * before["flops"], (before["flops"], after["flops"])
    assert after["params"] < before["params"]
    assert report.dropped > 0 and "constant filters folded" in report.summary()


def test_export_and_relax_import(dead_model):
    pytest.importorskip("tvm")
    from lprnet_edge.compiler.frontend import to_relax

    _, params = to_relax(dead_model)
    _, unfolded = to_relax(dead_model, fold_channels=False)
    assert sum(v.size for v in params.values()) < sum(v.size for v in unfolded.values())
