"""Post-training quantization of LPRNet, calibrated on ``calib/`` (host side, torch).

Three techniques, one config class each (:mod:`lprnet_edge.compress.configs`), each with a
handler for :func:`lprnet_edge.compress.api.compress`; :func:`quantize` returns a typed
:class:`~lprnet_edge.compress.api.QuantizedModel`:

``fp16``
    Weights stored in half precision (``fp16`` / ``sparse-fp16`` in ``params.npz``), decoded to
    float32 at load: 2x smaller weights, float32 compute.
``int8-weights``
    Weight-only int8: every conv weight (except ``fallback_layers``) stored as per-output-channel
    symmetric int8 + float32 scales (the ``int8`` encoding of :mod:`params_codec`), decoded to
    float32 at load. 4x smaller conv weights, float32 compute. :func:`quantize` returns a
    float model whose weights are *exactly* what the artifact decodes, so its accuracy is
    the artifact's.
``int8``
    Simulated (fake-quant) int8 inference: per-channel symmetric int8 weights and per-tensor
    symmetric int8 activations at every conv input, scales from a calibrator (``minmax``,
    ``percentile``, ``entropy`` (KL), ``mse``). The returned model computes exactly what an
    integer conv ``int8 x int8 -> int32`` followed by ``* (s_act * s_w[c]) + bias`` computes,
    which is what the compiler's int8 rewrite
    (``lprnet_edge.compiler.frontend.relax_int8_rewrite``) emits for TVM, for the layers
    listed in ``QuantizedModel.int8_convs``.

Layers that hurt accuracy when quantized are found by :func:`sensitivity_scan` (one layer at a
time, agreement and accuracy on a calibration validation split) and kept in float32 with
``fallback_layers``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lprnet_edge.compress.api import QuantizedModel, compress, register_handler
from lprnet_edge.compress.configs import (
    Fp16WeightsConfig,
    Int8Config,
    Int8WeightsConfig,
    QuantizeConfig,
)
from lprnet_edge.runtime.errors import LprnetEdgeError
from lprnet_edge.runtime.params_codec import decode, encode

QMAX = 127
TINY = 1e-30  # weights below this are flushed to zero before int8 encoding


# ---------------------------------------------------------------- quantizers


def weight_scales(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int8 scales, ``amax / 127`` (1 for an all-zero channel), like params_codec."""
    if per_channel:
        amax = w.detach().abs().flatten(1).max(1).values.view(-1, *([1] * (w.dim() - 1)))
    else:
        amax = w.detach().abs().max().view(*([1] * w.dim()))
    # A channel with amax ~0 (dead, or denormal weights whose amax / 127 underflows) gets
    # scale 1: its weights quantize to 0.
    return torch.where(amax > TINY, amax / QMAX, torch.ones_like(amax))


Rounding = Callable[[torch.Tensor], torch.Tensor]


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float,
               rounding: Rounding = torch.round) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize (round half to even, clip to [-127, 127])."""
    return torch.clamp(rounding(x / scale), -QMAX, QMAX) * scale


def act_codes(x: torch.Tensor, scale: torch.Tensor,
              rounding: Rounding = torch.round) -> torch.Tensor:
    """The int8 codes of activations ``x`` (float, round half to even, clip to [-127, 127]):
    ``x`` times the float32 reciprocal of ``scale``, as PyTorch's own ``quantize_per_tensor``
    computes them. A multiply, not a divide, so that the compiled model multiplies too: it
    quantizes every int8 layer's input, and a vector divide is slow on the boards' cores."""
    return torch.clamp(rounding(x * torch.reciprocal(scale)), -QMAX, QMAX)


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """``round(v)`` forward, identity backward (straight-through estimator): round's own
    gradient is zero, so a model trained through its rounding needs this one."""
    return v + (torch.round(v) - v).detach()


def quantize_tensor(x: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    return np.clip(np.round(x / scale), -QMAX, QMAX).astype(np.int8)


def int8_weight_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """The float32 weight that the ``int8`` params encoding decodes to (bit-exact)."""
    a = w.detach().cpu().numpy().astype(np.float32)
    a = np.where(np.abs(a) < TINY, np.float32(0), a)  # denormals: amax / 127 would underflow
    files = encode("w", a, "int8")
    return torch.from_numpy(decode(files, "w", "int8"))


# ---------------------------------------------------------------- calibrators


class Histogram:
    """Histogram of ``|x|`` over [0, amax] (two passes: the max first, then the counts)."""

    def __init__(self, amax: float, bins: int = 2048) -> None:
        self.amax = max(float(amax), 1e-12)
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)

    def add(self, x: torch.Tensor) -> None:
        h = torch.histc(x.detach().abs().float(), bins=self.bins, min=0.0, max=self.amax)
        self.counts += h.numpy().astype(np.float64)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.amax, self.bins + 1)


def threshold_percentile(h: Histogram, pct: float) -> float:
    c = np.cumsum(h.counts)
    if c[-1] <= 0:
        return h.amax
    i = int(np.searchsorted(c, c[-1] * pct / 100.0))
    return float(h.edges[min(i + 1, h.bins)])


def threshold_mse(h: Histogram, candidates: int = 128) -> float:
    """Clip threshold minimising the expected squared error (clipping + rounding noise)."""
    centers = (h.edges[:-1] + h.edges[1:]) / 2
    best, best_t = np.inf, h.amax
    for t in np.linspace(h.amax / candidates, h.amax, candidates):
        step = t / QMAX
        clip = np.maximum(centers - t, 0.0) ** 2
        err = np.sum(h.counts * np.where(centers > t, clip, step * step / 12.0))
        if err < best:
            best, best_t = err, float(t)
    return best_t


def threshold_entropy(h: Histogram, levels: int = QMAX + 1, stride: int = 16) -> float:
    """TensorRT-style KL-divergence calibration on the ``|x|`` histogram."""
    p_full = h.counts.copy()
    # Post-ReLU maps are mostly exact zeros: that spike (bin 0) is represented exactly at any
    # threshold and would otherwise dominate the divergence (every threshold looks alike).
    p_full[0] = 0.0
    if p_full.sum() <= 0:
        return h.amax
    best, best_i = np.inf, h.bins
    for i in range(levels, h.bins + 1, stride):
        p = p_full[:i].copy()
        p[i - 1] += p_full[i:].sum()  # clipped mass goes to the last bin
        # Quantize the first i bins into `levels` buckets, expand back uniformly over non-zeros.
        idx = (np.arange(i) * levels) // i
        nz = (p_full[:i] > 0).astype(np.float64)
        q_sum = np.bincount(idx, weights=p_full[:i], minlength=levels)
        q_cnt = np.bincount(idx, weights=nz, minlength=levels)
        q = np.where(nz > 0, (q_sum / np.maximum(q_cnt, 1))[idx], 0.0)
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-12)
        mask = ps > 0
        kl = float(np.sum(ps[mask] * np.log(ps[mask] / np.maximum(qs[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return float(h.edges[best_i])


# ---------------------------------------------------------------- fake-quant model


class QuantConv2d(nn.Module):
    """A Conv2d with int8 fake-quantized input activations and weights.

    ``act_scale``: per-tensor symmetric scale of the input; ``weight_scale``: per output channel.
    """

    def __init__(self, conv: nn.Conv2d, act_scale: float, per_channel: bool = True,
                 quant_act: bool = True, quant_weight: bool = True) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("act_scale", torch.tensor(float(act_scale)))
        self.register_buffer("weight_scale", weight_scales(conv.weight, per_channel))
        self.per_channel = per_channel
        self.quant_act = quant_act
        self.quant_weight = quant_weight
        self.ste = False  # training (compress/quant_distill.py): rounding passes gradients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.ste:  # the weight scale follows the weights as they train, as once stored
            return self._simulated(x, round_ste, weight_scales(c.weight, self.per_channel))
        if not (self.quant_act and self.quant_weight):
            return self._simulated(x, torch.round, self.weight_scale)
        # Integer form: conv of the int8 codes (exact integers in float32), then one rescale.
        # Same value as conv(fq(x), fq(w)); written so that the exported graph is
        # conv2d(clip(round(x * (1 / s))), clip(round(w / s_w))), which the compiler turns
        # into an int8 x int8 -> int32 conv.
        xq = act_codes(x, self.act_scale)
        wq = torch.clamp(torch.round(c.weight / self.weight_scale), -QMAX, QMAX)
        acc = F.conv2d(xq, wq, None, c.stride, c.padding, c.dilation, c.groups)
        scale = self.act_scale * self.weight_scale.view(1, -1, 1, 1)
        if c.bias is not None:
            # The bias in the accumulator's units: the rescale is then the last operation,
            # one multiply with no add after it for a compiler to fuse into an FMA rounded
            # once, so a compiled build equals this bit for bit.
            acc = acc + c.bias.view(1, -1, 1, 1) / scale
        return acc * scale

    def _simulated(self, x: torch.Tensor, rounding: Rounding, weight_scale: torch.Tensor
                   ) -> torch.Tensor:
        """The float form: quantize-dequantize the input and the weights, then convolve."""
        c = self.conv
        if self.quant_act:
            x = act_codes(x, self.act_scale, rounding) * self.act_scale
        w = fake_quant(c.weight, weight_scale, rounding) if self.quant_weight else c.weight
        return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)

    def refresh_weight_scale(self) -> None:
        """``weight_scale`` from the weights as they are (after training)."""
        self.weight_scale.copy_(weight_scales(self.conv.weight, self.per_channel))


def conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _calib_x(calib: Any, n: int) -> torch.Tensor:
    x = calib.x if hasattr(calib, "x") else np.asarray(calib)
    return torch.from_numpy(np.ascontiguousarray(x[:n]))


def calibrate(model: nn.Module, calib: Any, cfg: Int8Config, batch: int = 64
              ) -> dict[str, dict[str, float]]:
    """Per-conv input activation thresholds (|x| clip) with ``cfg.calibrator``."""
    from lprnet_edge.model.calib import forward_per_sample

    x = _calib_x(calib, cfg.calib_images)
    names = conv_names(model)
    mods = dict(model.named_modules())
    amax = dict.fromkeys(names, 0.0)
    hists: dict[str, Histogram] = {}

    def run(fn) -> None:  # noqa: ANN001
        hooks = [mods[n].register_forward_pre_hook(fn(n)) for n in names]
        try:
            with torch.no_grad():
                for i in range(0, len(x), batch):
                    forward_per_sample(model, x[i:i + batch])
        finally:
            for hk in hooks:
                hk.remove()

    def max_hook(n: str):  # noqa: ANN202
        def f(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            amax[n] = max(amax[n], float(inp[0].detach().abs().max()))
        return f

    def hist_hook(n: str):  # noqa: ANN202
        def f(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            hists[n].add(inp[0])
        return f

    model.eval()
    run(max_hook)
    out: dict[str, dict[str, float]] = {}
    if cfg.calibrator == "minmax":
        return {n: {"amax": amax[n], "threshold": amax[n]} for n in names}
    for n in names:
        hists[n] = Histogram(amax[n])
    run(hist_hook)
    thresholds = {"percentile": lambda h: threshold_percentile(h, cfg.percentile),
                  "mse": threshold_mse, "entropy": threshold_entropy}
    for n in names:
        out[n] = {"amax": amax[n], "threshold": max(thresholds[cfg.calibrator](hists[n]), 1e-8)}
    return out


def fake_quant_model(model: nn.Module, thresholds: dict[str, dict[str, float]],
                     cfg: Int8Config, layers: list[str] | None = None) -> nn.Module:
    """A copy with the convs in ``layers`` (default: all but ``cfg.fallback_layers``) wrapped
    in :class:`QuantConv2d`."""
    out = copy.deepcopy(model).eval()
    todo = layers if layers is not None else [n for n in conv_names(model)
                                             if n not in set(cfg.fallback_layers)]
    for n in todo:
        conv = out.get_submodule(n)
        _set_module(out, n, QuantConv2d(conv, thresholds[n]["threshold"] / QMAX,
                                        cfg.per_channel))
    return out


def weight_only_model(model: nn.Module, cfg: Fp16WeightsConfig | Int8WeightsConfig
                      ) -> nn.Module:
    """A float copy whose weights went through the artifact's storage encoding."""
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        if isinstance(cfg, Fp16WeightsConfig):
            skip = {f"{n}.weight" for n in cfg.fallback_layers}
            for name, p in out.named_parameters():
                if name not in skip:
                    p.copy_(p.half().float())
            return out
        skip = set(cfg.fallback_layers)
        for n in conv_names(out):
            if n in skip:
                continue
            conv = out.get_submodule(n)
            if cfg.per_channel:
                conv.weight.copy_(int8_weight_roundtrip(conv.weight))
            else:
                conv.weight.copy_(fake_quant(conv.weight, weight_scales(conv.weight, False)))
    return out


# ---------------------------------------------------------------- sensitivity


def sensitivity_scan(model: nn.Module, calib: Any, val: Any, cfg: Int8Config | None = None,
                     thresholds: dict[str, dict[str, float]] | None = None,
                     progress: Any = None) -> list[dict[str, Any]]:
    """Quantize one conv at a time (weights + input activations); measure on ``val`` the
    agreement with the float model (same plate text) and the accuracy drop. Most sensitive
    first."""
    from lprnet_edge.model.calib import accuracy, decode_batch, predict_logits

    cfg = cfg or Int8Config()
    thresholds = thresholds or calibrate(model, calib, cfg)
    ref = decode_batch(predict_logits(model, val.x))
    base = float(np.mean([p == t for p, t in zip(ref, val.labels, strict=True)]))
    rows = []
    for n in conv_names(model):
        qm = fake_quant_model(model, thresholds, cfg, layers=[n])
        pred = decode_batch(predict_logits(qm, val.x))
        agree = float(np.mean([p == r for p, r in zip(pred, ref, strict=True)]))
        acc = float(np.mean([p == t for p, t in zip(pred, val.labels, strict=True)]))
        rows.append({"layer": n, "agreement": agree, "accuracy": acc, "drop": base - acc})
        if progress:
            progress(rows[-1])
    del accuracy
    return sorted(rows, key=lambda r: (r["agreement"], -r["drop"]))


def choose_fallback(scan: list[dict[str, Any]], max_layers: int = 2,
                    min_agreement: float = 0.995) -> tuple[str, ...]:
    """The layers (at most ``max_layers``, most sensitive first) below ``min_agreement``."""
    return tuple(r["layer"] for r in scan if r["agreement"] < min_agreement)[:max_layers]


# ---------------------------------------------------------------- entry point


def fold_for_storage(model: nn.Module) -> nn.Module:
    """BatchNorm and constant channels folded (what the compiler folds) *before* weights are
    rounded to their storage precision: folding after rounding would slice consumer weights
    (changing their per-channel int8 scale) and move biases off the fp16 grid, so the
    artifact would no longer store exactly the weights its reference computes with."""
    from lprnet_edge.model.channel_fold import fold_all

    return fold_all(model)[0]


def _fallbacks_for(model: nn.Module, cfg: QuantizeConfig) -> QuantizeConfig:
    """``fallback_layers`` named for ``model``: a folded model splits the head's container
    (``container.0``) into ``heads.0``..``heads.3``, which inherit its fallback."""
    from dataclasses import replace

    names = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if "container.0" not in cfg.fallback_layers or "container.0" in names:
        return cfg
    heads = tuple(n for n in sorted(names) if n.startswith("heads."))
    kept = tuple(n for n in cfg.fallback_layers if n != "container.0")
    return replace(cfg, fallback_layers=kept + heads)


HEAD_LAYERS = ("container.0",)
INT8_VERIFY_TOLERANCE = 1e-2  # float32 summation order differs from int32 accumulation


def quantize(model: nn.Module, cfg: QuantizeConfig, calib: Any = None, val: Any = None,
             real_int8: bool = True, head_fp32: bool = True) -> QuantizedModel:
    """Quantize a BatchNorm-folded copy of ``model`` (:func:`compress` for a quantize config).

    ``fp16`` / ``int8-weights``: ``module`` is a float model with exactly the weights the
    artifact decodes; ``int8`` (needs ``calib``): the fake-quant simulation, whose
    quantized convolutions are listed in ``int8_convs`` for the compiler (``real_int8``;
    without it they compile as float with int8 rounding). ``report`` holds the activation
    thresholds / scales and, with ``val``, the accuracy and agreement on it. With
    ``head_fp32`` and no ``fallback_layers`` given, ``int8`` keeps the head's container conv
    in float32 (``result.config`` is the config actually applied).
    """
    res = compress(model, cfg, calib, val=val, real_int8=real_int8, head_fp32=head_fp32)
    if not isinstance(res, QuantizedModel):
        raise LprnetEdgeError(f"{type(cfg).__name__} is not a quantization config")
    return res


def _finish(res: QuantizedModel, stored: nn.Module, original: nn.Module, val: Any,
            applied: QuantizeConfig, stored_as: QuantizeConfig | None = None
            ) -> QuantizedModel:
    """Stored size, encodings and (with ``val``) accuracy in the report. ``res.config`` is
    the config as given (what the manifest records and a search compares); ``applied`` names
    the folded model's layers (``_fallbacks_for``); ``stored_as`` (default ``applied``) is
    the config whose storage rules give the encodings."""
    from lprnet_edge.compress.prune import params_encodings, stored_size

    storage = stored_as if stored_as is not None else applied
    res.param_encodings = params_encodings(res.module, storage)
    res.report["config"] = res.config.to_dict()
    res.report["applied_fallback_layers"] = list(applied.fallback_layers)
    res.report["bn_folded"] = True
    res.report["encodings"] = params_encodings(stored, storage)
    res.report["stored_bytes"] = stored_size(stored, res.report["encodings"])
    if val is not None:
        from lprnet_edge.model.calib import accuracy, agreement

        res.report["val_accuracy"] = accuracy(res.module, val)
        res.report["val_agreement"] = agreement(res.module, original, val)
    return res


@register_handler(Fp16WeightsConfig)
@register_handler(Int8WeightsConfig)
def _weight_only(model: nn.Module, cfg: Fp16WeightsConfig | Int8WeightsConfig,
                 calib: Any = None, val: Any = None, **_options: Any) -> QuantizedModel:
    folded = fold_for_storage(model)
    applied = _fallbacks_for(folded, cfg)
    qm = weight_only_model(folded, applied)
    return _finish(QuantizedModel(qm, cfg), qm, model, val, applied)


@register_handler(Int8Config)
def _int8(model: nn.Module, cfg: Int8Config, calib: Any = None, val: Any = None,
          real_int8: bool = True, head_fp32: bool = True, **_options: Any) -> QuantizedModel:
    from dataclasses import replace

    if calib is None:
        raise LprnetEdgeError("int8 activation quantization needs calibration data (calib/)")
    if head_fp32 and not cfg.fallback_layers:
        # The head (normalised concat -> container conv) is by far the most sensitive layer.
        cfg = replace(cfg, fallback_layers=HEAD_LAYERS)
    # Constant channels folded first, as the float builds do: about half the convolution
    # work, and nothing of it is quantized (the constants go into float biases).
    folded = fold_for_storage(model)
    applied = _fallbacks_for(folded, cfg)
    th = calibrate(folded, calib, applied)
    qm = fake_quant_model(folded, th, applied)
    report: dict[str, Any] = {"thresholds": th}
    if applied.distill_epochs:
        from lprnet_edge.compress.quant_distill import distill_quantized

        qm, report["distill"] = distill_quantized(folded, qm, calib, applied.distill_epochs)
    _int8_stored_weights(qm, applied.fallback_layers)
    scales = {n: v["threshold"] / QMAX for n, v in th.items()
              if n not in set(applied.fallback_layers)}
    convs = tuple(n for n, m in qm.named_modules() if isinstance(m, QuantConv2d))
    res = QuantizedModel(qm, cfg, {**report, "act_scales": scales},
                         int8_convs=convs if real_int8 else (), act_scales=scales,
                         verify_tolerance=INT8_VERIFY_TOLERANCE if real_int8 else None)
    # The fallback layers compute in float but store int8 weights: no fallback for storage.
    return _finish(res, folded, model, val, applied, replace(applied, fallback_layers=()))


def _int8_stored_weights(model: nn.Module, layers: tuple[str, ...]) -> None:
    """The float32 ``layers`` (the head) keep float computation but are stored as int8
    weights, like ``int8-weights``: their weights become exactly what the ``int8`` encoding
    decodes to, so the artifact stores a quarter of the bytes and still computes what this
    model computes (float32, the head was about half of a channel-pruned int8 artifact's
    params.npz)."""
    with torch.no_grad():
        for n in layers:
            conv = model.get_submodule(n)
            conv.weight.copy_(int8_weight_roundtrip(conv.weight))


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """A plain float model (QuantConv2d -> Conv2d with int8-rounded weights), e.g. to export
    the weight-rounding part of an int8 model."""
    out = copy.deepcopy(model)
    for n, m in list(out.named_modules()):
        if isinstance(m, QuantConv2d):
            conv = m.conv
            with torch.no_grad():
                conv.weight.copy_(fake_quant(conv.weight, m.weight_scale))
            _set_module(out, n, conv)
    return out
