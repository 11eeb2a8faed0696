"""Pruning: masks and sparsity accounting, storage encodings, channel pruning consistency."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lprnet_edge.compress.api import PrunedModel, compress  # noqa: E402
from lprnet_edge.compress.configs import (  # noqa: E402
    ChannelPruneConfig,
    PruneConfig,
    QuantizeConfig,
)
from lprnet_edge.compress.prune import (  # noqa: E402
    channel_widths,
    conv_weights,
    live_channels,
    magnitude_masks,
    map_encodings,
    params_encodings,
    prune,
    prune_channels,
    round_widths,
    roundtrip,
    sparsity_report,
    stored_size,
)
from lprnet_edge.model.flops import count, summary  # noqa: E402
from lprnet_edge.model.lprnet import LPRNet  # noqa: E402


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 24, 94, generator=g) * 2 - 1


def _per_image(model, x):
    with torch.no_grad():
        return torch.cat([model(x[i:i + 1]) for i in range(len(x))])


def test_magnitude_masks_exact_count_and_global_ranking(tiny_model):
    masks = magnitude_masks(tiny_model, 0.8)
    total = sum(m.numel() for m in masks.values())
    dropped = sum(int((~m).sum()) for m in masks.values())
    assert dropped == round(0.8 * total)
    # Global: every kept |w| >= every dropped |w|.
    ws = conv_weights(tiny_model)
    kept = torch.cat([ws[n].detach().abs()[m] for n, m in masks.items()])
    gone = torch.cat([ws[n].detach().abs()[~m] for n, m in masks.items()])
    assert kept.min() >= gone.max()


def test_unstructured_prune_report_and_accounting(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    pm, rep = prune(tiny_model, PruneConfig(kind="unstructured", sparsity=0.7))
    # The input model is untouched.
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k])
    sp = sparsity_report(pm)
    assert abs(sp["global_sparsity"] - 0.7) < 1e-3
    assert rep["global_sparsity"] == pytest.approx(sp["global_sparsity"])
    assert sum(v["zeros"] for v in sp["layers"].values()) == sp["zeros"]
    assert sum(v["params"] for v in sp["layers"].values()) == sp["conv_params"]
    b = rep["stored_bytes"]
    assert b["sparse-fp16"] < b["sparse"] < b["dense"]
    assert pm(torch.zeros(1, 3, 24, 94)).shape == (1, 68, 18)


def test_params_encodings_and_roundtrip(tiny_model):
    pm, _ = prune(tiny_model, PruneConfig(kind="unstructured", sparsity=0.8))
    enc = params_encodings(pm)
    convs = set(conv_weights(pm))
    for n in convs:
        z = float((pm.state_dict()[n] == 0).float().mean())
        assert enc[n] == ("sparse" if z >= 0.3 else "dense"), (n, z)
    assert sum(enc[n] == "sparse" for n in convs) >= len(convs) // 2
    assert all(v == "dense" for k, v in enc.items() if k not in convs)
    # sparse (fp32 values) is lossless
    rt = roundtrip(pm, enc)
    for k, v in pm.state_dict().items():
        assert torch.equal(v, rt.state_dict()[k])
    enc16 = params_encodings(pm, QuantizeConfig(mode="fp16"))
    assert {enc16[n] for n in convs} <= {"sparse-fp16", "fp16"}
    enc8 = params_encodings(pm, PruneConfig(), quant=QuantizeConfig(
        mode="int8-weights", fallback_layers=("container.0",)))
    assert enc8["backbone.0.weight"] == "int8"
    assert enc8["container.0.weight"] in ("sparse", "dense")  # fallback: float32
    assert stored_size(pm, enc8) < stored_size(pm, enc) < stored_size(pm, "dense")
    # compiled-module names
    m = map_encodings(enc8, ["p_backbone_0_weight", "backbone.0.bias", "unknown"])
    assert m == {"p_backbone_0_weight": "int8", "backbone.0.bias": "dense", "unknown": "dense"}


def test_channel_pruning_shapes_runnable_and_export(tiny_model, tmp_path):
    widths = channel_widths(tiny_model, 0.5, drop_dead=False)
    assert widths["b1_mid"] == 16 and widths["b2_mid"] == 32 and widths["stem"] == 64
    widths.update(stem=40, fc=100, b2_out=200)
    pm, info = prune_channels(tiny_model, widths, _x(8).numpy())
    assert isinstance(pm, LPRNet) and pm.widths == widths
    sd = pm.state_dict()
    assert sd["backbone.0.weight"].shape[0] == 40
    assert sd["backbone.4.block.0.weight"].shape[1] == 40
    assert sd["container.0.weight"].shape[1] == 40 + 128 + 256 + 68
    assert sd["backbone.8.block.6.weight"].shape[0] == 200
    assert sd["backbone.11.block.0.weight"].shape[1] == 200
    assert sd["backbone.16.weight"].shape[0] == 100 and sd["backbone.20.weight"].shape[1] == 100
    y = pm(torch.zeros(1, 3, 24, 94))
    assert y.shape == (1, 68, 18)
    assert summary(pm)["flops"] < summary(tiny_model)["flops"]
    # checkpoint round trip with widths metadata
    from lprnet_edge.model.checkpoint import load_model, save_checkpoint

    p = tmp_path / "pruned.pth"
    save_checkpoint(pm, p)
    back = load_model(p, check_sha=False)
    x = _x(2)
    assert torch.allclose(_per_image(back, x), _per_image(pm, x))
    ep = torch.export.export(pm, (torch.zeros(1, 3, 24, 94),))
    assert ep.module()(torch.zeros(1, 3, 24, 94)).shape == (1, 68, 18)


def _with_dead_channels(model: LPRNet) -> LPRNet:
    """Kill channels as the pretrained model has them: zero filter, bias and BN scale."""
    sd = model.state_dict()
    for conv, bn, idx in (("backbone.0", "backbone.1", range(0, 64, 2)),
                          ("backbone.8.block.6", "backbone.9", range(0, 256, 3)),
                          ("backbone.16", "backbone.17", range(1, 256, 2))):
        idx = list(idx)
        for k in (f"{conv}.weight", f"{conv}.bias", f"{bn}.weight", f"{bn}.bias"):
            sd[k][idx] = 0
    model.load_state_dict(sd)
    return model


def test_dead_channel_removal_is_exact():
    torch.manual_seed(0)
    model = _with_dead_channels(LPRNet().eval())
    live = live_channels(model)
    assert live == {"stem": 32, "b2_out": 170, "fc": 128}
    widths = channel_widths(model, 0.0)
    assert {k: widths[k] for k in live} == live
    x = _x(6)
    for calib in (x.numpy(), None):
        pm, info = prune_channels(model, widths, calib)
        # Head rescaled for the mean-of-squares over fewer channels: 64 / 32.
        assert info["head_factor"] == pytest.approx(2.0, rel=1e-5)
        a, b = _per_image(model, x), _per_image(pm, x)
        assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max())), float((a - b).abs().max())
    assert summary(model)["flops"] / summary(pm)["flops"] > 1.2


def test_flops_count_original_architecture(tiny_model):
    c = count(tiny_model)
    assert c["macs"] == 144_411_264  # batch 1, 3x24x94
    assert c["params"] == sum(p.numel() for p in tiny_model.parameters())
    assert set(c["layers"]) == {n.rsplit(".", 1)[0] for n in conv_weights(tiny_model)}


@pytest.mark.slow
def test_unstructured_80_keeps_accuracy_on_real_weights(weights_path, data_dir):
    from lprnet_edge.model.calib import accuracy, load_eval_set
    from lprnet_edge.model.checkpoint import load_model

    model = load_model(weights_path)
    pm, rep = prune(model, PruneConfig(kind="unstructured", sparsity=0.8))
    test = load_eval_set(data_dir / "test", limit=300)
    assert accuracy(pm, test) >= accuracy(model, test) - 0.01
    assert 1.8e6 / rep["stored_bytes"]["sparse-fp16"] > 8


@pytest.mark.slow
def test_dead_channels_of_real_weights(weights_path, data_dir):
    from lprnet_edge.model.calib import CalibrationSet, agreement
    from lprnet_edge.model.checkpoint import load_model

    model = load_model(weights_path)
    calib = CalibrationSet.load(data_dir / "calib")
    train, val = calib.split(0.3, 0)
    pm, _ = prune_channels(model, channel_widths(model, 0.0), train.x)
    assert summary(model)["flops"] / summary(pm)["flops"] > 1.5
    assert agreement(pm, model, val) >= 0.99
    np.testing.assert_array_equal(pm(torch.zeros(1, 3, 24, 94)).shape, (1, 68, 18))


def test_prune_channels_entry_point_with_distillation(tiny_model):
    from lprnet_edge.model.calib import CalibrationSet
    from lprnet_edge.runtime.preprocess import Preprocess

    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 255, (36, 136, 3), dtype=np.uint8) for _ in range(8)]
    x = np.concatenate([Preprocess()(r) for r in raw])
    cal = CalibrationSet(x, ["京A12345"] * 8, [f"{i}.jpg" for i in range(8)], raw=raw)
    cfg = ChannelPruneConfig(ratio=0.75, groups=("b1_mid", "b2_mid", "b3_mid"), round_to=16,
                             distill_epochs=1)
    res = compress(tiny_model, cfg, cal, distill_kwargs={"max_steps": 1, "batch_size": 4})
    pm, rep = res.module, res.report
    assert isinstance(res, PrunedModel) and res.config == cfg
    # ceil(0.25 * 32) = 8 and ceil(0.25 * 64) = 16, rounded up to the vector width 16
    assert pm.widths["b1_mid"] == 16 and pm.widths["b2_mid"] == 16 and pm.widths["b3_mid"] == 16
    assert rep["widths"] == pm.widths and rep["flops_reduction"] > 1.5
    for k in ("val_accuracy_original", "val_accuracy_pruned", "val_accuracy_distilled"):
        assert 0.0 <= rep[k] <= 1.0
    assert rep["distill"]["epochs"][0]["steps"] == 1
    assert set(res.param_encodings) >= {"backbone.0.weight", "container.0.weight"}


def test_pruned_widths_round_up_to_the_vector_width():
    torch.manual_seed(0)
    model = _with_dead_channels(LPRNet().eval())  # live: stem 32, b2_out 170, fc 128
    exact = channel_widths(model, {"b2_mid": 0.55, "b3_mid": 0.5})
    assert exact["b2_mid"] == 29 and exact["b2_out"] == 170
    for m in (8, 16):
        w = channel_widths(model, {"b2_mid": 0.55, "b3_mid": 0.5}, round_to=m)
        assert all(n % m == 0 for n in w.values()), w
        assert w["b2_mid"] == -(-29 // m) * m and w["b2_out"] == -(-170 // m) * m
        assert all(exact[g] <= w[g] <= model.widths[g] for g in w)
        pm, _ = prune_channels(model, w, _x(4).numpy())
        assert pm.widths == w and pm(torch.zeros(1, 3, 24, 94)).shape == (1, 68, 18)
    # never past the model's own width; an unpruned width stays as it is
    assert round_widths({"stem": 63, "fc": 256}, {"stem": 64, "fc": 256}, 16) == {
        "stem": 64, "fc": 256}
    assert round_widths({"stem": 33}, {"stem": 64}, 1) == {"stem": 33}
