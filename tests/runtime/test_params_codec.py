"""``params.npz`` encodings: the ``raw`` one keeps the compiler's precomputed int8 / int32
weights in their own type, and refuses types no compiled module takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lprnet_edge.runtime.errors import ArtifactError
from lprnet_edge.runtime.params_codec import load_params, save_params


def test_raw_weights_keep_their_type(tmp_path: Path):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.integers(-127, 128, (4, 3, 3, 1, 16, 4)).astype(np.int8),
              "offset": rng.integers(-2**30, 2**30, (64,)).astype(np.int32),
              "bias": rng.standard_normal(64).astype(np.float32)}
    path = tmp_path / "params.npz"
    save_params(path, arrays, {"w": "raw", "offset": "raw", "bias": "dense"})
    back = load_params(path)
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype
        np.testing.assert_array_equal(back[name], a)


def test_raw_refuses_a_type_no_module_takes(tmp_path: Path):
    with pytest.raises(ArtifactError, match="raw weights must be one of"):
        save_params(tmp_path / "p.npz", {"w": np.zeros(3, np.complex64)}, "raw")
