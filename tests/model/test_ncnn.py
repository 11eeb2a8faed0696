"""The ncnn export: pnnx's graph of the LPRNet without a strided slice loads in ncnn, computes
PyTorch's logits on real plates, and the slice-free pool is the strided one exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lprnet_edge.model.checkpoint import load_model
from lprnet_edge.model.lprnet import ChannelStridedMaxPool
from lprnet_edge.model.ncnn import SliceFreeChannelPool, ncnn_friendly


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_slice_free_pool_equals_the_strided_slice(stride: int):
    pool = ChannelStridedMaxPool(stride, 2)
    x = torch.randn(1, 256, 20, 44)
    assert torch.equal(SliceFreeChannelPool(pool)(x), pool(x))


@pytest.mark.slow
def test_ncnn_graph_loads_and_matches_pytorch_on_plates(weights_path, test_images, tmp_path):
    pytest.importorskip("pnnx")
    pytest.importorskip("ncnn")
    from lprnet_edge.model.ncnn import export_ncnn
    from lprnet_edge.runtime.peers import load_peer
    from lprnet_edge.runtime.preprocess import Preprocess
    from lprnet_edge.runtime.recognizer import _load

    exported = export_ncnn(weights_path, cache=tmp_path)
    again = export_ncnn(weights_path, cache=tmp_path)
    assert not exported.cached and again.cached and again.param == exported.param
    layers = {ln.split()[0] for ln in exported.param.read_text().splitlines()[2:] if ln.strip()}
    assert "Crop" in layers and not any("." in name for name in layers)  # no pnnx-only layer
    peer = load_peer("ncnn", exported.param, threads=1)
    model = load_model(weights_path)
    friendly = ncnn_friendly(load_model(weights_path))
    pre = Preprocess()
    for path in test_images[:3]:
        x = np.ascontiguousarray(pre(_load(path)), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
            assert np.array_equal(friendly(torch.from_numpy(x)).numpy(), ref)
        got = peer(x)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-3 * float(np.abs(ref).max()))
