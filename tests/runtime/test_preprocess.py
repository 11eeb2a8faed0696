"""Image reading and LPRNet preprocessing (BGR, 94x24, (x - 127.5) * 0.0078125, NCHW)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lprnet_edge.runtime.errors import DataError, LprnetEdgeError
from lprnet_edge.runtime.preprocess import PREPROCESS_VERSION, Preprocess, read_image


def reference(image: np.ndarray) -> np.ndarray:
    """sirius-ai LPRNet_Pytorch's transform (load_data.py), transcribed, with OpenCV's bit-exact
    linear resize in place of its default one (which rounds differently on x86 and aarch64)."""
    h, w, _ = image.shape
    if h != 24 or w != 94:
        image = cv2.resize(image, (94, 24), interpolation=cv2.INTER_LINEAR_EXACT)
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
    ("make", "expected", "value_range"),
    [
        (lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), "grey", None),
        (lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2GRAY)[:, :, None], "grey", None),
        (lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2BGRA), "bgr", None),
        (lambda im: im.astype(np.uint16) * 257, "bgr", None),  # 16-bit: 65535 is white
        (lambda im: im.astype(np.float64), "bgr", (0, 255)),
        (lambda im: im.astype(np.float32) / 255, "bgr", (0, 1)),
        (lambda im: im.astype(np.float64) / 255, "bgr", (0.0, 1.0)),
        (lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2GRAY).astype(np.float32), "grey", (0, 255)),
        (lambda im: im, "bgr", (0, 255)),  # uint8 declared as what it is
    ],
)
def test_accepted_variants(make, expected, value_range):
    img = random_image(seed=2)
    grey = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    want = reference(grey if expected == "grey" else img)
    np.testing.assert_array_equal(Preprocess()(make(img), value_range), want)


def test_batch_is_the_single_image_path_stacked():
    imgs = [random_image(seed=s) for s in range(3)] + [random_image(36, 136, seed=9)]
    x = Preprocess().batch(imgs)
    assert x.shape == (4, 3, 24, 94) and x.dtype == np.float32 and x.flags.c_contiguous
    for i, im in enumerate(imgs):
        np.testing.assert_array_equal(x[i:i + 1], reference(im))
    assert Preprocess().batch([]).shape == (0, 3, 24, 94)


@pytest.mark.parametrize(
    ("image", "value_range", "match"),
    [
        (np.full((24, 94, 3), 0.5), None, "value range declared"),  # [0,1] mistaken for 255
        (np.full((24, 94, 3), 0.5, np.float32), None, "value range declared"),
        (np.full((24, 94, 3), np.nan, np.float32), (0, 1), "NaN or infinite"),
        (np.full((24, 94, 3), np.inf), (0, 255), "NaN or infinite"),
        (np.full((24, 94, 3), 300.0), (0, 255), "outside the declared"),
        (np.full((24, 94, 3), 2.0), (0, 1), "outside the declared"),
        (np.full((24, 94, 3), 0.5), (0, 2), "must be .0, 1. or .0, 255."),
        (np.full((24, 94, 3), 0.5), "0-1", "must be .0, 1. or .0, 255."),
        (np.zeros((24, 94, 3), np.uint8), (0, 1), "applies to float images"),
        (np.zeros((24, 94, 3), np.uint16), (0, 255), "applies to float images"),
        (np.zeros((24, 94, 3), np.int64), None, "dtype int64"),
        (np.zeros((24, 94, 3), np.int8), None, "dtype int8"),
        (np.zeros((24, 94, 3), np.float16), (0, 1), "dtype float16"),
        (np.zeros((24, 94, 3), np.complex64), None, "dtype complex64"),
    ],
)
def test_float_and_odd_dtypes_need_a_declared_range(image, value_range, match):
    with pytest.raises(DataError, match=match) as e:
        Preprocess()(image, value_range)
    assert "uint8" in str(e.value) or "value_range" in str(e.value) or "NaN" in str(e.value)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {},
        b"\xff\xd8\xff",
        42,
        [[1, 2, 3]],
        np.zeros(10, np.uint8),
        np.zeros((1, 24, 94, 3), np.uint8),
        np.zeros((24, 94, 2), np.uint8),
        np.zeros((0, 94, 3), np.uint8),
        np.zeros((0, 0), np.uint8),
        np.zeros((24, 94, 3), dtype=bool),
        np.full((24, 94, 3), "a"),
        np.zeros((24, 94, 3), dtype=object),
    ],
)
def test_rejected_inputs(bad):
    with pytest.raises(DataError, match="expected a uint8 BGR image") as e:
        Preprocess()(bad)
    assert isinstance(e.value, LprnetEdgeError)


def test_custom_geometry_and_dict_round_trip():
    pre = Preprocess(width=48, height=16, mean=0.0, scale=1.0)
    x = pre(random_image())
    assert x.shape == (1, 3, 16, 48)
    assert x.max() > 1.0  # mean 0 scale 1: raw pixel values
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert Preprocess.from_dict({"width": 94, "unknown": 1}) == Preprocess()


def test_normalisation_table_is_the_float_formula():
    """The uint8 -> float32 table gives what float32 arithmetic gives for the LPRNet constants
    (both exact: 127.5 and 2**-7 are representable), and a correctly rounded value otherwise."""
    v = np.arange(256, dtype=np.uint8)
    got = Preprocess().table()[v]
    np.testing.assert_array_equal(got, (v.astype(np.float32) - np.float32(127.5))
                                  * np.float32(0.0078125))
    odd = Preprocess(mean=100.3, scale=0.017)
    want = np.array([np.float32((i - 100.3) * 0.017) for i in range(256)], dtype=np.float32)
    np.testing.assert_array_equal(odd.table(), want)
    assert Preprocess().to_dict()["version"] == PREPROCESS_VERSION


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
