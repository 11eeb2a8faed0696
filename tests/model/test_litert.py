"""The LiteRT export: litert-torch's flatbuffer of the fp32 LPRNet runs in LiteRT (XNNPACK)
and computes PyTorch's logits on real plates. Skipped where the converter is not installed
(``lprnet_edge.model.litert.install_converter``: ~800 MB, kept out of the host extras)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lprnet_edge.model.checkpoint import load_model


@pytest.mark.slow
def test_litert_model_matches_pytorch_on_plates(weights_path, test_images, tmp_path):
    from lprnet_edge.model.litert import export_litert
    from lprnet_edge.runtime.errors import ToolchainError
    from lprnet_edge.runtime.peers import load_peer
    from lprnet_edge.runtime.preprocess import Preprocess
    from lprnet_edge.runtime.recognizer import _load

    try:
        exported = export_litert(weights_path, cache=tmp_path)
    except ToolchainError as e:
        pytest.skip(str(e))
    assert export_litert(weights_path, cache=tmp_path).cached
    peer = load_peer("litert", exported.path, threads=1)
    model = load_model(weights_path)
    pre = Preprocess()
    for path in test_images[:3]:
        x = np.ascontiguousarray(pre(_load(path)), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = peer(x)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-3 * float(np.abs(ref).max()))
