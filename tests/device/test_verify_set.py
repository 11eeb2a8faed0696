"""verify.npz, the on-board comparison with PyTorch: its format and verdicts (fast, numpy only;
the run on a device is in test_deploy.py and test_device_e2e.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lprnet_edge.runtime.errors import ArtifactError
from lprnet_edge.runtime.selfcheck import (
    VERIFY_FILE,
    compare,
    read_verify_set,
    tolerance_of,
    write_verify_set,
)


def sample(n: int = 3):
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-1, 1, (1, 3, 24, 94)).astype(np.float32) for _ in range(n)]
    ys = [rng.normal(size=(1, 68, 18)).astype(np.float32) for _ in range(n)]
    return xs, ys


def test_round_trip(tmp_path):
    xs, ys = sample()
    assert write_verify_set(tmp_path, xs, ys, 1e-3) == VERIFY_FILE
    vs = read_verify_set(tmp_path / VERIFY_FILE)
    assert vs["inputs"].shape == (3, 3, 24, 94) and vs["logits"].shape == (3, 68, 18)
    assert np.array_equal(vs["inputs"][1], xs[1][0]) and vs["tolerance"] == 1e-3
    # The manifest's tolerance wins over the stored one.
    assert tolerance_of({"tolerance": 0.5}, vs["tolerance"]) == 0.5
    assert tolerance_of({"status": "skipped"}, vs["tolerance"]) == 1e-3
    with pytest.raises(ArtifactError, match="no valid tolerance"):
        tolerance_of(None, None)


def test_verdicts():
    _, ys = sample()
    ref = np.concatenate(ys)
    chars = [str(i) for i in range(67)] + ["-"]
    ok = compare([y + 1e-4 for y in ys], ref, 1e-3, chars, 67)
    assert ok["status"] == "passed" and ok["max_abs_logit_diff"] == pytest.approx(1e-4, rel=0.1)
    assert ok["plate_agreement"] == 1.0
    bad = compare([ys[0], ys[1] + 0.2, ys[2]], ref, 1e-3, chars, 67)
    assert bad["status"] == "failed" and bad["worst_input"] == 1
    nan = compare([ys[0] * np.nan, ys[1], ys[2]], ref, 1e-3)
    assert nan["status"] == "failed" and nan["max_abs_logit_diff"] is None


def test_refuses_bad_sets(tmp_path):
    xs, ys = sample()
    with pytest.raises(ArtifactError, match="3 inputs but 2 logits"):
        write_verify_set(tmp_path, xs, ys[:2])
    with pytest.raises(ArtifactError, match="finite"):
        write_verify_set(tmp_path, xs, [y * np.nan for y in ys])
    (tmp_path / VERIFY_FILE).write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="not a readable verify set"):
        read_verify_set(tmp_path / VERIFY_FILE)
    np.savez(tmp_path / "other.npz", inputs=np.zeros((1, 3, 24, 94)))
    with pytest.raises(ArtifactError, match="format None"):
        read_verify_set(tmp_path / "other.npz")
