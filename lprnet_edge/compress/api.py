"""``compress(model, config, calib)``: one entry point, one handler per config class.

As in torchao's ``quant_api`` (``register_quantize_module_handler``), a technique is a config
class (:mod:`lprnet_edge.compress.configs`) plus a handler registered for it::

    @register_handler(ChannelPruneConfig)
    def _channels(model, cfg, calib) -> PrunedModel: ...

so adding one touches no ``if mode == ...`` chain. Handlers return typed results: what the
build pipeline and the compiler read are fields, not attributes patched onto a module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lprnet_edge.compress.configs import CompressConfig, PruneConfig, QuantizeConfig
from lprnet_edge.runtime.errors import LprnetEdgeError


@dataclass
class CompressedModel:
    """A compressed model and what the pipeline needs to build and check it.

    ``module`` is the PyTorch model the artifact computes (BatchNorm folded where the
    technique folds it), the reference verification compares the compiled model against.
    ``param_encodings`` maps its state-dict names to :mod:`params_codec` encodings.
    """

    module: nn.Module
    config: CompressConfig
    report: dict[str, Any] = field(default_factory=dict)
    param_encodings: dict[str, str] = field(default_factory=dict)


@dataclass
class PrunedModel(CompressedModel):
    """The result of a :class:`PruneConfig` technique: a plain float ``module``."""

    config: PruneConfig


@dataclass
class QuantizedModel(CompressedModel):
    """The result of a :class:`QuantizeConfig` technique.

    ``module``: a float model with exactly the weights the artifact decodes (``fp16``,
    ``int8-weights``), or the fake-quant simulation (``int8``) whose ``QuantConv2d`` layers
    compute what int8 x int8 -> int32 convolutions do. ``int8_convs``: the names of those
    layers, which the compiler emits as real int8 convolutions
    (:func:`lprnet_edge.compiler.frontend.to_relax`); empty: the graph is compiled as float.
    ``verify_tolerance``: the max |logit diff| vs ``module`` verification allows (None: the
    build's own).
    """

    config: QuantizeConfig
    int8_convs: tuple[str, ...] = ()
    act_scales: dict[str, float] = field(default_factory=dict)
    verify_tolerance: float | None = None


Handler = Callable[..., CompressedModel]
_HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type[CompressConfig]) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(model, config, calib, **options) -> CompressedModel`` is what
    :func:`compress` runs for configs of ``config_type`` (subclasses included)."""
    def deco(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn
    return deco


def _builtin_handlers() -> None:
    # The techniques of this package register themselves when their module is imported.
    from lprnet_edge.compress import prune, quantize  # noqa: F401


def handler_for(config: CompressConfig) -> Handler:
    _builtin_handlers()
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise LprnetEdgeError(f"no compression handler for {type(config).__name__}: register one "
                          "with lprnet_edge.compress.api.register_handler")


def compress(model: nn.Module, config: CompressConfig, calib: Any = None, **options: Any
             ) -> CompressedModel:
    """Apply ``config`` to a copy of ``model`` (``calib``: a :class:`CalibrationSet` of
    calib/, for the techniques that look at images). ``options`` go to the handler."""
    return handler_for(config)(model, config, calib, **options)
