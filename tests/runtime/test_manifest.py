"""The typed manifest and Artifact: every field the runtime uses is validated, every file it
loads is a plain name listed with its checksum, and a bad manifest is refused before any code
is loaded (issue 12, defect 3).

The artifacts here are hand-made (a real params file, a stand-in ``model.so``): validation
happens before the module is loaded, so no compile is needed. The last tests use a real shared
object whose constructor leaves a mark, to show it never runs for a refused manifest.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lprnet_edge.runtime.artifact import (
    MANIFEST,
    SCHEMA_VERSION,
    Artifact,
    FileEntry,
    Manifest,
    RuntimeSpec,
    load_manifest,
    machine_arch,
)
from lprnet_edge.runtime.charset import load_charset
from lprnet_edge.runtime.errors import ArtifactError
from lprnet_edge.runtime.params_codec import save_params
from lprnet_edge.runtime.preprocess import Preprocess

WEIGHTS = {"w0": np.arange(6, dtype=np.float32).reshape(2, 3), "w1": np.ones(4, np.float32)}


def manifest_dict(root: Path, files: tuple[str, ...] = ("model.so", "params.npz")) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": root.name,
        "backend": "tvm",
        "model_file": "model.so",
        "target": {"name": "host", "arch": machine_arch(), "description": "this machine",
                   "tvm": {"kind": "llvm"}, "toolchain": {"cross": False}, "device": {}},
        "input": {"name": "x", "shape": [1, 3, 24, 94], "layout": "NCHW", "dtype": "float32",
                  "color": "BGR"},
        "output": {"shape": [1, 68, 18], "dtype": "float32", "layout": "NCT"},
        "preprocess": Preprocess().to_dict(),
        "charset": load_charset().to_dict(),
        "files": {n: FileEntry.of(root / n).to_dict() for n in files},
        "runtime": {"entry": "main", "params": "params.npz", "param_order": ["w1", "w0"],
                    "num_threads": 2},
        "stages": {"prune": None}, "reports": {"compile": {"tuned": False}},
        "verification": {"status": "skipped"}, "accuracy": None,
        "future_key": {"kept": True},
    }


def write(root: Path, m: dict) -> Path:
    (root / MANIFEST).write_text(json.dumps(m, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture
def art_dir(tmp_path: Path) -> Path:
    root = tmp_path / "art"
    root.mkdir()
    (root / "model.so").write_bytes(b"\x7fELF stand-in")
    save_params(root / "params.npz", WEIGHTS, {"w0": "dense", "w1": "fp16"})
    return write(root, manifest_dict(root))


def test_valid_manifest_round_trips_and_opens(art_dir: Path):
    raw = json.loads((art_dir / MANIFEST).read_text(encoding="utf-8"))
    m = Manifest.from_dict(raw)
    assert m.to_dict() == raw  # typed fields and free-form records, unknown keys included
    assert Manifest.from_dict(m.to_dict()) == m
    assert load_manifest(art_dir).to_dict() == raw
    assert m.target.arch == machine_arch() and m.target.tvm == {"kind": "llvm"}
    assert m.files["model.so"] == FileEntry.of(art_dir / "model.so")
    assert m.runtime == RuntimeSpec("main", "params.npz", ("w1", "w0"), 2)
    assert m.preprocess == Preprocess() and m.charset == load_charset()
    assert m.name == "art" and m.stages == {"prune": None}
    assert m.reports["compile"] == {"tuned": False} and m.verification["status"] == "skipped"
    art = Artifact.open(art_dir)
    assert art.root == art_dir and art.manifest == m
    assert art.lib_path == art_dir / "model.so" and art.params_path == art_dir / "params.npz"
    assert art.entry == "main" and art.param_order == ("w1", "w0") and art.num_threads == 2
    w1, w0 = art.params()
    np.testing.assert_array_equal(w0, WEIGHTS["w0"])
    np.testing.assert_array_equal(w1, WEIGHTS["w1"])
    assert w0.dtype == np.float32 and w1.dtype == np.float32


def test_minimal_manifest(tmp_path: Path):
    """Only what the runtime needs: optional blocks absent stay absent on the way back."""
    root = tmp_path / "art"
    root.mkdir()
    (root / "model.so").write_bytes(b"x")
    m = {k: v for k, v in manifest_dict(root, ("model.so",)).items()
         if k in ("schema_version", "backend", "model_file", "files", "charset", "preprocess")}
    m.update(target={"name": "host", "arch": machine_arch()}, runtime={"entry": "main"},
             input={"name": "x", "shape": [1, 3, 24, 94], "dtype": "float32"})
    write(root, m)
    art = Artifact.open(root)
    assert art.manifest.to_dict() == m
    assert art.params_path is None and art.params() == [] and art.num_threads is None


def _set(m: dict, dotted: str, value) -> dict:
    m = copy.deepcopy(m)
    *path, last = dotted.split(".")
    d = m
    for k in path:
        d = d[k]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value
    return m


_DELETE = object()

MALFORMED = [
    ("schema_version", SCHEMA_VERSION + 1, "schema version"),
    ("schema_version", "1", "schema version"),
    ("schema_version", True, "schema version"),
    ("schema_version", _DELETE, "schema version"),
    ("backend", "torch", "unknown backend 'torch'"),
    ("backend", 3, "backend must be"),
    ("files", [["model.so", "abc"]], "files must be an object"),
    ("files.model.so", {"sha256": "0" * 64}, r"files\['model.so'\] has no 'size'"),
    ("files.model.so", {"size": 3}, r"files\['model.so'\] has no 'sha256'"),
    ("files.model.so", {"sha256": "xyz", "size": 3}, "64 lowercase hex"),
    ("files.model.so", {"sha256": "0" * 64, "size": -1}, r"size must be an integer >= 0"),
    ("files.model.so", {"sha256": "0" * 64, "size": "3"}, r"size must be an integer"),
    ("files.model.so", "abc", r"files\['model.so'\] must be an object"),
    ("target", "host", "target must be an object"),
    ("target.arch", _DELETE, "target has no 'arch'"),
    ("target.arch", ["x86_64"], "target.arch must be a non-empty string"),
    ("target.tvm", "llvm", "target.tvm must be an object"),
    ("target.description", 5, "target.description must be a string"),
    ("preprocess.width", "94", "preprocess.width must be an integer"),
    ("preprocess.width", 0, "preprocess.width must be an integer"),
    ("preprocess.height", 1e9, "preprocess.height must be an integer"),
    ("preprocess.width", 95, "does not match preprocess"),
    ("preprocess.mean", "127.5", "preprocess.mean must be a finite number"),
    ("preprocess.scale", 0, "preprocess.scale must be a positive number"),
    ("preprocess.color", "RGB", "preprocess.color 'RGB'"),
    ("preprocess", [94, 24], "preprocess must be an object"),
    ("preprocess.version", _DELETE, "preprocess version 1, this runtime .* rebuild it"),
    ("preprocess.version", 3, "preprocess version 3, this runtime .* rebuild it"),
    ("charset.chars", "ABC", "charset.chars must be a non-empty list"),
    ("charset.chars", [1, 2], "charset.chars must be a non-empty list"),
    ("charset.blank", 999, "blank index 999 out of range"),
    ("charset.blank", "67", "charset.blank must be an integer"),
    ("input.shape", "1x3x24x94", "input.shape must be a list"),
    ("input.shape", [1, 3, 24, -94], r"input.shape\[\] must be an integer >= 1"),
    ("input.dtype", "int8", "this runtime feeds float32"),
    ("runtime", _DELETE, "has no 'runtime'"),
    ("runtime.entry", "", "runtime.entry must be a non-empty string"),
    ("runtime.param_order", "w0,w1", "param_order must be a list"),
    ("runtime.param_order", _DELETE, "param_order is missing"),
    ("runtime.num_threads", "4", "runtime.num_threads must be an integer"),
    ("runtime.num_threads", 0, "runtime.num_threads must be an integer"),
    ("model_file", _DELETE, "has no 'model_file'"),
]


@pytest.mark.parametrize(("field", "value", "match"), MALFORMED,
                         ids=[f"{f}={v!r}"[:40] for f, v, _ in MALFORMED])
def test_malformed_manifest_names_the_field(art_dir: Path, field: str, value, match: str):
    if field.startswith("files.model.so"):
        m = manifest_dict(art_dir)
        m["files"]["model.so"] = value
    else:
        m = _set(manifest_dict(art_dir), field, value)
    with pytest.raises(ArtifactError, match=match):
        Manifest.from_dict(m)
    write(art_dir, m)
    with pytest.raises(ArtifactError, match=match) as e:
        Artifact.open(art_dir)
    assert str(art_dir) in str(e.value)


@pytest.mark.parametrize("doc", ["[]", "42", '"manifest"', "null", "{", "\xff"])
def test_not_a_manifest_object(art_dir: Path, doc: str):
    (art_dir / MANIFEST).write_bytes(doc.encode("latin-1"))
    with pytest.raises(ArtifactError, match="manifest"):
        Artifact.open(art_dir)


UNSAFE_NAMES = ["../model.so", "/tmp/model.so", "sub/model.so", "model\0.so", "..", ".",
                "..\\model.so", ""]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
@pytest.mark.parametrize("where", ["model_file", "runtime.params", "files"])
def test_unsafe_file_names_are_refused(art_dir: Path, name: str, where: str):
    m = manifest_dict(art_dir)
    if where == "files":
        m["files"][name] = m["files"]["params.npz"]
    else:
        m = _set(m, where, name)
    with pytest.raises(ArtifactError, match="file name"):
        Manifest.from_dict(m)


@pytest.mark.parametrize("where", ["model_file", "runtime.params"])
def test_loaded_files_must_be_listed_with_a_checksum(art_dir: Path, where: str):
    (art_dir / "other.bin").write_bytes(b"unlisted")
    m = _set(manifest_dict(art_dir), where, "other.bin")
    with pytest.raises(ArtifactError, match="'other.bin' is not listed in files"):
        Manifest.from_dict(m)


def test_listed_file_that_is_a_symlink_outside_is_refused(art_dir: Path, tmp_path: Path):
    outside = tmp_path / "outside.so"
    shutil.copy(art_dir / "model.so", outside)
    (art_dir / "model.so").unlink()
    (art_dir / "model.so").symlink_to(outside)
    with pytest.raises(ArtifactError, match="model.so points outside the artifact"):
        Artifact.open(art_dir)


def test_checksums_sizes_and_architecture(art_dir: Path, tmp_path: Path):
    with open(art_dir / "params.npz", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="checksum mismatch for params.npz"):
        Artifact.open(art_dir)
    (art_dir / "params.npz").unlink()
    with pytest.raises(ArtifactError, match="params.npz listed in the manifest is missing"):
        Artifact.open(art_dir)
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        Artifact.open(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Artifact.open(tmp_path / "empty")


def test_other_architecture(art_dir: Path):
    other = "aarch64" if machine_arch() != "aarch64" else "x86_64"
    write(art_dir, _set(manifest_dict(art_dir), "target.arch", other))
    with pytest.raises(ArtifactError, match=rf"built for host \({other}\), but this machine"):
        Artifact.open(art_dir)
    assert Artifact.open(art_dir, check_arch=False).manifest.target.arch == other


def test_params_missing_from_the_file(art_dir: Path):
    write(art_dir, _set(manifest_dict(art_dir), "runtime.param_order", ["w0", "w9"]))
    with pytest.raises(ArtifactError, match="'w9'.* are missing"):
        Artifact.open(art_dir).params()


def test_load_manifest_does_not_check_files(art_dir: Path):
    (art_dir / "params.npz").unlink()
    assert load_manifest(art_dir).runtime.params == "params.npz"


# ---------------------------------------------------------------- no code loaded when refused

CONSTRUCTOR = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void mark(void) {
    const char *p = getenv("LPRNET_TEST_MARK");
    if (p) { FILE *f = fopen(p, "w"); if (f) { fputs("constructor ran", f); fclose(f); } }
}
"""


@pytest.fixture
def evil_so(tmp_path: Path) -> Path:
    """A shared object whose constructor writes $LPRNET_TEST_MARK when it is loaded."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "evil.c"
    src.write_text(CONSTRUCTOR)
    out = tmp_path / "evil.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", out, src], check=True, timeout=60)
    return out


def _load_in_subprocess(root: Path, mark: Path) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        from lprnet_edge.runtime.errors import ArtifactError
        from lprnet_edge.runtime.recognizer import Recognizer
        try:
            Recognizer.from_artifact({str(root)!r})
        except ArtifactError as e:
            print("REFUSED", e)
            sys.exit(3)
    """)
    env = {**os.environ, "LPRNET_TEST_MARK": str(mark)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)


def test_the_constructor_runs_when_loaded(evil_so: Path, tmp_path: Path):
    """The probe works: TVM's loader runs a shared object's constructor (then fails on it)."""
    pytest.importorskip("tvm")
    root = tmp_path / "art"
    root.mkdir()
    shutil.copy(evil_so, root / "model.so")
    m = manifest_dict(root, ("model.so",))
    m["runtime"] = {"entry": "main"}
    write(root, m)
    mark = tmp_path / "mark"
    p = _load_in_subprocess(root, mark)
    assert mark.is_file(), p.stdout + p.stderr
    assert p.returncode == 3 and "REFUSED" in p.stdout  # not a TVM module: an ArtifactError


@pytest.mark.parametrize("case", ["outside", "unlisted", "absolute-params", "bad-files-key"])
def test_refused_manifest_loads_no_code(evil_so: Path, tmp_path: Path, case: str):
    pytest.importorskip("tvm")
    root = tmp_path / "art"
    root.mkdir()
    (root / "model.so").write_bytes(b"placeholder")
    save_params(root / "params.npz", WEIGHTS)
    m = manifest_dict(root)
    shutil.copy(evil_so, root / "evil.so")
    if case == "outside":
        m["model_file"] = "../evil.so"
        m["files"]["../evil.so"] = FileEntry.of(evil_so).to_dict()
    elif case == "unlisted":
        m["model_file"] = "evil.so"
    elif case == "absolute-params":
        m["runtime"]["params"] = str(root / "params.npz")
    else:
        m["files"] = {"../evil.so": FileEntry.of(evil_so).to_dict(), **m["files"]}
    write(root, m)
    mark = tmp_path / "mark"
    p = _load_in_subprocess(root, mark)
    assert p.returncode == 3 and "REFUSED" in p.stdout, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert not mark.exists()
