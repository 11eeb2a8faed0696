"""One config dataclass per technique (torchao style); each is saved in the manifest as-is.

Compression techniques come in two families, each with a discriminator key that the manifest's
``stages`` dicts carry: pruning (``kind``) and quantization (``mode``)::

    UnstructuredPruneConfig  {"kind": "unstructured", "sparsity": 0.8, ...}
    ChannelPruneConfig       {"kind": "channels", "ratio": 0.5, "groups": [...], ...}
    Fp16WeightsConfig        {"mode": "fp16", ...}
    Int8WeightsConfig        {"mode": "int8-weights", ...}
    Int8Config               {"mode": "int8", "calibrator": "mse", ...}

``PruneConfig.from_dict(d)`` / ``QuantizeConfig.from_dict(d)`` read any of them back, refusing
options the technique does not have. Calling a family with its discriminator builds the
technique's config (``PruneConfig(kind="channels")`` is ``ChannelPruneConfig()``), so code that
names a technique by string (the CLI, the manifest) needs no ``if mode == ...``. A new
technique is a new config class here and a handler (:func:`lprnet_edge.compress.api
.register_handler`) beside its code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from lprnet_edge.runtime.errors import LprnetEdgeError

# LPRNet's channel spaces that channel pruning may shrink (see compress.prune).
CHANNEL_GROUPS = ("stem", "b1_mid", "b2_mid", "b3_mid", "b2_out", "fc")
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


def _tuplify(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


class DictConfig:
    """A config that round-trips through the manifest's JSON, refusing unknown keys."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):  # noqa: ANN206
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise LprnetEdgeError(f"{cls.__name__}: unknown options {sorted(unknown)}; "
                                  f"use one of {sorted(names)}")
        return cls(**{k: _tuplify(v) for k, v in d.items()})


class _FamilyMeta(type):
    """``PruneConfig(kind=...)`` / ``QuantizeConfig(mode=...)`` build the technique's class."""

    def __call__(cls, *args: Any, **kw: Any) -> Any:
        if cls.__dict__.get("_family_root"):
            if args:
                raise TypeError(f"{cls.__name__}(...) takes keyword arguments only")
            tag = kw.pop(cls.tag_key, cls.default_tag)
            return super(_FamilyMeta, cls.technique(tag)).__call__(**kw)
        return super().__call__(*args, **kw)


class CompressConfig(DictConfig, metaclass=_FamilyMeta):
    """Base of every compression technique's config (like torchao's ``AOBaseConfig``).

    A family root (:class:`PruneConfig`, :class:`QuantizeConfig`) names its discriminator
    (``tag_key``); each technique subclass sets that class attribute (``kind = "channels"``)
    and registers itself by it.
    """

    tag_key: ClassVar[str] = ""
    default_tag: ClassVar[str] = ""
    _techniques: ClassVar[dict[str, type]]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("_family_root"):
            cls._techniques = {}
            return
        tag = cls.__dict__.get(cls.tag_key)
        if tag:
            cls._techniques[tag] = cls

    @property
    def tag(self) -> str:
        return getattr(self, self.tag_key)

    @classmethod
    def technique(cls, tag: str) -> type:
        try:
            return cls._techniques[tag]
        except KeyError:
            raise LprnetEdgeError(f"{cls.tag_key} {tag!r}: use one of "
                                  f"{sorted(cls._techniques)}") from None

    def to_dict(self) -> dict[str, Any]:
        return {self.tag_key: self.tag, **asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):  # noqa: ANN206
        d = dict(d)
        tag = d.pop(cls.tag_key, None)
        target: type = cls
        if cls.__dict__.get("_family_root"):
            target = cls.technique(tag or cls.default_tag)
        elif tag is not None and tag != getattr(cls, cls.tag_key):
            raise LprnetEdgeError(f"{cls.__name__}: {cls.tag_key} {tag!r} is not "
                                  f"{getattr(cls, cls.tag_key)!r}")
        return DictConfig.from_dict.__func__(target, d)  # type: ignore[attr-defined]


class PruneConfig(CompressConfig):
    """Pruning techniques, told apart by ``kind``."""

    _family_root: ClassVar[bool] = True
    tag_key: ClassVar[str] = "kind"
    default_tag: ClassVar[str] = "unstructured"
    kind: ClassVar[str]


class QuantizeConfig(CompressConfig):
    """Quantization techniques, told apart by ``mode``."""

    _family_root: ClassVar[bool] = True
    tag_key: ClassVar[str] = "mode"
    default_tag: ClassVar[str] = "int8"
    mode: ClassVar[str]
    fallback_layers: tuple[str, ...]
    # How params.npz stores the conv weights (except fallback layers) and the other tensors.
    weight_storage: ClassVar[str] = "int8"
    other_storage: ClassVar[str] = "dense"


@dataclass(frozen=True)
class UnstructuredPruneConfig(PruneConfig):
    """Global L1 magnitude over all conv weights to ``sparsity`` (zeros pay off on disk)."""

    kind: ClassVar[str] = "unstructured"
    sparsity: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise LprnetEdgeError(f"sparsity {self.sparsity}: must be in [0, 1)")


@dataclass(frozen=True)
class ChannelPruneConfig(PruneConfig):
    """Remove ``ratio`` of the filters of the channel spaces ``groups`` (and, with
    ``drop_dead``, the dead channels of the BatchNorm-followed spaces), round every pruned
    width up to a multiple of ``round_to`` (the vector width, so pruned convolutions still
    vectorize; 1: no rounding), then distill from the original on calib/ for at most
    ``distill_epochs`` epochs / ``distill_time_s`` seconds.

    The defaults are the best variant of docs/compression-report.md
    (``channels-b23x0.5+kd``: dead channels, block 2 and 3 inner widths halved, 8 epochs
    capped at 420 s, the best epoch on the validation split kept), with widths rounded to 8.
    The wall-time cap makes the number of steps depend on the machine's load (the report's
    model stopped after 23 steps); the guard of the build checks the result either way.
    """

    kind: ClassVar[str] = "channels"
    ratio: float = 0.5
    groups: tuple[str, ...] = ("b2_mid", "b3_mid")
    drop_dead: bool = True
    round_to: int = 8
    distill_epochs: int = 8
    distill_time_s: float = 420.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise LprnetEdgeError(f"prune ratio {self.ratio}: must be in [0, 1)")
        bad = [g for g in self.groups if g not in CHANNEL_GROUPS]
        if bad:
            raise LprnetEdgeError(f"channel groups {bad}: use some of {list(CHANNEL_GROUPS)}")
        if self.round_to < 1:
            raise LprnetEdgeError(f"round_to {self.round_to}: must be >= 1 (1: no rounding)")
        if self.distill_epochs < 0 or self.distill_time_s <= 0:
            raise LprnetEdgeError("distill_epochs must be >= 0 and distill_time_s > 0")


@dataclass(frozen=True)
class Fp16WeightsConfig(QuantizeConfig):
    """Weights stored in half precision, decoded to float32 at load (size only)."""

    mode: ClassVar[str] = "fp16"
    weight_storage: ClassVar[str] = "fp16"
    other_storage: ClassVar[str] = "fp16"
    fallback_layers: tuple[str, ...] = ()  # convs kept in float32


@dataclass(frozen=True)
class Int8WeightsConfig(QuantizeConfig):
    """Weight-only int8 (symmetric, per output channel), decoded to float32 at load."""

    mode: ClassVar[str] = "int8-weights"
    per_channel: bool = True
    fallback_layers: tuple[str, ...] = ()


# int8's quantization-aware distillation epochs when the float model is a fine-tuning's
# (``build --finetune``): docs/finetuning.md, "int8".
FINETUNED_QUANT_DISTILL = 6


@dataclass(frozen=True)
class Int8Config(QuantizeConfig):
    """int8 weights and activations (int8 x int8 -> int32 convolutions), activation ranges
    from ``calibrator`` on calib/ (never test/)."""

    mode: ClassVar[str] = "int8"
    # "minmax" | "percentile" | "entropy" | "mse": mse by measurement on the calib/ validation
    # split under the bit-exact preprocessing (docs/compression.md, "Choosing the calibrator")
    calibrator: str = "mse"
    percentile: float = 99.99
    per_channel: bool = True
    calib_images: int = 256
    fallback_layers: tuple[str, ...] = ()  # layers kept in fp32 (from the sensitivity scan)
    # Epochs of quantization-aware distillation from the float model on the calibration
    # plates after calibrating (compress/quant_distill.py); 0: post-training only.
    distill_epochs: int = 0

    def __post_init__(self) -> None:
        if self.calibrator not in CALIBRATORS:
            raise LprnetEdgeError(f"calibrator {self.calibrator!r}: use one of "
                                  f"{list(CALIBRATORS)}")
        if self.distill_epochs < 0:
            raise LprnetEdgeError(f"distill_epochs {self.distill_epochs}: must be >= 0 "
                                  "(--quant-distill)")
