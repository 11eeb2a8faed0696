"""Storage encodings of the compiled parameters, from the compression result's own choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lprnet_edge.pipeline.steps import choose_encodings, map_names
from lprnet_edge.pipeline.values import TorchModel
from lprnet_edge.runtime.charset import load_charset
from lprnet_edge.runtime.params_codec import decode, encode


def test_encodings_map_state_dict_names_to_compiled_names():
    enc = {"backbone.0.weight": "sparse", "backbone.4.block.0.weight": "int8"}
    names = ["p_backbone_0_weight", "p_backbone_0_bias", "p_backbone_4_block_0_weight"]
    assert map_names(enc, names) == {"p_backbone_0_weight": "sparse",
                                     "p_backbone_0_bias": "dense",
                                     "p_backbone_4_block_0_weight": "int8"}
    onnx_names = ["backbone.0.weight", "container.0.bias"]
    assert map_names(enc, onnx_names) == {"backbone.0.weight": "sparse",
                                          "container.0.bias": "dense"}


def test_dense_encodings_without_compression(tmp_path: Path):
    tm = TorchModel(model=None, reference=None, original=None, weights=tmp_path,
                    weights_sha256="0" * 64, charset=load_charset())
    params = {"a": np.zeros((3, 3, 4, 8), np.float32), "b": np.zeros(8, np.float32)}
    assert choose_encodings(tm, params) == {"a": "dense", "b": "dense"}


def test_int8_weights_are_scaled_per_output_channel_in_hwio(tmp_path: Path):
    """NHWC builds store HWIO weights: int8 scales go along the last axis (the output
    channels), so the per-output-channel int8 values of the compressed model stay exact."""
    tm = TorchModel(model=None, reference=None, original=None, weights=tmp_path,
                    weights_sha256="0" * 64, charset=load_charset(),
                    param_encodings={"backbone.0.weight": "int8", "backbone.0.bias": "dense"})
    params = {"p_backbone_0_weight": np.zeros((3, 3, 3, 8), np.float32),
              "p_backbone_0_bias": np.zeros(8, np.float32)}
    assert choose_encodings(tm, params, "NHWC") == {"p_backbone_0_weight": "int8-last",
                                                    "p_backbone_0_bias": "dense"}
    assert choose_encodings(tm, params, "NCHW")["p_backbone_0_weight"] == "int8"
    rng = np.random.default_rng(0)
    oihw = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    exact = decode(encode("w", oihw, "int8"), "w", "int8")  # what the model computes with
    hwio = exact.transpose(2, 3, 1, 0)
    back = decode(encode("w", hwio, "int8-last"), "w", "int8-last")
    np.testing.assert_allclose(back, hwio, rtol=1e-6, atol=0)
