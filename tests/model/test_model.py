"""The export-friendly LPRNet equals the upstream formulation and loads its weights unchanged."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import randomize_batchnorm  # noqa: E402
from torch import nn  # noqa: E402

from lprnet_edge.model.checkpoint import load_model, read_state_dict, save_checkpoint  # noqa: E402
from lprnet_edge.model.lprnet import (  # noqa: E402
    ChannelStridedMaxPool,
    LPRNet,
    OriginalLPRNet,
    example_input,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pair(state_dict=None):
    """The export-friendly model and the original one, with the same weights."""
    ours = LPRNet().eval()
    if state_dict is None:
        torch.manual_seed(0)
        randomize_batchnorm(ours)
        state_dict = ours.state_dict()
    ours.load_state_dict(state_dict)
    orig = OriginalLPRNet().eval()
    orig.load_state_dict(state_dict)
    return ours, orig


@pytest.mark.parametrize(("channel_stride", "width_stride"), [(1, 1), (2, 2), (4, 2), (3, 1)])
def test_channel_strided_pool_equals_maxpool3d(channel_stride, width_stride):
    x = torch.randn(3, 64, 20, 90)
    ref = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(channel_stride, 1, width_stride))(x)
    ours = ChannelStridedMaxPool(channel_stride, width_stride)(x)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_equivalent_on_random_inputs(batch):
    ours, orig = pair()
    g = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 3, 24, 94, generator=g) * 2 - 1
    with torch.no_grad():
        a, b = ours(x), orig(x)
    assert a.shape == (batch, 68, 18)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a.abs().max() > 0  # a real computation, not all-zero outputs


def test_batch_normalisation_is_over_the_whole_batch():
    # The documented upstream property that makes batch 1 the reference: a plate's logits
    # depend on the other plates of its batch, in both formulations alike.
    ours, orig = pair()
    x = torch.rand(4, 3, 24, 94, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        alone = ours(x[:1])
        batched = ours(x)[:1]
        torch.testing.assert_close(orig(x)[:1], batched, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone, batched, rtol=1e-4, atol=1e-4)


def test_upstream_state_dict_loads_unchanged(weights_path):
    sd, meta = read_state_dict(weights_path)
    assert meta == {}
    model = LPRNet()
    assert set(sd) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert sd[k].shape == v.shape, k
    assert model.load_state_dict(sd, strict=True).missing_keys == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert sd["container.0.weight"].shape[0] == 68


def test_pretrained_equivalent_on_real_plates(weights_path, test_images):
    from lprnet_edge.runtime.preprocess import Preprocess, read_image

    ours, orig = pair(read_state_dict(weights_path)[0])
    pre = Preprocess()
    for batch in ([test_images[0]], test_images[:6]):
        x = torch.cat([torch.from_numpy(pre(read_image(p))) for p in batch])
        with torch.no_grad():
            torch.testing.assert_close(ours(x), orig(x), rtol=1e-5, atol=1e-4)


def test_export_friendly_graph_has_no_maxpool3d():
    model = LPRNet()
    assert not any(isinstance(m, nn.MaxPool3d) for m in model.modules())
    assert sum(isinstance(m, nn.MaxPool3d) for m in OriginalLPRNet().modules()) == 3


def test_torch_export(tiny_model):
    x = example_input(1)
    assert tuple(x.shape) == (1, 3, 24, 94)
    ep = torch.export.export(tiny_model, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("max_pool2d" in o for o in ops)
    assert not any("max_pool3d" in o for o in ops)
    xr = torch.rand(1, 3, 24, 94, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(xr), tiny_model(xr), rtol=1e-5, atol=1e-5)


def test_pruned_widths_round_trip(tmp_path):
    widths = {"stem": 32, "b1_mid": 16, "b2_mid": 24, "b3_mid": 40, "fc": 96}
    model = LPRNet(widths=widths).eval()
    randomize_batchnorm(model)
    p = tmp_path / "pruned.pth"
    save_checkpoint(model, p, note="test")
    sd, meta = read_state_dict(p)
    assert meta["widths"] == model.widths and meta["note"] == "test"
    loaded = load_model(p)
    assert loaded.widths == model.widths and not loaded.training
    x = torch.rand(1, 3, 24, 94)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
