"""Quantization-aware distillation: the int8 model trained to read what its float model reads.

Post-training quantization rounds every activation and weight once, from calibrated ranges;
on a few hundred validation plates the readings it changes go either way, a few plates at a
time. Training the fake-quantized convolutions' float weights through the rounding
(straight-through gradients, :meth:`QuantConv2d._trainable`) against the float model's
outputs on the calibration plates moves the int8 model back towards the float one's
readings, with no labels: what is asked of int8 is fidelity to the model it quantizes.

The activation scales stay the calibrated ones (the rounding the model trains under is the
one it is compiled with); each weight scale follows its weights and is fixed at the end.
The float layers (the head kept in float32) do not train. The learning rate is small: this
checkpoint has many weights near 1e-5, which an adaptive optimizer moves by about the
learning rate whatever their gradient.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lprnet_edge.compress.distill import DistillConfig, distill
from lprnet_edge.compress.quantize import QuantConv2d
from lprnet_edge.model.calib import CalibrationSet
from lprnet_edge.runtime.errors import LprnetEdgeError

LR = 3e-5


def distill_quantized(float_model: nn.Module, quantized: nn.Module, train: Any, epochs: int,
                      seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``quantized`` distilled from ``float_model`` for ``epochs`` epochs on the
    plates of ``train``; returns it and the distillation's history."""
    if not isinstance(train, CalibrationSet):
        raise LprnetEdgeError("quantization-aware distillation needs calibration plates "
                              "(a folder of labelled crops), not bare arrays")
    quants = [m for m in quantized.modules() if isinstance(m, QuantConv2d)]
    trained = {id(p) for m in quants for p in m.conv.parameters()}  # not the float head
    for p in quantized.parameters():
        p.requires_grad_(id(p) in trained)
    cfg = DistillConfig(epochs=epochs, lr=LR, ctc_weight=0.0, kd_weight=1.0, seed=seed)
    _straight_through(quantized, True)  # the copy distill() trains inherits it
    try:
        student, history = distill(float_model.eval(), quantized, train, cfg, progress="bar")
    finally:
        _straight_through(quantized, False)
    _straight_through(student, False)
    for m in student.modules():
        if isinstance(m, QuantConv2d):
            m.refresh_weight_scale()
    for p in student.parameters():
        p.requires_grad_(False)
    return student, history


def _straight_through(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            m.ste = on
