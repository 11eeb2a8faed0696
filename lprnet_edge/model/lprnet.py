"""LPRNet (sirius-ai LPRNet_Pytorch) in an export-friendly form. Host side: imports torch.

The original uses ``nn.MaxPool3d`` on 4-D tensors, which PyTorch treats as an unbatched 5-D
input: it pools 3x3 spatially and *strides over channels*. Here that is ``MaxPool2d`` plus a
channel slice ``[:, ::s]``, which torch.export, ONNX and TVM's Relax importers accept. The
module names and parameter shapes are the original's, so its state dict loads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

# Indices of the backbone outputs that feed the global-context head.
KEEP = (2, 6, 13, 22)


class ChannelStridedMaxPool(nn.Module):
    """``MaxPool3d((1, 3, 3), stride=(sc, 1, sw))`` on an NCHW tensor, written for export."""

    def __init__(self, channel_stride: int, width_stride: int) -> None:
        super().__init__()
        self.channel_stride = channel_stride
        self.pool = nn.MaxPool2d(kernel_size=3, stride=(1, width_stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        return x[:, :: self.channel_stride] if self.channel_stride > 1 else x


class SmallBasicBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, mid: int | None = None) -> None:
        super().__init__()
        mid = mid or ch_out // 4
        self.block = nn.Sequential(
            nn.Conv2d(ch_in, mid, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(mid, mid, kernel_size=(3, 1), padding=(1, 0)),
            nn.ReLU(),
            nn.Conv2d(mid, mid, kernel_size=(1, 3), padding=(0, 1)),
            nn.ReLU(),
            nn.Conv2d(mid, ch_out, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class LPRNet(nn.Module):
    """LPRNet for 94x24 BGR input; returns logits of shape ``(N, classes, 18)``.

    The global-context normalisation divides each feature map by the mean of its square over
    the *whole batch*, as the original does: results are defined at batch size 1.
    ``widths`` overrides channel counts (used by channel pruning); the defaults are the
    original's.
    """

    def __init__(self, class_num: int = 68, dropout_rate: float = 0.5,
                 widths: dict[str, int] | None = None) -> None:
        super().__init__()
        w = {"stem": 64, "b1_mid": 32, "b2_mid": 64, "b3_mid": 64, "b2_out": 256, "fc": 256}
        w.update(widths or {})
        self.class_num = class_num
        self.widths = w
        # The channel-strided pools keep every 2nd/4th channel of 128/256: the blocks' outputs
        # stay 128/256 wide so that slicing keeps the same channels as the original.
        self.backbone = nn.Sequential(
            nn.Conv2d(3, w["stem"], kernel_size=3, stride=1),  # 0
            nn.BatchNorm2d(w["stem"]),
            nn.ReLU(),  # 2
            ChannelStridedMaxPool(1, 1),
            SmallBasicBlock(w["stem"], 128, w["b1_mid"]),  # 4
            nn.BatchNorm2d(128),
            nn.ReLU(),  # 6
            ChannelStridedMaxPool(2, 2),
            SmallBasicBlock(64, w["b2_out"], w["b2_mid"]),  # 8
            nn.BatchNorm2d(w["b2_out"]),
            nn.ReLU(),  # 10
            SmallBasicBlock(w["b2_out"], 256, w["b3_mid"]),  # 11
            nn.BatchNorm2d(256),  # 12
            nn.ReLU(),
            ChannelStridedMaxPool(4, 2),  # 14
            nn.Dropout(dropout_rate),
            nn.Conv2d(64, w["fc"], kernel_size=(1, 4), stride=1),  # 16
            nn.BatchNorm2d(w["fc"]),
            nn.ReLU(),  # 18
            nn.Dropout(dropout_rate),
            nn.Conv2d(w["fc"], class_num, kernel_size=(13, 1), stride=1),  # 20
            nn.BatchNorm2d(class_num),
            nn.ReLU(),  # 22
        )
        self.pool0 = nn.AvgPool2d(kernel_size=5, stride=5)
        self.pool1 = nn.AvgPool2d(kernel_size=5, stride=5)
        self.pool2 = nn.AvgPool2d(kernel_size=(4, 10), stride=(4, 2))
        ctx = w["stem"] + 128 + 256 + class_num
        self.container = nn.Sequential(nn.Conv2d(ctx, class_num, kernel_size=1, stride=1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        keep = []
        for i, layer in enumerate(self.backbone):
            x = layer(x)
            if i in KEEP:
                keep.append(x)
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f0, f1, f2, f3 = self.features(x)
        ctx = []
        for f in (self.pool0(f0), self.pool1(f1), self.pool2(f2), f3):
            ctx.append(f / torch.mean(f * f))
        x = self.container(torch.cat(ctx, 1))
        return torch.mean(x, dim=2)


class OriginalLPRNet(LPRNet):
    """The upstream formulation (``MaxPool3d`` on 4-D tensors), kept to prove equivalence."""

    def __init__(self, class_num: int = 68, dropout_rate: float = 0.5) -> None:
        super().__init__(class_num, dropout_rate)
        self.backbone[3] = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 1, 1))
        self.backbone[7] = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(2, 1, 2))
        self.backbone[14] = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(4, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.features(x)
        ctx = []
        for i, f in enumerate(keep):
            if i in (0, 1):
                f = nn.AvgPool2d(kernel_size=5, stride=5)(f)
            if i == 2:
                f = nn.AvgPool2d(kernel_size=(4, 10), stride=(4, 2))(f)
            f = torch.div(f, torch.mean(torch.pow(f, 2)))
            ctx.append(f)
        return torch.mean(self.container(torch.cat(ctx, 1)), dim=2)


def example_input(batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, 3, 24, 94)
