"""Lossless channel folding: drop the convolution filters whose output is a constant.

The sirius-ai checkpoint has many *dead* filters: after BatchNorm folding, every weight of
the filter is exactly zero (its denormals were flushed at load), so its output is the
constant ``relu(bias)`` at every pixel. 237 of the 256 filters of the second block's last
convolution, 235 of the third's and 217 of the 256 filters of the 1x4 convolution are dead:
computing them is half of the model's FLOPs. The checkpoint trained them to zero; nothing is
approximated here, unlike channel *pruning* (:mod:`lprnet_edge.compress.prune`).

A dead channel is removed and its constant pushed forward, which is exact where every reader
of the channel sees the constant at every position:

- an unpadded convolution (1x1, 1x4, 13x1) after max/avg pools without padding: the constant
  times the summed kernel taps joins the consumer's bias;
- the global-context head ``f / mean(f * f)`` followed by the 1x1 container: the constant
  channels' share of ``sum(f * f)`` and of the container's output are kept as constants
  (:class:`FoldedLPRNet`), divided by the same ``mean`` at run time.

A channel whose every consumer weight is zero (and that feeds no global context) is dropped
too. A filter followed by a padded convolution is never dropped (its border would change).
Kept counts are rounded up to ``multiple`` by keeping some foldable channels, so that the
compiled kernels see vector-friendly widths; those compute their constant, which is exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lprnet_edge.model.bn_fold import fold_batchnorm
from lprnet_edge.model.lprnet import LPRNet

# (producer conv, consumer conv or None, channel stride between them, global-context index).
# The channel stride is LPRNet's channel-strided max pool (see ChannelStridedMaxPool).
EDGES: tuple[tuple[str, str | None, int, int | None], ...] = (
    ("backbone.0", "backbone.4.block.0", 1, 0),
    ("backbone.4.block.4", "backbone.4.block.6", 1, None),
    ("backbone.4.block.6", "backbone.8.block.0", 2, 1),
    ("backbone.8.block.4", "backbone.8.block.6", 1, None),
    ("backbone.8.block.6", "backbone.11.block.0", 1, None),
    ("backbone.11.block.4", "backbone.11.block.6", 1, None),
    ("backbone.11.block.6", "backbone.16", 4, 2),
    ("backbone.16", "backbone.20", 1, None),
    ("backbone.20", None, 1, 3),
)
# Every convolution before the container, in execution order.
CONVS = ("backbone.0",
         *(f"backbone.{b}.block.{i}" for b in (4, 8, 11) for i in (0, 2, 4, 6)),
         "backbone.16", "backbone.20")
# Backbone index of the channel-strided pool between a producer and its consumer.
_POOL_AFTER = {"backbone.0": 3, "backbone.4.block.6": 7, "backbone.11.block.6": 14}


@dataclass(frozen=True)
class FoldReport:
    """Filters per producer before and after folding, and the FLOPs saved."""

    kept: dict[str, tuple[int, int]]  # producer -> (kept, original)

    @property
    def dropped(self) -> int:
        return sum(orig - k for k, orig in self.kept.values())

    def summary(self) -> str:
        parts = [f"{n}: {k}/{o}" for n, (k, o) in self.kept.items() if k < o]
        return f"{self.dropped} constant filters folded ({', '.join(parts) or 'none'})"


class SlicedMaxPool(nn.Module):
    """The max pool of a channel-strided pool whose channel selection became a leading slice:
    the folded producer orders its kept channels so that the consumer's come first."""

    def __init__(self, pool: nn.MaxPool2d, take: int | None) -> None:
        super().__init__()
        self.pool = pool
        self.take = take

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        return x if self.take is None else x[:, : self.take]


class FoldedLPRNet(nn.Module):
    """LPRNet with constant channels folded: same logits, fewer filters.

    The head computes ``container(cat(f_k / m_k)) = sum_k head_k(f_k) / m_k + bias`` with one
    1x1 convolution per context feature: the division then runs on the 68 output channels
    instead of being fused into the container's input (recomputed per output channel).
    ``head_k``'s bias is the constant channels' share of the container's output; ``ctx_sq[k]``
    their share of ``sum(f_k * f_k)`` per pooled pixel, and ``m_k`` is the mean over the
    original channel count ``ctx_channels[k]``.
    """

    def __init__(self, base: LPRNet, ctx_channels: tuple[int, ...], ctx_sq: tuple[float, ...],
                 heads: nn.ModuleList, bias: torch.Tensor) -> None:
        super().__init__()
        self.class_num = base.class_num
        self.widths = dict(base.widths)
        self.backbone = base.backbone
        self.pool0, self.pool1, self.pool2 = base.pool0, base.pool1, base.pool2
        self.heads = heads
        self.head_bias = nn.Parameter(bias.reshape(1, -1, 1, 1), requires_grad=False)
        self.ctx_channels = ctx_channels
        self.ctx_sq = ctx_sq

    features = LPRNet.features  # the same backbone taps (KEEP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.features(x), per_sample=False)

    def forward_per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """Batch-1 semantics for every row (``model.calib.forward_per_sample``)."""
        return self._head(self.features(x), per_sample=True)

    def _head(self, keep: list[torch.Tensor], per_sample: bool) -> torch.Tensor:
        f0, f1, f2, f3 = keep
        out = self.head_bias
        for k, f in enumerate((self.pool0(f0), self.pool1(f1), self.pool2(f2), f3)):
            pixels = f.shape[2] * f.shape[3]
            sq = torch.sum(f * f, dim=(1, 2, 3), keepdim=True) if per_sample else torch.sum(f * f)
            mean = (sq + self.ctx_sq[k] * pixels) / (self.ctx_channels[k] * pixels)
            out = out + self.heads[k](f) / mean
        return torch.mean(out, dim=2)


def foldable(model: nn.Module) -> bool:
    """True for a float LPRNet whose convolutions are plain ``nn.Conv2d`` with a bias (BN
    folded): the structure :data:`EDGES` describes."""
    if type(model) is not LPRNet:
        return False
    convs = dict(model.named_modules())
    return all(type(convs.get(p)) is nn.Conv2d and convs[p].bias is not None
               for p in (*CONVS, "container.0"))


def fold_all(model: nn.Module) -> tuple[nn.Module, FoldReport | None]:
    """BatchNorm folded, then constant channels where the model allows it (report None when
    not): what every build compiles, and what weight-only quantization rounds, so both see
    the same tensors."""
    folded = fold_batchnorm(model)
    return fold_constant_channels(folded) if foldable(folded) else (folded, None)


def fold_constant_channels(model: LPRNet, multiple: int = 8) -> tuple[nn.Module, FoldReport]:
    """``(FoldedLPRNet, report)`` for a BatchNorm-folded LPRNet (see the module docstring).

    ``multiple``: kept filter counts are rounded up to it (1: keep only what is needed).
    The input model is not modified.
    """
    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    ctx_channels = [0, 0, 0, 0]
    consts: dict[str, torch.Tensor] = {}  # producer -> per-channel constant (nan: not constant)
    order: dict[str, list[int]] = {}  # producer -> kept original channels, in new order
    kept: dict[str, tuple[int, int]] = {}
    edges = {e[0]: e for e in EDGES}
    with torch.no_grad():
        for name in CONVS:
            conv = mods[name]
            _fold_inputs(conv, name, consts, order)
            if name not in edges:
                continue
            _, consumer, stride, ctx = edges[name]
            const = _constant_outputs(conv)
            droppable = ~torch.isnan(const)
            if ctx is None and consumer is not None:
                droppable |= _unused_by(mods[consumer], conv.out_channels, stride)
            keep = _round_up(~droppable, multiple)
            order[name] = _ordered(keep, stride)
            consts[name] = torch.where(droppable, torch.nan_to_num(const), torch.nan)
            if ctx is not None:
                ctx_channels[ctx] = conv.out_channels
            kept[name] = (len(order[name]), conv.out_channels)
            _keep_outputs(conv, order[name])
        ctx_sq, heads = _fold_context(mods["container.0"], consts, order, ctx_channels)
    _slice_pools(m, order)
    folded = FoldedLPRNet(m, tuple(ctx_channels), ctx_sq, heads, mods["container.0"].bias)
    return folded, FoldReport(kept)


def _constant_outputs(conv: nn.Conv2d) -> torch.Tensor:
    """``relu(bias)`` for the filters with all-zero weights, NaN for the others."""
    dead = conv.weight.flatten(1).abs().amax(1) == 0
    return torch.where(dead, torch.relu(conv.bias), torch.nan)


def _unused_by(consumer: nn.Conv2d, channels: int, stride: int) -> torch.Tensor:
    """Producer channels the consumer reads with all-zero weights (or skips by stride)."""
    unused = torch.ones(channels, dtype=torch.bool)
    reads = consumer.weight.abs().amax(dim=(0, 2, 3)) > 0
    unused[torch.arange(consumer.in_channels) * stride] = ~reads
    return unused


def _round_up(needed: torch.Tensor, multiple: int) -> torch.Tensor:
    """``needed`` plus the first unneeded channels until the count is a multiple."""
    keep = needed.clone()
    target = min(len(keep), -(-max(int(keep.sum()), 1) // multiple) * multiple)
    for c in torch.nonzero(~keep).flatten().tolist():
        if int(keep.sum()) >= target:
            break
        keep[c] = True
    return keep


def _ordered(keep: torch.Tensor, stride: int) -> list[int]:
    """Kept channels with the ones a channel-strided pool selects first, so that its
    selection is a leading slice."""
    idx = torch.nonzero(keep).flatten().tolist()
    return [c for c in idx if c % stride == 0] + [c for c in idx if c % stride]


def _fold_inputs(conv: nn.Conv2d, name: str, consts: dict[str, torch.Tensor],
                 order: dict[str, list[int]]) -> None:
    """Slice ``conv``'s inputs to its producer's kept channels; dropped constant inputs
    move into the bias (exact: the consumer is unpadded, see EDGES)."""
    edge = next((e for e in EDGES if e[1] == name), None)
    if edge is None:
        return
    producer, _, stride, _ = edge
    pos = {c: i for i, c in enumerate(order[producer])}
    reads = [j for j in range(conv.in_channels) if j * stride in pos]
    dropped = [j for j in range(conv.in_channels) if j * stride not in pos]
    value = consts[producer][[j * stride for j in dropped]]
    w = conv.weight
    conv.bias += (w[:, dropped].sum(dim=(2, 3)) * torch.nan_to_num(value)).sum(1)
    reads.sort(key=lambda j: pos[j * stride])
    conv.weight = nn.Parameter(w[:, reads].contiguous(), requires_grad=False)
    conv.in_channels = len(reads)


def _keep_outputs(conv: nn.Conv2d, keep: list[int]) -> None:
    conv.weight = nn.Parameter(conv.weight[keep].contiguous(), requires_grad=False)
    conv.bias = nn.Parameter(conv.bias[keep].contiguous(), requires_grad=False)
    conv.out_channels = len(keep)


def _fold_context(container: nn.Conv2d, consts: dict[str, torch.Tensor],
                  order: dict[str, list[int]], ctx_channels: list[int]
                  ) -> tuple[tuple[float, ...], nn.ModuleList]:
    """Split the container by context feature, reading the kept channels in their new order;
    the constant channels become each part's bias and their ``sum(c^2)``."""
    producers = [e[0] for e in EDGES if e[3] is not None]
    w = container.weight[:, :, 0, 0]
    heads, sq, offset = nn.ModuleList(), [], 0
    for producer, channels in zip(producers, ctx_channels, strict=True):
        kept = order[producer]
        const = torch.nan_to_num(consts[producer])
        const[kept] = 0
        head = nn.Conv2d(len(kept), w.shape[0], kernel_size=1)
        head.weight = nn.Parameter(w[:, [offset + c for c in kept], None, None].contiguous(),
                                   requires_grad=False)
        head.bias = nn.Parameter(w[:, offset:offset + channels] @ const, requires_grad=False)
        heads.append(head)
        sq.append(float((const.double() ** 2).sum()))
        offset += channels
    return tuple(sq), heads


def _slice_pools(m: LPRNet, order: dict[str, list[int]]) -> None:
    """Channel-strided pools become a leading slice of the reordered channels."""
    for producer, index in _POOL_AFTER.items():
        pool = m.backbone[index]
        stride = pool.channel_stride
        take = sum(1 for c in order[producer] if c % stride == 0)
        m.backbone[index] = SlicedMaxPool(pool.pool, None if stride == 1 else take)
