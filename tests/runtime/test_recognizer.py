"""The Recognizer API: paths, arrays and lists in, text + confidence out; benchmark figures."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import REPO  # noqa: E402

from lprnet_edge import LprnetEdgeError, PlateResult, Recognizer  # noqa: E402
from lprnet_edge.model.lprnet import OriginalLPRNet  # noqa: E402
from lprnet_edge.model.reference import TorchBackend, reference_recognizer  # noqa: E402
from lprnet_edge.runtime.artifact import Artifact, machine_arch  # noqa: E402
from lprnet_edge.runtime.charset import load_charset  # noqa: E402
from lprnet_edge.runtime.errors import ArtifactError, DataError, WeightsError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_cache")


@pytest.fixture
def tiny_rec(tiny_model) -> Recognizer:
    return Recognizer(TorchBackend(tiny_model), load_charset())


@pytest.fixture(scope="module")
def real_rec(weights_path) -> Recognizer:
    return reference_recognizer(weights_path)


def independent_read(model, path: Path) -> str:
    """Upstream's pipeline, written out: cv2.imread, resize, normalise, argmax, collapse."""
    img = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)
    img = cv2.resize(img, (94, 24)).astype(np.float32)
    x = torch.from_numpy(((img - 127.5) * 0.0078125).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        best = model(x)[0].argmax(dim=0).tolist()
    chars = load_charset().chars
    out, prev = [], None
    for c in best:
        if c != 67 and c != prev:
            out.append(chars[c])
        prev = c
    return "".join(out)


def test_inputs_paths_arrays_and_lists(tiny_rec, test_images):
    p = test_images[0]
    by_path = tiny_rec.recognize(p)
    by_str = tiny_rec.recognize(str(p))
    by_array = tiny_rec.recognize(cv2.imdecode(np.fromfile(str(p), np.uint8), cv2.IMREAD_COLOR))
    assert isinstance(by_path, PlateResult)
    assert by_path.source == str(p) and by_array.source == ""
    assert by_path.text == by_str.text == by_array.text
    assert by_path.confidence == pytest.approx(by_array.confidence)
    assert 0.0 <= by_path.confidence <= 1.0
    many = tiny_rec.recognize(test_images[:4])
    assert isinstance(many, list) and len(many) == 4
    assert many[0] == by_path
    assert tiny_rec.recognize(tuple(test_images[:2])) == many[:2]
    assert tiny_rec.recognize([p]) == [by_path]  # a list in, a list out
    assert tiny_rec.recognize([]) == []
    assert by_path.to_dict() == {"text": by_path.text, "confidence": by_path.confidence,
                                 "source": str(p)}


def test_logits_shape(tiny_rec, test_images):
    assert tiny_rec.logits(test_images[0]).shape == (68, 18)
    assert tiny_rec.backend_name == "torch"


def test_bad_inputs(tiny_rec, tmp_path):
    with pytest.raises(DataError, match="no such image"):
        tiny_rec.recognize(tmp_path / "missing.jpg")
    with pytest.raises(DataError, match="expected an image path"):
        tiny_rec.recognize([42])
    with pytest.raises(DataError, match="HxWx3"):
        tiny_rec.recognize(np.zeros((4, 4, 2), np.uint8))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(LprnetEdgeError, match="not a readable image"):
        tiny_rec.recognize(bad)


@pytest.mark.parametrize("bad", [None, {}, b"\xff\xd8 jpeg bytes", 42, 3.5, {"a": 1}, set()],
                         ids=["None", "dict", "bytes", "int", "float", "dict2", "set"])
def test_not_an_image_is_refused_by_name(tiny_rec, bad):
    """Issue 12 defect 2: None, dict, bytes, ints give a DataError naming what is expected."""
    with pytest.raises(DataError, match="expected an image path, a numpy image or a list"):
        tiny_rec.recognize(bad)


def test_float_images_need_a_declared_range(tiny_rec, test_images):
    img = cv2.imdecode(np.fromfile(str(test_images[0]), np.uint8), cv2.IMREAD_COLOR)
    want = tiny_rec.recognize(img)
    unit = img.astype(np.float32) / 255
    with pytest.raises(DataError, match="value_range=.0, 1."):
        tiny_rec.recognize(unit)  # [0, 1] read as [0, 255] would be a black plate
    assert tiny_rec.recognize(unit, value_range=(0, 1)).text == want.text
    assert tiny_rec.recognize(img.astype(np.float64), value_range=(0, 255)) == want
    assert tiny_rec.recognize(img.astype(np.uint16) * 257) == want
    assert tiny_rec.recognize(cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)) == want
    assert tiny_rec.recognize([img, unit * 255], value_range=(0, 255))[1] == want
    nan = np.full_like(unit, np.nan)
    with pytest.raises(DataError, match="NaN"):
        tiny_rec.recognize(nan, value_range=(0, 1))
    with pytest.raises(DataError, match="dtype int32"):
        tiny_rec.recognize(img.astype(np.int32))
    with pytest.raises(DataError, match="empty array"):
        tiny_rec.recognize(np.zeros((0, 94, 3), np.uint8))


def test_pretrained_reads_match_an_independent_pipeline(real_rec, weights_path, test_images):
    orig = OriginalLPRNet().eval()
    orig.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    results = real_rec.recognize(test_images)
    for p, r in zip(test_images, results, strict=True):
        assert r.text == independent_read(orig, p), p.name
    # A sanity floor, far below the reference accuracy: the weights are really in use.
    right = sum(r.text == p.stem for p, r in zip(test_images, results, strict=True))
    assert right >= len(test_images) // 2
    assert all(r.confidence > 0 for r in results)


def test_from_weights_finds_the_data_dir(data_dir, monkeypatch, test_images, real_rec):
    monkeypatch.setenv("LPRNET_EDGE_DATA", str(data_dir))
    rec = reference_recognizer()
    assert rec.recognize(test_images[0]) == real_rec.recognize(test_images[0])


def test_from_weights_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LPRNET_EDGE_DATA", raising=False)
    with pytest.raises(WeightsError, match="weights download"):
        reference_recognizer()
    with pytest.raises(LprnetEdgeError, match="unknown charset"):
        reference_recognizer(tmp_path / "x.pth", charset="klingon")


def test_benchmark(tiny_rec, test_images):
    stats = tiny_rec.benchmark(test_images[0], runs=12, warmup=2)
    assert stats["runs"] == 12 and stats["warmup"] == 2
    assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    assert stats["throughput_fps"] == pytest.approx(1000 / stats["mean_ms"])
    assert stats["backend"] == "torch" and stats["include_preprocess"] is True
    model_only = tiny_rec.benchmark(runs=5, warmup=0, include_preprocess=False)
    assert model_only["runs"] == 5 and model_only["include_preprocess"] is False
    json.dumps(stats)
    with pytest.raises(DataError):
        tiny_rec.benchmark(runs=0)


# ---------------------------------------------------------------- a real TVM artifact


@pytest.fixture
def tvm_rec(tiny_tvm_artifact: Path) -> Recognizer:
    return Recognizer.from_artifact(tiny_tvm_artifact)


@pytest.mark.slow
def test_from_artifact(tiny_tvm_artifact, tvm_rec, tiny_rec, test_images):
    """The compiled tiny model reads like the same model in PyTorch."""
    rec = tvm_rec
    assert rec.path == tiny_tvm_artifact and rec.backend_name == "tvm"
    assert rec.artifact.manifest.backend == "tvm"
    assert rec.manifest.target.arch == machine_arch()
    assert rec.recognize(test_images[:3]) == [
        PlateResult(r.text, pytest.approx(r.confidence, abs=1e-4), r.source)
        for r in tiny_rec.recognize(test_images[:3])]
    np.testing.assert_allclose(rec.logits(test_images[0]), tiny_rec.logits(test_images[0]),
                               atol=1e-3, rtol=1e-3)
    # An opened Artifact is accepted as is.
    again = Recognizer.from_artifact(Artifact.open(tiny_tvm_artifact))
    assert again.recognize(test_images[0]) == rec.recognize(test_images[0])


@pytest.mark.slow
def test_from_artifact_refuses_a_damaged_one(tiny_tvm_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_tvm_artifact, art)
    with open(art / "model.so", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        Recognizer.from_artifact(art)
    with pytest.raises(ArtifactError, match="not an artifact"):
        Recognizer.from_artifact(tmp_path / "absent")


@pytest.mark.slow
def test_recognize_batch_equals_one_by_one(tvm_rec, test_images):
    paths = test_images[:6]
    arrays = [cv2.imdecode(np.fromfile(str(p), np.uint8), cv2.IMREAD_COLOR) for p in paths]
    one_by_one = [tvm_rec.recognize(p) for p in paths]
    assert tvm_rec.recognize_batch(paths) == one_by_one
    assert [r.text for r in tvm_rec.recognize_batch(arrays)] == [r.text for r in one_by_one]
    assert tvm_rec.recognize(paths) == one_by_one
    assert tvm_rec.recognize_batch([]) == []
    # A bad image anywhere refuses the batch before any inference.
    with pytest.raises(DataError, match="numpy image"):
        tvm_rec.recognize_batch([paths[0], None])


@pytest.mark.slow
def test_one_recognizer_shared_by_threads(tvm_rec, test_images):
    """Issue 12 defect 1: 4 threads x 20 calls on one Recognizer (a segfault with one shared
    VM) give exactly the sequential results."""
    images = [cv2.imdecode(np.fromfile(str(p), np.uint8), cv2.IMREAD_COLOR)
              for p in test_images[:4]]
    calls = 20
    want = [tvm_rec.recognize(im) for im in images]
    errors: list[BaseException] = []
    results: dict[int, list[PlateResult]] = {}

    def work(k: int) -> None:
        try:
            results[k] = [tvm_rec.recognize(images[(k + i) % 4]) for i in range(calls)]
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(4):
        assert results[k] == [want[(k + i) % 4] for i in range(calls)]
    # Each thread ran its own VM over the one loaded module and one copy of the weights.
    assert len({id(p) for p in tvm_rec.backend.params}) == len(tvm_rec.backend.params)


def test_example_script(tiny_checkpoint, test_images, tmp_path, capsys):
    import runpy

    example = runpy.run_path(str(REPO / "examples" / "recognize_plates.py"))
    folder = tmp_path / "plates"
    folder.mkdir()
    for p in test_images[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    rc = example["main"]([str(folder), "--weights", str(tiny_checkpoint), "--bench", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rec = reference_recognizer(tiny_checkpoint)
    for p in sorted(folder.iterdir()):
        assert f"{p.name}" in out and rec.recognize(p).text in out
    assert "plates read exactly" in out and "latency p50" in out
    rc = example["main"]([str(tmp_path / "missing.jpg"), "--weights", str(tiny_checkpoint)])
    captured = capsys.readouterr()
    assert rc != 0 and "Error:" in captured.err and "Traceback" not in captured.err
