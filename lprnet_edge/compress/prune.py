"""Pruning of LPRNet (host side, torch): unstructured magnitude pruning and channel pruning.

``compress(model, UnstructuredPruneConfig(sparsity=s))``
    Global L1-magnitude pruning over all convolution weights: the ``s`` fraction of conv
    weights with the smallest ``|w|`` (ranked across layers) is set to zero. The model keeps
    its shapes; the zeros pay off on disk through the ``sparse`` / ``sparse-fp16`` encodings
    of :mod:`lprnet_edge.runtime.params_codec` (:func:`params_encodings`), not in dense FLOPs.

``compress(model, ChannelPruneConfig(ratio=r, groups=...), calib=...)``
    Removes whole filters by L1 norm (of the filter as seen after its BatchNorm scale) from the
    channel spaces that ``LPRNet(widths=...)`` can shrink without changing what the
    channel-strided pools select:

    - ``stem`` (conv 0 + BN 1): consumers are block 1's first conv and the context head
      (the first ``stem`` input channels of the container conv);
    - ``b1_mid``, ``b2_mid``, ``b3_mid``: the three internal spaces of each small basic
      block (after its 1x1, 3x1 and 1x3 convs), each with its own kept set;
    - ``fc`` (conv 16 + BN 17): consumer is the 13x1 class conv.

    Block outputs (128 / 256) are left whole: they feed ``[:, ::s]`` channel-strided pools
    and the head, so removing channels there would change which channels the pools keep.

    Removed channels are compensated where it is exact or nearly so: the mean activation of a
    removed channel (measured on ``calib``, or the channel's constant output when its filter is
    ~0) is folded into the consumer's bias, and for ``stem`` the container's weights are
    rescaled for the head's mean-of-squares normalisation, which is taken over fewer channels.
    Widths are rounded up to a multiple of ``round_to`` (the CPU's vector width): a conv
    with 33 or 19 output channels leaves a vector lane tail that defeats vectorization, and
    the channels added back are the least important (often dead) ones. Accuracy is then
    recovered by distillation (:mod:`lprnet_edge.compress.distill`).

:func:`prune` is the ``(model, report)`` form of :func:`lprnet_edge.compress.api.compress`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lprnet_edge.compress.api import PrunedModel, compress, register_handler
from lprnet_edge.compress.configs import (
    ChannelPruneConfig,
    Fp16WeightsConfig,
    PruneConfig,
    QuantizeConfig,
    UnstructuredPruneConfig,
)
from lprnet_edge.model.flops import summary as flops_summary
from lprnet_edge.model.lprnet import LPRNet
from lprnet_edge.runtime.errors import LprnetEdgeError

# ---------------------------------------------------------------- unstructured


def conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict name -> weight of every Conv2d (what unstructured pruning ranks)."""
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Global L1 masks: True = kept. Exactly ``round(sparsity * total)`` weights are dropped."""
    ws = conv_weights(model)
    flat = torch.cat([w.detach().abs().flatten() for w in ws.values()])
    n_drop = int(round(sparsity * flat.numel()))
    if n_drop == 0:
        return {n: torch.ones_like(w, dtype=torch.bool) for n, w in ws.items()}
    # Rank globally (ties broken by position so the count is exact).
    order = torch.argsort(flat, stable=True)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:n_drop]] = False
    masks, i = {}, 0
    for n, w in ws.items():
        masks[n] = keep[i:i + w.numel()].view_as(w)
        i += w.numel()
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m.to(params[n].dtype))


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Per-layer and global sparsity (exact zeros) of the conv weights."""
    layers = {}
    total = zeros = 0
    for n, w in conv_weights(model).items():
        z = int((w == 0).sum())
        layers[n] = {"params": int(w.numel()), "zeros": z, "sparsity": z / w.numel()}
        total += w.numel()
        zeros += z
    return {"global_sparsity": zeros / max(total, 1), "conv_params": int(total),
            "zeros": int(zeros), "layers": layers}


# ---------------------------------------------------------------- storage encodings


def params_encodings(model: nn.Module, cfg: PruneConfig | QuantizeConfig | None = None,
                     quant: QuantizeConfig | None = None, sparse_threshold: float = 0.3
                     ) -> dict[str, str]:
    """Per-tensor :mod:`params_codec` encodings (state-dict names) for ``save_params``.

    - conv weights with at least ``sparse_threshold`` exact zeros: ``sparse`` (or
      ``sparse-fp16`` when values are stored in half precision);
    - with a :class:`QuantizeConfig` of mode ``int8`` / ``int8-weights``: conv weights are
      ``int8`` (per-output-channel symmetric; a zero stays exactly zero, and zeros compress
      in the npz), mode ``fp16``: ``fp16`` / ``sparse-fp16``; except the
      ``fallback_layers`` (kept float32: ``dense`` / ``sparse``);
    - everything else (biases, BN affine, running stats): ``dense`` (or ``fp16`` in fp16 mode).

    ``cfg`` may be either config; pass both with ``cfg=prune_cfg, quant=quant_cfg``.
    Names are state-dict keys; :func:`map_encodings` renames them for the compiled module's
    parameter names.
    """
    q = quant if quant is not None else (cfg if isinstance(cfg, QuantizeConfig) else None)
    w_store = q.weight_storage if q is not None else None  # "int8" | "fp16" | None
    rest = q.other_storage if q is not None else "dense"
    fallback = set(q.fallback_layers) if q is not None else set()
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    enc: dict[str, str] = {}
    for name, t in model.state_dict().items():
        if "num_batches_tracked" in name:
            continue
        if name not in convs:
            enc[name] = rest
            continue
        sparse = t.numel() > 0 and float((t == 0).float().mean()) >= sparse_threshold
        store = None if name.rsplit(".", 1)[0] in fallback else w_store
        if store == "int8":
            enc[name] = "int8"
        elif store == "fp16":
            enc[name] = "sparse-fp16" if sparse else "fp16"
        else:
            enc[name] = "sparse" if sparse else "dense"
    return enc


def _norm_name(name: str) -> str:
    n = name.replace(".", "_")
    return n[2:] if n.startswith("p_") else n


def map_encodings(encodings: dict[str, str], param_names: list[str],
                  default: str = "dense") -> dict[str, str]:
    """Encodings keyed by the compiled module's parameter names (``p_backbone_0_weight``,
    ``backbone.0.weight``...), matched to state-dict names after normalising ``.``/``_``."""
    by_norm = {_norm_name(k): v for k, v in encodings.items()}
    return {p: by_norm.get(_norm_name(p), default) for p in param_names}


def stored_size(model: nn.Module, encodings: dict[str, str] | str = "dense") -> int:
    """Bytes of the params file (``save_params``, npz-compressed) with these encodings."""
    import os
    import tempfile

    from lprnet_edge.runtime.params_codec import save_params

    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()
              if "num_batches_tracked" not in k}
    fd, path = tempfile.mkstemp(suffix=".npz")
    os.close(fd)
    try:
        save_params(path, arrays, encodings)
        return os.path.getsize(path)
    finally:
        os.unlink(path)


def roundtrip(model: nn.Module, encodings: dict[str, str]) -> nn.Module:
    """A copy of ``model`` whose weights went through encode/decode (what the artifact runs)."""
    from lprnet_edge.runtime.params_codec import decode, encode

    out = copy.deepcopy(model)
    sd = out.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            e = encodings.get(k, "dense")
            if e == "dense" or "num_batches_tracked" in k:
                continue
            files = encode(k, v.cpu().numpy(), e)
            v.copy_(torch.from_numpy(decode(files, k, e)))
    return out


# ---------------------------------------------------------------- channel pruning


@dataclass(frozen=True)
class _Space:
    """One prunable channel space: produced by ``producer`` (+``bn``), read by ``consumers``."""

    width: str  # key in LPRNet.widths
    producer: str
    bn: str | None
    consumers: tuple[str, ...]
    head_slice: bool = False  # also feeds the context head (first channels of the container)


def _spaces() -> list[_Space]:
    sp = [_Space("stem", "backbone.0", "backbone.1", ("backbone.4.block.0",), head_slice=True)]
    for key, blk in (("b1_mid", "backbone.4"), ("b2_mid", "backbone.8"),
                     ("b3_mid", "backbone.11")):
        for a, b in ((0, 2), (2, 4), (4, 6)):
            sp.append(_Space(key, f"{blk}.block.{a}", None, (f"{blk}.block.{b}",)))
        if key == "b2_mid":
            # Block 2's output feeds only block 3 (no channel-strided pool, not in the head).
            sp.append(_Space("b2_out", "backbone.8.block.6", "backbone.9",
                             ("backbone.11.block.0",)))
    sp.append(_Space("fc", "backbone.16", "backbone.17", ("backbone.20",)))
    return sp


PRUNABLE = ("stem", "b1_mid", "b2_mid", "b3_mid", "b2_out", "fc")
# Spaces followed by a BatchNorm whose dead channels (filter and BN scale ~0) are removed first.
DEAD_PRUNABLE = ("stem", "b2_out", "fc")


def _consumer_stats(model: LPRNet, spaces: list[_Space], x: torch.Tensor | None
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) of each consumer conv's input activations on ``x``."""
    mods = dict(model.named_modules())
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    names = {c for sp in spaces for c in sp.consumers}

    def hook(name: str):  # noqa: ANN202
        def f(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            a = inp[0].detach().transpose(0, 1).flatten(1)
            stats[name] = (a.mean(1), a.std(1) if a.shape[1] > 1 else torch.zeros(a.shape[0]))
        return f

    for n in names:
        hooks.append(mods[n].register_forward_pre_hook(hook(n)))
    was = model.training
    try:
        with torch.no_grad():
            model.eval()
            model.features(x if x is not None else torch.zeros(1, 3, 24, 94))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return stats


def _importance(sd: dict[str, torch.Tensor], sp: _Space,
                stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> torch.Tensor:
    """Filter importance: L1 norm of the filter (times its BN scale) without data; with
    calibration statistics, the channel's contribution to its consumer that a bias cannot
    absorb: ``std(activation) * ||W_consumer[:, c]||_1``."""
    if stats and all(c in stats for c in sp.consumers):
        imp = torch.zeros(sd[f"{sp.producer}.weight"].shape[0])
        for c in sp.consumers:
            imp += stats[c][1] * sd[f"{c}.weight"].abs().sum(dim=(0, 2, 3))
        return imp
    w = sd[f"{sp.producer}.weight"]
    imp = w.abs().flatten(1).sum(1)
    if sp.bn:
        g = sd[f"{sp.bn}.weight"] / torch.sqrt(sd[f"{sp.bn}.running_var"] + 1e-5)
        imp = imp * g.abs()
    return imp


def live_channels(model: LPRNet, tol: float = 1e-3) -> dict[str, int]:
    """Channels whose filter (times BN scale) is not ~0, for the BN-followed spaces."""
    sd = model.state_dict()
    out = {}
    for sp in _spaces():
        if sp.width in DEAD_PRUNABLE:
            imp = _importance(sd, sp)
            out[sp.width] = max(1, int((imp > tol * imp.max()).sum()))
    return out


def channel_widths(model: LPRNet, ratio: float | dict[str, float],
                   groups: tuple[str, ...] = ("b1_mid", "b2_mid", "b3_mid"),
                   drop_dead: bool = True, round_to: int = 1) -> dict[str, int]:
    """Target widths: each group in ``groups`` keeps ``ceil((1 - ratio) * width)`` channels
    (``ratio`` may be a dict per group); with ``drop_dead``, the BN-followed spaces (stem,
    block 2 output, fc) also lose their dead channels (exact up to a bias fold). Every
    width that changed is then rounded up to a multiple of ``round_to`` (at most the
    model's own width)."""
    ratios = ratio if isinstance(ratio, dict) else dict.fromkeys(groups, ratio)
    out = dict(model.widths)
    for g, r in ratios.items():
        if g not in PRUNABLE:
            raise LprnetEdgeError(f"channel group {g!r}: use one of {list(PRUNABLE)}")
        out[g] = max(1, int(math.ceil((1.0 - r) * model.widths[g])))
    if drop_dead:
        for g, n in live_channels(model).items():
            out[g] = min(out[g], n)
    return round_widths(out, model.widths, round_to)


def round_widths(widths: dict[str, int], full: dict[str, int], multiple: int
                 ) -> dict[str, int]:
    """Pruned widths rounded up to a multiple of ``multiple``, never past ``full``."""
    if multiple <= 1:
        return dict(widths)
    return {g: n if n == full[g] else min(full[g], int(math.ceil(n / multiple)) * multiple)
            for g, n in widths.items()}


def prune_channels(model: LPRNet, widths: dict[str, int], calib_x: np.ndarray | None = None,
                   compensate: bool = True) -> tuple[LPRNet, dict[str, Any]]:
    """A new ``LPRNet(widths=widths)`` with the most important filters of ``model``.

    ``calib_x`` (preprocessed calibration images) gives data-driven importance and the
    bias / head compensation; without it, L1 filter norms and a zero-energy assumption.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    orig = {k: v.clone() for k, v in sd.items()}
    spaces = _spaces()
    x = torch.from_numpy(calib_x[:128]) if calib_x is not None else None
    stats = _consumer_stats(model, spaces, x) if x is not None else {}
    const = _consumer_stats(model, spaces, None) if x is None and compensate else {}
    kept: dict[str, list[int]] = {}
    head_factor = 1.0
    for sp in spaces:
        n_old = orig[f"{sp.producer}.weight"].shape[0]
        n_new = int(widths.get(sp.width, n_old))
        if n_new > n_old:
            raise LprnetEdgeError(f"width {sp.width}={n_new} exceeds the model's {n_old}")
        imp = _importance(orig, sp, stats if sp.width not in DEAD_PRUNABLE or x is not None
                          else None)
        keep = torch.sort(torch.argsort(imp, descending=True)[:n_new]).values
        drop = torch.tensor(sorted(set(range(n_old)) - set(keep.tolist())), dtype=torch.long)
        kept[sp.producer] = keep.tolist()
        for suffix in ("weight", "bias"):
            sd[f"{sp.producer}.{suffix}"] = sd[f"{sp.producer}.{suffix}"][keep]
        if sp.bn:
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                sd[f"{sp.bn}.{suffix}"] = sd[f"{sp.bn}.{suffix}"][keep]
        for c in sp.consumers:
            w = sd[f"{c}.weight"]
            src = stats if x is not None else const
            if compensate and len(drop) and c in src:
                # Fold the removed channels' mean activation into the consumer's bias.
                m = src[c][0][drop].to(w.dtype)
                sd[f"{c}.bias"] = sd[f"{c}.bias"] + (w[:, drop].sum(dim=(2, 3)) * m).sum(1)
            sd[f"{c}.weight"] = w[:, keep]
        if sp.head_slice:
            head_factor = _head_factor(model, keep, x) if compensate else 1.0
            cw = sd["container.0.weight"]
            sd["container.0.weight"] = torch.cat(
                [cw[:, :n_old][:, keep] * head_factor, cw[:, n_old:]], dim=1)
    new = LPRNet(class_num=model.class_num, widths=widths)
    new.load_state_dict(sd)
    new.eval()
    return new, {"kept_channels": kept, "head_factor": head_factor}


def _head_factor(model: LPRNet, keep: torch.Tensor, x: torch.Tensor | None) -> float:
    """mean_new / mean_old of the stem's context map once channels are removed.

    The head divides the map by its mean square over channels; with fewer channels the mean
    changes by ``(S_kept / S_all) * (C / C')``; the container's slice is scaled by it.
    """
    c_old = model.widths["stem"]
    c_new = len(keep)
    if x is None:
        return c_old / c_new
    with torch.no_grad():
        f0 = model.pool0(model.features(x)[0])
        s_all = (f0 * f0).sum(dim=(1, 2, 3))
        s_kept = (f0[:, keep] ** 2).sum(dim=(1, 2, 3))
        r = float((s_kept / s_all.clamp_min(1e-12)).mean())
    return r * c_old / c_new


# ---------------------------------------------------------------- entry points


def prune(model: LPRNet, cfg: PruneConfig, calib: Any = None, distill_kwargs: dict | None = None,
          ) -> tuple[LPRNet, dict[str, Any]]:
    """``(model, report)`` of :func:`compress` for a pruning config (a copy is pruned).

    ``calib`` is a :class:`lprnet_edge.model.calib.CalibrationSet`. For channel pruning with
    ``cfg.distill_epochs > 0`` and ``calib`` given, the pruned model is distilled from
    ``model`` on the training part of ``calib`` and evaluated on its validation part.
    """
    res = compress(model, cfg, calib, distill_kwargs=distill_kwargs)
    return res.module, res.report


def folded_encodings(model: nn.Module) -> dict[str, str]:
    """Encodings of the BatchNorm-folded model the pipeline compiles (sparse where zeros)."""
    from lprnet_edge.model.bn_fold import fold_batchnorm

    return params_encodings(fold_batchnorm(model))


@register_handler(UnstructuredPruneConfig)
def _unstructured(model: LPRNet, cfg: UnstructuredPruneConfig, calib: Any = None,
                  **_options: Any) -> PrunedModel:
    before = flops_summary(model)
    out = copy.deepcopy(model).eval()
    apply_masks(out, magnitude_masks(out, cfg.sparsity))
    sp = sparsity_report(out)
    enc32 = params_encodings(out)
    enc16 = params_encodings(out, Fp16WeightsConfig())
    report = {
        "kind": cfg.kind, "config": cfg.to_dict(), **sp,
        "stored_bytes": {"dense": stored_size(model, "dense"),
                         "sparse": stored_size(out, enc32),
                         "sparse-fp16": stored_size(out, enc16)},
        "flops_before": before, "flops_after": flops_summary(out),
    }
    return PrunedModel(out, cfg, report, folded_encodings(out))


@register_handler(ChannelPruneConfig)
def _channels(model: LPRNet, cfg: ChannelPruneConfig, calib: Any = None,
              distill_kwargs: dict | None = None, **_options: Any) -> PrunedModel:
    """Widths from ``cfg``, filters chosen (and removed channels compensated) on the training
    split of ``calib``, then distilled there and measured on its validation split."""
    before = flops_summary(model)
    widths = channel_widths(model, dict.fromkeys(cfg.groups, cfg.ratio),
                            drop_dead=cfg.drop_dead, round_to=cfg.round_to)
    train, val = calib.split(0.3, cfg.seed) if calib is not None else (None, None)
    out, info = prune_channels(model, widths, train.x if train is not None else None)
    report: dict[str, Any] = {"kind": cfg.kind, "config": cfg.to_dict(), "widths": widths,
                              "head_factor": info["head_factor"],
                              "flops_before": before, "flops_after": flops_summary(out)}
    report["flops_reduction"] = before["flops"] / report["flops_after"]["flops"]
    if train is not None and val is not None:
        from lprnet_edge.compress.distill import DistillConfig, distill
        from lprnet_edge.model.calib import accuracy

        report["val_accuracy_original"] = accuracy(model, val)
        report["val_accuracy_pruned"] = accuracy(out, val)
        if cfg.distill_epochs > 0:
            kw = {"time_budget_s": cfg.distill_time_s, **(distill_kwargs or {})}
            dcfg = DistillConfig(epochs=cfg.distill_epochs, seed=cfg.seed, **kw)
            out, hist = distill(model, out, train, dcfg, val=val)
            report["distill"] = hist
            report["val_accuracy_distilled"] = accuracy(out, val)
    return PrunedModel(out, cfg, report, folded_encodings(out))
