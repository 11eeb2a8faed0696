"""Calibration data must never come from the test split (enforced by the API)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from lprnet_edge.model.calib import CalibrationSet, TestSplitError, check_not_test
from lprnet_edge.runtime.errors import DataError

PLATES = ["京A12345", "沪B6789C", "粤C1D234", "川A0K123", "苏E88888", "浙F1234G"]


def _write(folder: Path, names: list[str], seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in names:
        img = rng.integers(0, 255, (24, 94, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".jpg", img)
        assert ok
        buf.tofile(str(folder / f"{n}.jpg"))
    return folder


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _write(tmp_path / "test", PLATES[:3], 0)
    _write(tmp_path / "calib", PLATES[3:], 1)
    monkeypatch.setenv("LPRNET_EDGE_DATA", str(tmp_path))
    return tmp_path


def test_loads_calib(data_root: Path):
    cs = CalibrationSet.load(data_root / "calib", keep_raw=True)
    assert cs.x.shape == (3, 3, 24, 94) and cs.x.dtype == np.float32
    assert cs.labels == sorted(PLATES[3:], key=lambda p: f"{p}.jpg")
    assert cs.raw is not None and len(cs.raw) == 3
    default = CalibrationSet.load()  # $LPRNET_EDGE_DATA/calib
    assert default.labels == cs.labels


def test_refuses_test_folder(data_root: Path):
    with pytest.raises(TestSplitError, match="test split"):
        CalibrationSet.load(data_root / "test")


def test_refuses_symlink_and_relative_paths_to_test(data_root: Path, tmp_path: Path):
    link = tmp_path / "innocent"
    os.symlink(data_root / "test", link)
    with pytest.raises(TestSplitError, match="resolves to the test split"):
        CalibrationSet.load(link)
    with pytest.raises(TestSplitError):
        CalibrationSet.load(data_root / "calib" / ".." / "test")


def test_refuses_copies_of_test_images(data_root: Path, tmp_path: Path):
    mixed = _write(tmp_path / "mixed", ["辽A11111"], 5)
    shutil.copy(data_root / "test" / f"{PLATES[0]}.jpg", mixed / "renamed_plate.jpg")
    with pytest.raises(TestSplitError, match="test images"):
        CalibrationSet.load(mixed)


def test_refuses_marker_and_explicit_test_dir(tmp_path: Path):
    other = _write(tmp_path / "eval_split", PLATES[:2], 3)
    (other / ".lprnet-test-split").touch()
    with pytest.raises(TestSplitError, match="marker"):
        check_not_test(other, test_dir=tmp_path / "nowhere")
    ref = _write(tmp_path / "reference", PLATES[:2], 3)  # same bytes as eval_split
    (other / ".lprnet-test-split").unlink()
    with pytest.raises(TestSplitError):
        CalibrationSet.load(other, test_dir=ref)
    # a TestSplitError is a DataError: the CLI prints it as a user error
    assert issubclass(TestSplitError, DataError)


def test_split_is_deterministic_and_disjoint():
    x = np.zeros((20, 3, 24, 94), np.float32)
    cs = CalibrationSet(x, [f"P{i}" for i in range(20)], [f"{i}.jpg" for i in range(20)])
    a1, b1 = cs.split(0.3, seed=7)
    a2, b2 = cs.split(0.3, seed=7)
    assert a1.names == a2.names and b1.names == b2.names
    assert len(b1) == 6 and not set(a1.names) & set(b1.names)
    assert set(a1.names) | set(b1.names) == set(cs.names)
    assert cs.split(0.3, seed=8)[1].names != b1.names


def test_real_test_split_refused(data_dir: Path):
    with pytest.raises(TestSplitError):
        CalibrationSet.load(data_dir / "test", test_dir=data_dir / "test")
