"""The compiled module through the one accuracy check: its readings of the validation split
against the original PyTorch model's."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import copy_images

pytestmark = pytest.mark.slow


def test_compiled_accuracy_on_the_validation_split(tiny_tvm_artifact: Path, data_dir: Path,
                                                   tmp_path: Path):
    from lprnet_edge.compress.accuracy import VALIDATION, Budget, readings
    from lprnet_edge.model.calib import CalibrationSet
    from lprnet_edge.pipeline.steps import load_torch
    from lprnet_edge.pipeline.verify import compiled_accuracy
    from lprnet_edge.runtime.artifact import Artifact
    from lprnet_edge.runtime.backends import TvmBackend

    calib = copy_images(sorted((data_dir / "calib").glob("*.jpg"))[:40], tmp_path / "calib")
    tm = load_torch(tiny_tvm_artifact.parent / "tiny.pth")
    backend = TvmBackend(Artifact.open(tiny_tvm_artifact))
    check = compiled_accuracy(backend, tm, calib, Budget.of(1.0))
    _, val = VALIDATION.of(CalibrationSet.load(calib))
    assert check.images == len(val) == 12 and check.measured_with == "tvm"
    ref = readings(tm.original, val)
    assert check.original_ok == sum(r == t for r, t in zip(ref, val.labels, strict=True))
    # The module computes the model it was built from: its readings agree with PyTorch's.
    assert check.agreement >= 0.9 and check.to_dict()["measured_with"] == "tvm"
