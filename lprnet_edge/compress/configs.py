"""One config dataclass per technique; each is saved in the artifact manifest as-is."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lprnet_edge.runtime.errors import LprnetEdgeError


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):  # noqa: ANN206
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise LprnetEdgeError(f"{cls.__name__}: unknown options {sorted(unknown)}; "
                                  f"use one of {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class PruneConfig(_Config):
    """``unstructured``: global L1 magnitude over conv weights to ``sparsity``.
    ``channels``: remove ``ratio`` of the filters of the prunable convs, then distill."""

    kind: str = "unstructured"  # "unstructured" | "channels"
    sparsity: float = 0.8
    ratio: float = 0.5
    distill_epochs: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("unstructured", "channels"):
            raise LprnetEdgeError(
                f"prune kind {self.kind!r}: use one of ['unstructured', 'channels']")
        if not 0.0 <= self.sparsity < 1.0 or not 0.0 <= self.ratio < 1.0:
            raise LprnetEdgeError("sparsity and ratio must be in [0, 1)")


@dataclass(frozen=True)
class QuantizeConfig(_Config):
    """Post-training quantization calibrated on ``calib/`` (never ``test/``)."""

    mode: str = "int8"  # "int8" | "fp16" (weight storage) | "int8-weights" (weight-only)
    calibrator: str = "percentile"  # "minmax" | "percentile" | "entropy" | "mse"
    percentile: float = 99.99
    per_channel: bool = True
    calib_images: int = 256
    fallback_layers: tuple[str, ...] = ()  # layers kept in fp32 (from the sensitivity scan)

    def __post_init__(self) -> None:
        if self.mode not in ("int8", "fp16", "int8-weights"):
            raise LprnetEdgeError(f"quantize mode {self.mode!r}: use one of "
                                  "['int8', 'fp16', 'int8-weights']")
        if self.calibrator not in ("minmax", "percentile", "entropy", "mse"):
            raise LprnetEdgeError(f"calibrator {self.calibrator!r}: use one of "
                                  "['minmax', 'percentile', 'entropy', 'mse']")


@dataclass(frozen=True)
class TuneConfig(_Config):
    """MetaSchedule budget and where to measure (local, direct RPC or an RPC tracker)."""

    trials: int = 200
    trials_per_task: int | None = None
    num_trials_per_iter: int = 16
    rpc: str | None = None  # "HOST:PORT" of a TVM RPC server
    rpc_tracker: str | None = None  # "HOST:PORT" of a TVM RPC tracker
    rpc_key: str | None = None
    timeout_s: float = 60.0
    seed: int = 0
    db_dir: str | None = None  # default: the cache, keyed by target and workload

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise LprnetEdgeError("trials must be >= 1")
        if self.rpc_tracker and not self.rpc_key:
            raise LprnetEdgeError("--rpc-tracker needs --rpc-key (the device key to request)")


@dataclass(frozen=True)
class CompileConfig(_Config):
    """How the model is lowered: the input shape is fixed at batch 1 (LPRNet's semantics)."""

    frontend: str = "torch.export"  # "torch.export" | "onnx"
    opt_level: int = 3
    num_threads: int | None = None  # runtime threads recorded for the device (None: all cores)
    verify_tolerance: float = 1e-3  # max |logit diff| vs PyTorch allowed by verification
    extra: dict[str, Any] = field(default_factory=dict)
