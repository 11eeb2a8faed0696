"""How a model is lowered to a module: the compiler layer's build options, as a config that
the manifest stores as-is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lprnet_edge.compress.configs import DictConfig


@dataclass(frozen=True)
class CompileConfig(DictConfig):
    """How the model is lowered: the input shape is fixed at batch 1 (LPRNet's semantics)."""

    frontend: str = "torch.export"  # "torch.export" | "onnx"
    layout: str = "NHWC"  # convolution data layout: "NHWC" (HWIO weights) | "NCHW"
    opt_level: int = 3
    num_threads: int | None = None  # runtime threads recorded for the device (None: all cores)
    verify_tolerance: float = 1e-3  # max |logit diff| vs PyTorch allowed by verification
    extra: dict[str, Any] = field(default_factory=dict)
