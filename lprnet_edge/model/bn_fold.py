"""BatchNorm folding on the PyTorch side: every artifact compiles a folded model, so the
weights it stores (and quantizes) are the ones that run."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(model: Any) -> Any:
    """A copy of ``model`` with each BatchNorm2d folded into the convolution before it.

    Works on ``nn.Sequential`` containers where a BatchNorm follows a Conv2d or a block whose
    last layer is a Conv2d (LPRNet's SmallBasicBlock). The folded BatchNorm becomes Identity,
    so module indices (LPRNet's feature taps) do not move. Zero weights stay zero (pruning).
    """
    model = copy.deepcopy(model).eval()

    def last_conv(m: nn.Module) -> tuple[nn.Module, str] | None:
        # (parent, attribute) of the Conv2d that produces m's output, if there is a single one.
        if isinstance(m, nn.Sequential) and len(m):
            last = str(len(m) - 1)
            if isinstance(m[-1], nn.Conv2d):
                return m, last
            return last_conv(m[-1])
        block = getattr(m, "block", None)
        if isinstance(block, nn.Sequential):
            return last_conv(block)
        return None

    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(1, len(seq)):
            bn, prev = seq[i], seq[i - 1]
            if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
                continue
            if isinstance(prev, nn.Conv2d):
                seq[i - 1] = fuse_conv_bn_eval(prev, bn)
            elif (found := last_conv(prev)) is not None:
                parent, key = found
                parent._modules[key] = fuse_conv_bn_eval(parent._modules[key], bn)
            else:
                continue
            seq[i] = nn.Identity()
    return model
