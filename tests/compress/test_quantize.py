"""Quantization: quantize/dequantize error bounds, calibrators, fake-quant = integer conv."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lprnet_edge.compress.api import QuantizedModel  # noqa: E402
from lprnet_edge.compress.configs import (  # noqa: E402
    Fp16WeightsConfig,
    Int8Config,
    Int8WeightsConfig,
    QuantizeConfig,
)
from lprnet_edge.compress.prune import roundtrip  # noqa: E402
from lprnet_edge.compress.quantize import (  # noqa: E402
    QMAX,
    Histogram,
    QuantConv2d,
    choose_fallback,
    conv_names,
    fake_quant,
    fold_for_storage,
    int8_weight_roundtrip,
    quantize,
    sensitivity_scan,
    threshold_entropy,
    threshold_mse,
    threshold_percentile,
    weight_scales,
)
from lprnet_edge.model.calib import CalibrationSet  # noqa: E402
from lprnet_edge.runtime.params_codec import decode, encode  # noqa: E402


def _calib(n: int = 12, seed: int = 0) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 3, 24, 94), dtype=np.float32) * 2 - 1).astype(np.float32)
    return CalibrationSet(x, ["京A12345"] * n, [f"{i}.jpg" for i in range(n)])


def test_fake_quant_error_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, generator=g) * 3
    s = 4.0 / QMAX
    q = fake_quant(x, s)
    inside = x.abs() <= QMAX * s
    assert float((q - x)[inside].abs().max()) <= s / 2 + 1e-6
    assert float(q.abs().max()) <= QMAX * s + 1e-6  # clipped
    assert torch.equal(fake_quant(q, s), q)  # idempotent


def test_weight_int8_roundtrip_per_channel_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.logspace(-3, 1, 16).view(-1, 1, 1, 1)
    w[3] = 0  # an all-zero channel
    w[5, 0, 0, 0] = 1e-40  # a denormal: must not produce NaN
    r = int8_weight_roundtrip(w)
    s = weight_scales(w)
    assert torch.all((r - w).abs() <= s / 2 + 1e-12)
    assert torch.all(r[3] == 0) and torch.isfinite(r).all()
    # bit-exact with what the artifact's params file decodes
    a = w.numpy().copy()
    a[5, 0, 0, 0] = 0
    np.testing.assert_array_equal(r.numpy(), decode(encode("w", a, "int8"), "w", "int8"))


def test_calibrators_on_heavy_tailed_histogram():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200000, generator=g).abs()
    x[:20] = 50.0  # rare outliers
    h = Histogram(float(x.max()))
    h.add(x)
    p = threshold_percentile(h, 99.9)
    m = threshold_mse(h)
    e = threshold_entropy(h)
    assert 2.5 < p < 5.0
    assert 0 < e < 50.0 * 0.5  # KL clips the rare outliers
    assert 0 < m <= 50.0  # MSE keeps them here (20 * 46^2 of clipping error is too much)
    g2 = Histogram(float(x[20:].max()))
    g2.add(x[20:])
    assert threshold_mse(g2) < g2.amax  # on a plain half-normal it clips the tail
    assert threshold_percentile(h, 100.0) == pytest.approx(50.0, rel=1e-3)


def test_quant_conv_equals_integer_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    qc = QuantConv2d(conv, act_scale=0.02)
    x = torch.randn(2, 8, 10, 12)
    y = qc(x)
    xi = torch.clamp(torch.round(x / 0.02), -QMAX, QMAX).double()
    ws = qc.weight_scale.double()
    wi = torch.clamp(torch.round(conv.weight.double() / ws), -QMAX, QMAX)
    acc = torch.nn.functional.conv2d(xi, wi, padding=1)  # integer-valued int32 accumulation
    ref = acc * 0.02 * ws.view(1, -1, 1, 1) + conv.bias.double().view(1, -1, 1, 1)
    assert torch.allclose(y.double(), ref, atol=1e-4)


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_quantize_int8_simulated(tiny_model, calibrator):
    cal = _calib()
    cfg = QuantizeConfig(mode="int8", calibrator=calibrator, calib_images=8,
                         fallback_layers=("container.0",))
    res = quantize(tiny_model, cfg, cal)
    qm, rep = res.module, res.report
    # Constant channels are folded first, as in float builds: the head's container is split
    # into heads.0..3, which inherit its fallback.
    heads = tuple(f"heads.{k}" for k in range(4))
    assert isinstance(res, QuantizedModel) and res.config == cfg
    assert res.report["applied_fallback_layers"] == list(heads)
    folded = fold_for_storage(tiny_model)
    assert set(rep["act_scales"]) == set(conv_names(folded)) - set(heads)
    # What the compiler needs for real int8 convolutions: which layers, and a tolerance.
    assert set(res.int8_convs) == set(rep["act_scales"]) and res.act_scales == rep["act_scales"]
    assert all(isinstance(qm.get_submodule(n), QuantConv2d) for n in res.int8_convs)
    assert res.verify_tolerance is not None and not hasattr(qm, "to_relax")
    assert all(s > 0 for s in rep["act_scales"].values())
    x = torch.from_numpy(cal.x[:1])
    with torch.no_grad():
        a, b = tiny_model(x), qm(x)
    assert b.shape == a.shape and torch.isfinite(b).all()
    rel = float((a - b).abs().max() / a.abs().max())
    assert rel < 0.3
    assert res.param_encodings["backbone.0.conv.weight"] == "int8"
    # The float head is stored as int8 weights (it computes with exactly those).
    assert all(res.param_encodings[f"{h}.weight"] == "int8" for h in heads)
    for h in heads:
        w = qm.get_submodule(h).weight.detach()
        assert torch.equal(int8_weight_roundtrip(w), w)
    assert quantize(tiny_model, cfg, cal, real_int8=False).int8_convs == ()


def test_quantize_weight_only_modes(tiny_model):
    x = torch.from_numpy(_calib(2).x)
    with torch.no_grad():
        ref = torch.cat([tiny_model(x[i:i + 1]) for i in range(2)])
    for cfg, tol in ((Fp16WeightsConfig(), 1e-2), (Int8WeightsConfig(), 0.1)):
        res = quantize(tiny_model, cfg)
        with torch.no_grad():
            y = torch.cat([res.module(x[i:i + 1]) for i in range(2)])
        assert float((y - ref).abs().max() / ref.abs().max()) < tol, cfg
        assert res.report["bn_folded"] and res.report["stored_bytes"] > 0
        assert res.int8_convs == () and res.verify_tolerance is None  # float graph
        # The module holds exactly what params.npz decodes to.
        rt = roundtrip(res.module, res.param_encodings)
        for k, v in res.module.state_dict().items():
            assert torch.equal(v, rt.state_dict()[k]), (cfg, k)
    # int8 weights are what the codec decodes: encoding again is lossless
    qm = quantize(tiny_model, Int8WeightsConfig()).module
    w = qm.backbone[0].weight.detach()
    assert torch.equal(int8_weight_roundtrip(w), w)
    # fp16 with a float32 fallback layer: that conv weight is stored (and kept) float32. The
    # model is folded first (compress.quantize.fold_for_storage): its container is split in
    # four head parts, which inherit the fallback.
    res = quantize(tiny_model, Fp16WeightsConfig(fallback_layers=("container.0",)))
    assert res.config.fallback_layers == ("container.0",)  # the config as given ...
    heads = [f"heads.{k}" for k in range(4)]
    assert res.report["applied_fallback_layers"] == heads  # ... applied to the split head
    assert all(res.param_encodings[f"heads.{k}.weight"] == "dense" for k in range(4))
    assert res.param_encodings["backbone.0.weight"] == "fp16"


def test_sensitivity_scan_and_fallback(tiny_model):
    cal = _calib(8)
    cfg = QuantizeConfig(mode="int8", calibrator="minmax", calib_images=4)
    scan = sensitivity_scan(tiny_model, cal, cal.subset([0, 1, 2, 3]), cfg)
    assert {r["layer"] for r in scan} == set(conv_names(tiny_model))
    assert all(0 <= r["agreement"] <= 1 for r in scan)
    assert scan == sorted(scan, key=lambda r: (r["agreement"], -r["drop"]))
    fb = choose_fallback(scan, max_layers=2, min_agreement=1.01)
    assert fb == tuple(r["layer"] for r in scan[:2])


@pytest.mark.slow
def test_relax_int8_rewrite_builds_and_matches():
    """The int8 path: conv2d on int8 codes with int32 accumulation, compiled by TVM."""
    pytest.importorskip("tvm")
    import tvm
    from tvm import relax

    from lprnet_edge.compiler.frontend import to_relax

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        QuantConv2d(torch.nn.Conv2d(3, 4, 3), act_scale=1 / 127),
        torch.nn.ReLU(),
        QuantConv2d(torch.nn.Conv2d(4, 2, (1, 3), padding=(0, 1)), act_scale=0.02),
    ).eval()
    qres = QuantizedModel(model, Int8Config(), int8_convs=("0", "2"))
    mod, params = to_relax(qres)  # typed dispatch: a quantized result with int8 convs
    text = mod.script()
    assert text.count('out_dtype="int32"') == 2 and 'R.astype' in text
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = torch.rand(1, 3, 24, 94) * 2 - 1
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(v)
                                                     for v in params.values()])
    out = out[0] if not hasattr(out, "numpy") else out
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4)

    # The same module as a float result compiles as float (no int8 conv), and a result
    # whose int8 layers the rewrite cannot all find is refused.
    text = to_relax(QuantizedModel(model, Int8Config()))[0].script()
    assert 'out_dtype="int32"' not in text
    from lprnet_edge.runtime.errors import LprnetEdgeError

    with pytest.raises(LprnetEdgeError, match="matched 2 of 3"):
        to_relax(QuantizedModel(model, Int8Config(), int8_convs=("0", "2", "4")))


@pytest.mark.parametrize("cfg", [Int8WeightsConfig(), Fp16WeightsConfig()])
def test_weight_only_stores_exactly_what_the_folded_model_computes(weights_path, cfg):
    """Constant channels are folded *before* the weights are rounded: folding after would
    slice consumer weights (their int8 scale changes) and move biases off the fp16 grid, and
    the artifact would store other weights than its reference computes with."""
    from lprnet_edge.compress.api import compress
    from lprnet_edge.model.channel_fold import FoldedLPRNet
    from lprnet_edge.model.checkpoint import load_model

    res = compress(load_model(weights_path), cfg, None)
    assert isinstance(res.module, FoldedLPRNet)  # the checkpoint has dead filters
    stored = roundtrip(res.module, res.param_encodings)
    for (name, a), b in zip(res.module.state_dict().items(), stored.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=name)
