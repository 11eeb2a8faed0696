"""A real host artifact (pretrained weights): manifest, integrity checks, accuracy on test/.

One build per session (module fixture); the integrity tests work on copies of it.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tvm")

from lprnet_edge.model.reference import reference_recognizer  # noqa: E402
from lprnet_edge.runtime.artifact import (  # noqa: E402
    MANIFEST,
    SCHEMA_VERSION,
    Artifact,
    bundle,
    load_manifest,
    machine_arch,
    unbundle,
)
from lprnet_edge.runtime.errors import ArtifactError  # noqa: E402
from lprnet_edge.runtime.recognizer import Recognizer  # noqa: E402

VERIFY_IMAGES = 100  # of calib/; the CLI default is all 735


@pytest.fixture(scope="module")
def host_artifact(tmp_path_factory, data_dir: Path, weights_path: Path) -> Path:
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.pipeline.build import BuildOptions, build_artifact

    out = tmp_path_factory.mktemp("artifacts") / "lprnet-host"
    logs: list[str] = []
    res = build_artifact(BuildOptions(target=load_target("host"), out=out, weights=weights_path,
                                      calib_dir=data_dir / "calib",
                                      verify_images=VERIFY_IMAGES), log=logs.append)
    assert res.path == out
    assert any(line.startswith("[1/5] load") for line in logs), logs
    assert any("[5/5] package" in line for line in logs), logs
    return out


@pytest.fixture
def copy_of(host_artifact: Path, tmp_path: Path):
    def make() -> Path:
        dst = tmp_path / "copy" / host_artifact.name
        shutil.copytree(host_artifact, dst)
        return dst

    return make


@pytest.mark.slow
def test_manifest_contents(host_artifact: Path, weights_path: Path):
    m = load_manifest(host_artifact).to_dict()
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["name"] == "lprnet-host" and m["backend"] == "tvm"
    assert m["model_file"] == "model.so"
    t = m["target"]
    assert t["name"] == "host" and t["arch"] == machine_arch()
    assert t["tvm"]["kind"] == "llvm" and t["tvm"]["mcpu"] not in ("native", "generic")
    assert Path(t["toolchain"]["compiler"]).name in ("g++", "c++", "clang++", "cc")
    assert m["input"] == {"name": "x", "shape": [1, 3, 24, 94], "layout": "NCHW",
                          "dtype": "float32", "color": "BGR"}
    assert m["preprocess"]["width"] == 94 and m["preprocess"]["color"] == "BGR"
    assert len(m["charset"]["chars"]) == 68
    assert m["source"]["weights"] == weights_path.name
    assert len(m["source"]["weights_sha256"]) == 64
    assert m["stages"]["prune"] is None and m["stages"]["quantize"] is None
    assert m["stages"]["tune"] is None
    assert m["stages"]["compile"]["frontend"] == "torch.export"
    for k in ("lprnet_edge", "tvm", "torch", "python"):
        assert m["versions"][k]
    assert dt.datetime.fromisoformat(m["created"]).tzinfo is not None
    # verify.npz: calib/ inputs + PyTorch logits for the check on the device at deploy;
    # check_images.npz: plate image bytes for the on-device check from bytes to text.
    assert set(m["files"]) == {"model.so", "params.npz", "verify.npz", "check_images.npz"}
    rt = m["runtime"]
    assert rt["entry"] == "main" and rt["params"] == "params.npz"
    # Constant channels folded (model.channel_fold): 15 backbone convolutions and the head
    # split in 4 parts, weight and bias each, plus the head's bias.
    assert len(rt["param_order"]) == 2 * 15 + 2 * 4 + 1
    assert "constant filters folded" in m["reports"]["channel_fold"]["summary"]
    assert m["stages"]["compile"]["layout"] == "NHWC"
    assert m["sizes"]["model.so"] == (host_artifact / "model.so").stat().st_size
    assert m["sizes"]["params.npz"] == (host_artifact / "params.npz").stat().st_size
    v = m["verification"]
    assert v["status"] == "passed" and v["images"] == VERIFY_IMAGES
    assert v["data"].endswith("calib")
    assert v["max_abs_logit_diff"] <= m["stages"]["compile"]["verify_tolerance"]
    assert v["plate_agreement"] >= 0.99
    assert m["accuracy"] is None
    # No staging directories left beside the artifact.
    assert [p.name for p in host_artifact.parent.iterdir()] == ["lprnet-host"]


@pytest.mark.slow
def test_artifact_reads_like_pytorch(host_artifact: Path, test_images: list[Path],
                                     weights_path: Path):
    rec = Recognizer.from_artifact(host_artifact)
    ref = reference_recognizer(weights_path)
    assert rec.backend_name == "tvm"
    got = [r.text for r in rec.recognize(test_images)]
    want = [r.text for r in ref.recognize(test_images)]
    assert got == want


@pytest.mark.slow
def test_accuracy_on_test_split(host_artifact: Path, test_dir: Path):
    """The acceptance figure: the compiled artifact reads test/ exactly as well as PyTorch."""
    from lprnet_edge.runtime.evaluate import evaluate

    res = evaluate(Recognizer.from_artifact(host_artifact), test_dir)
    assert res.count == 1000
    assert round(res.accuracy, 3) == 0.894


@pytest.mark.slow
@pytest.mark.parametrize("name", ["params.npz", "model.so"])
def test_tampered_file_is_rejected(copy_of, name: str):
    art = copy_of()
    p = art / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"checksum mismatch for {name}"):
        Recognizer.from_artifact(art)


@pytest.mark.slow
def test_missing_file_is_rejected(copy_of):
    art = copy_of()
    (art / "params.npz").unlink()
    with pytest.raises(ArtifactError, match="params.npz listed in the manifest is missing"):
        Recognizer.from_artifact(art)


def _edit_manifest(art: Path, **changes) -> None:
    m = json.loads((art / MANIFEST).read_text(encoding="utf-8"))
    for key, value in changes.items():
        if "." in key:
            a, b = key.split(".")
            m[a][b] = value
        else:
            m[key] = value
    (art / MANIFEST).write_text(json.dumps(m), encoding="utf-8")


@pytest.mark.slow
def test_wrong_schema_is_rejected(copy_of):
    art = copy_of()
    _edit_manifest(art, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(ArtifactError, match="schema version"):
        Recognizer.from_artifact(art)


@pytest.mark.slow
def test_other_architecture_is_rejected(copy_of):
    other = "aarch64" if machine_arch() != "aarch64" else "x86_64"
    art = copy_of()
    _edit_manifest(art, **{"target.arch": other, "target.name": "rpi4"})
    with pytest.raises(ArtifactError) as e:
        Recognizer.from_artifact(art)
    assert f"built for rpi4 ({other}), but this machine is {machine_arch()}" in str(e.value)


@pytest.mark.slow
def test_bundle_round_trip(host_artifact: Path, tmp_path: Path):
    tar = bundle(host_artifact, tmp_path / "lprnet-host.tar.gz")
    root = unbundle(tar, tmp_path / "unpacked")
    assert Artifact.open(root).manifest.files == load_manifest(host_artifact).files
    assert Recognizer.from_artifact(root).backend_name == "tvm"
