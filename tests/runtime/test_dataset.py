"""Folders of plate crops named by their text; a suffix after ``-`` or ``_`` is not the label."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_images

from lprnet_edge.runtime.dataset import PlateFolder, label_from_name
from lprnet_edge.runtime.errors import DataError


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("京PL3N67.jpg", "京PL3N67"),
        ("京PL3N67_2.jpg", "京PL3N67"),
        ("京PL3N67-copy.png", "京PL3N67"),
        ("皖AD12345-1_x.jpeg", "皖AD12345"),
        ("皖A12345_a-b.jpg", "皖A12345"),
        ("dir.with.dots/沪C21F13.jpg", "沪C21F13"),
    ],
)
def test_label_from_name(name, label):
    assert label_from_name(Path(name)) == label


def test_reference_test_folder(test_dir, charset):
    folder = PlateFolder(test_dir, charset)
    assert len(folder) == 1000
    assert folder.paths == sorted(folder.paths)
    # Every reference label is in the alphabet and starts with a province.
    for p in folder.paths:
        label = label_from_name(p)
        charset.encode(label)
        assert charset.region_of(label) is not None, p.name


def test_iteration_reads_images_and_labels(test_images, tmp_path, charset):
    root = copy_images(test_images[:3], tmp_path / "plates")
    # The same plate twice, the second with a suffix.
    shutil.copy(test_images[0], root / f"{test_images[0].stem}_dup.jpg")
    samples = list(PlateFolder(root, charset))
    assert len(samples) == 4
    assert {s.label for s in samples} == {p.stem for p in test_images[:3]}
    for s in samples:
        assert s.image.dtype == np.uint8 and s.image.shape == (24, 94, 3)
        assert s.path.parent == root


def test_limit(test_dir, charset):
    folder = PlateFolder(test_dir, charset, limit=5)
    assert len(folder) == 5
    assert [s.path for s in folder] == folder.paths


def bad_folder(test_images, tmp_path) -> Path:
    root = copy_images(test_images[:2], tmp_path / "mixed")
    (root / "README.txt").write_text("not an image")
    (root / "京A12345.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    shutil.copy(test_images[0], root / "京AB#123.jpg")  # '#' is not in the alphabet
    shutil.copy(test_images[0], root / "_2.jpg")  # no plate text at all
    (root / ".hidden.jpg").write_bytes(b"ignored")
    return root


def test_skip_bad_counts_every_bad_file(test_images, tmp_path, charset):
    folder = PlateFolder(bad_folder(test_images, tmp_path), charset, skip_bad=True)
    samples = list(folder)
    assert sorted(s.path.name for s in samples) == sorted(p.name for p in test_images[:2])
    reasons = {Path(path).name: why for path, why in folder.skipped}
    assert set(reasons) == {"README.txt", "京A12345.jpg", "京AB#123.jpg", "_2.jpg"}
    assert "not an image file" in reasons["README.txt"]
    assert "not a readable image" in reasons["京A12345.jpg"]
    assert "not in charset" in reasons["京AB#123.jpg"]
    assert "no plate text" in reasons["_2.jpg"]


def test_strict_mode_names_the_bad_file(test_images, tmp_path, charset):
    root = copy_images(test_images[:2], tmp_path / "a")
    (root / "京A12345.jpg").write_bytes(b"garbage")
    folder = PlateFolder(root, charset)
    with pytest.raises(DataError, match=r"京A12345\.jpg.*--skip-bad"):
        list(folder)
    root2 = copy_images(test_images[:1], tmp_path / "b")
    (root2 / "labels.csv").write_text("x")
    with pytest.raises(DataError, match=r"labels\.csv: not an image file"):
        PlateFolder(root2, charset)


def test_empty_or_missing_folder(tmp_path, charset):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no plate images"):
        PlateFolder(tmp_path / "empty", charset)
    with pytest.raises(DataError, match="not a folder"):
        PlateFolder(tmp_path / "missing", charset)
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no plate images"):
        PlateFolder(only_text, charset, skip_bad=True)
