"""Image reading and LPRNet preprocessing (BGR, 94x24, (x - 127.5) * 0.0078125, NCHW)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lprnet_edge.runtime.errors import DataError, LprnetEdgeError
from lprnet_edge.runtime.preprocess import Preprocess, check_image, read_image


def reference(image: np.ndarray) -> np.ndarray:
    """sirius-ai LPRNet_Pytorch's transform (load_data.py), transcribed."""
    h, w, _ = image.shape
    if h != 24 or w != 94:
        image = cv2.resize(image, (94, 24))
    x = image.astype("float32")
    x -= 127.5
    x *= 0.0078125
    return np.transpose(x, (2, 0, 1))[None]


def random_image(h: int = 24, w: int = 94, c: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w, c) if c else (h, w)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_plate_sized_image():
    img = random_image()
    x = Preprocess()(img)
    assert x.shape == (1, 3, 24, 94) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, reference(img))
    assert x.min() >= -1.0 and x.max() <= 1.0
    # Channel order is kept (BGR in, BGR planes out): no colour conversion.
    np.testing.assert_array_equal(x[0, 0], (img[:, :, 0].astype(np.float32) - 127.5) / 128)


def test_resizes_other_sizes():
    img = random_image(36, 136, seed=1)  # the calib/ crop size
    x = Preprocess()(img)
    assert x.shape == (1, 3, 24, 94)
    np.testing.assert_array_equal(x, reference(img))


def test_real_files_match_the_reference(test_images, data_dir):
    pre = Preprocess()
    calib = sorted((data_dir / "calib").iterdir())[:3]
    for p in test_images[:3] + calib:
        img = read_image(p)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        np.testing.assert_array_equal(pre(img), reference(img))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), "grey"),
        (lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2GRAY)[:, :, None], "grey"),
        (lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2BGRA), "bgr"),
        (lambda im: im.astype(np.float64), "bgr"),
        (lambda im: im.astype(np.int64), "bgr"),
        (lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2GRAY).astype(np.float32), "grey"),
    ],
)
def test_accepted_variants(make, expected):
    img = random_image(seed=2)
    grey = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    want = reference(grey if expected == "grey" else img)
    np.testing.assert_array_equal(Preprocess()(make(img)), want)


def test_out_of_range_values_are_clipped():
    img = np.full((24, 94, 3), 300.0)
    img[0, 0] = -20
    out = check_image(img)
    assert out.dtype == np.uint8 and out.max() == 255 and out[0, 0, 0] == 0


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [[1, 2, 3]],
        np.zeros(10, np.uint8),
        np.zeros((1, 24, 94, 3), np.uint8),
        np.zeros((24, 94, 2), np.uint8),
        np.zeros((0, 94, 3), np.uint8),
        np.zeros((0, 0), np.uint8),
        np.zeros((24, 94, 3), dtype=bool),
        np.full((24, 94, 3), "a"),
    ],
)
def test_rejected_inputs(bad):
    with pytest.raises(DataError) as e:
        Preprocess()(bad)
    assert isinstance(e.value, LprnetEdgeError)


def test_custom_geometry_and_dict_round_trip():
    pre = Preprocess(width=48, height=16, mean=0.0, scale=1.0)
    x = pre(random_image())
    assert x.shape == (1, 3, 16, 48)
    assert x.max() > 1.0  # mean 0 scale 1: raw pixel values
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert Preprocess.from_dict({"width": 94, "unknown": 1}) == Preprocess()


def test_read_image_unicode_name_and_png(tmp_path):
    img = random_image(seed=3)
    p = tmp_path / "京PL3N67_2.png"
    ok, buf = cv2.imencode(".png", img)
    assert ok
    buf.tofile(str(p))
    np.testing.assert_array_equal(read_image(p), img)
    np.testing.assert_array_equal(read_image(str(p)), img)


def test_read_image_errors(tmp_path):
    with pytest.raises(DataError, match="no such image file"):
        read_image(tmp_path / "missing.jpg")
    with pytest.raises(DataError, match="no such image file"):
        read_image(tmp_path)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="not a readable image"):
        read_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a jpeg")
    with pytest.raises(DataError, match="not a readable image"):
        read_image(text)
