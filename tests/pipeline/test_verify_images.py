"""The raw-image check (check_images.npz): written from calib/ plates by the pipeline, repeated
from the bytes by the runtime, and refused at the first stage that differs (host side; the run on
the emulated Pi is in tests/device/test_device_e2e.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lprnet_edge.device.agreement import compare_reads, require_images_agree
from lprnet_edge.pipeline.verify_images import CHECK_IMAGES, store_image_check
from lprnet_edge.runtime.errors import ArtifactError
from lprnet_edge.runtime.imagecheck import CHECK_FILE, check_images, read_image_check
from lprnet_edge.runtime.preprocess import PREPROCESS_VERSION, decode_image

TOL = 1e-3


@pytest.fixture(scope="module")
def reference(weights_path):
    pytest.importorskip("torch")
    from lprnet_edge.model.reference import reference_recognizer

    return reference_recognizer(weights_path)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, reference, data_dir):
    root = tmp_path_factory.mktemp("art")
    res = store_image_check(root, reference.backend, reference.charset)
    return res, read_image_check(root / CHECK_FILE)


def run(check, rec):
    return check_images(check, rec.backend, TOL, rec.charset.chars, rec.charset.blank)


def test_stored_from_resized_calib_plates_and_repeated(stored, reference, data_dir):
    res, check = stored
    assert res.status == "stored" and res.files == (CHECK_FILE,)
    assert res.to_dict()["preprocess_version"] == PREPROCESS_VERSION
    assert len(check.names) == CHECK_IMAGES and check.names == res.images
    for name, data in zip(check.names, check.images, strict=True):
        assert (data_dir / "calib" / name).read_bytes() == data
    # Every one needs resizing, the step whose rounding can differ between CPUs.
    assert all(decode_image(d).shape[:2] != (24, 94) for d in check.images)
    got = run(check, reference)
    assert got.status == "passed" and got.stage is None and got.images == CHECK_IMAGES
    assert got.tensors_differ == got.texts_differ == 0 and got.max_abs_logit_diff == 0.0
    require_images_agree(got.to_dict(), "here", None)  # passes: no exception


def crafted(check, i, **change):
    """The stored set with image ``i``'s host record changed (tensor, logits or text)."""
    arrays = {"tensors": check.tensors.copy(), "logits": check.logits.copy(),
              "texts": list(check.texts)}
    for key, fn in change.items():
        arrays[key][i] = fn(arrays[key][i])
    return dataclasses.replace(check, tensors=arrays["tensors"], logits=arrays["logits"],
                               texts=tuple(arrays["texts"]))


def one_pixel_up(x):
    """The host tensor of an image one grey level brighter at one pixel."""
    x = x.copy()
    x[0, 5, 7] += np.float32(0.0078125)
    return x


@pytest.mark.parametrize(("change", "stage"), [
    ({"tensors": one_pixel_up}, "preprocess"),
    ({"logits": lambda y: y + np.float32(0.01)}, "model"),
    ({"texts": lambda t: t[:-1] + ("0" if t[-1] != "0" else "1")}, "decode"),
])
def test_first_differing_stage_is_named(stored, reference, change, stage):
    _, check = stored
    got = run(crafted(check, 2, **change), reference)
    assert got.status == "failed" and got.stage == stage
    assert got.first["name"] == check.names[2]
    if stage == "preprocess":
        assert got.tensors_differ == 1 and got.first["values_differ"] == 1
    with pytest.raises(ArtifactError, match=rf"failed at stage '{stage}'.*Nothing was deployed"):
        require_images_agree(got.to_dict(), "pi@board", None)


def test_other_preprocess_version_refused(stored, reference):
    _, check = stored
    with pytest.raises(ArtifactError, match="preprocess version 1, this runtime uses 2; "
                                            "rebuild"):
        run(dataclasses.replace(check, preprocess_version=1), reference)


def test_compare_reads_counts_differences():
    a = compare_reads({"a.jpg": "京A1", "b.jpg": "京B2", "c.jpg": "京C3"},
                      {"a.jpg": "京A1", "b.jpg": "京B8", "d.jpg": "京D4"}, "torch")
    d = a.to_dict()
    assert d["images"] == 4 and d["differ"] == 3
    assert [r["name"] for r in d["reads"] if not r["same"]] == ["b.jpg", "c.jpg", "d.jpg"]
