"""FLOPs and parameter counts of an LPRNet (any ``widths``), per layer (host side, torch).

Counted with forward hooks on a batch-1 input, so channel-pruned widths, the channel-strided
pools and the context head are all taken into account. ``macs`` are multiply-accumulates of
the convolutions (the rest - BN, ReLU, pools, normalisation - is counted as ``other_flops``,
one op per output element). ``flops = 2 * macs + other_flops``. ``sparse_macs`` counts only the
non-zero weights (what an ideal sparse kernel would do; dense kernels do not get faster).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def count(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 24, 94)) -> dict[str, Any]:
    layers: dict[str, dict[str, int]] = {}
    other = [0]
    hooks = []

    def conv_hook(name: str):  # noqa: ANN202
        def hook(m: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
            k = m.weight[0].numel()  # in/groups * kh * kw
            macs = out.numel() * k
            nz = int((m.weight != 0).sum())
            dens = nz / max(m.weight.numel(), 1)
            layers[name] = {"macs": int(macs), "sparse_macs": int(round(macs * dens)),
                            "params": int(m.weight.numel() + (m.bias.numel() if m.bias is not None
                                                              else 0)),
                            "nonzero_weights": nz, "out_shape": list(out.shape)}
        return hook

    def other_hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            other[0] += out.numel()

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.MaxPool3d)):
            hooks.append(m.register_forward_hook(other_hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    macs = sum(v["macs"] for v in layers.values())
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for n, b in model.named_buffers() if "num_batches" not in n)
    return {
        "macs": int(macs),
        "sparse_macs": int(sum(v["sparse_macs"] for v in layers.values())),
        "other_flops": int(other[0] + 4 * out.shape[1] * 18),
        "flops": int(2 * macs + other[0]),
        "params": int(params),
        "nonzero_params": int(sum(int((p != 0).sum()) for p in model.parameters())),
        "buffers": int(buffers),
        "layers": layers,
    }


def summary(model: nn.Module) -> dict[str, Any]:
    """The headline figures only (no per-layer table)."""
    c = count(model)
    return {k: v for k, v in c.items() if k != "layers"}
