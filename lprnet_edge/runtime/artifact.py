"""The artifact: a directory with ``manifest.json``, the compiled module and its weights.

:class:`Artifact` is the one reader of ``manifest.json`` (runtime, build, CLI, deploy): it parses
it into a typed, validated :class:`Manifest`, checks every listed file's size and sha256 and the
target architecture, and only then hands out the paths the TVM runtime loads. Everything the
runtime loads is a plain file name inside the artifact listed in ``files`` with its checksum;
anything else is refused *before* any code is loaded (a shared object's constructor runs at
load time, so a check after loading would be too late).

Build records (stages, reports, verification, accuracy, versions, source, sizes, ...) stay
free-form JSON in :attr:`Manifest.records`: the runtime never loads code or files from them.
"""

from __future__ import annotations

import json
import math
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.runtime.charset import Charset
from lprnet_edge.runtime.errors import ArtifactError, LprnetEdgeError
from lprnet_edge.runtime.files import atomic_file, safe_extractall, sha256_file
from lprnet_edge.runtime.preprocess import Preprocess, check_version

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
BACKENDS = ("tvm",)

# Names the machine reports (platform.machine()) for each architecture a target can have.
ARCH_ALIASES = {
    "x86_64": {"x86_64", "amd64"},
    "aarch64": {"aarch64", "arm64"},
    "armv7": {"armv7l", "armv7", "armv8l"},
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_SIDE = 4096  # preprocess width/height: LPRNet takes 94x24; anything huge is a typo


def machine_arch(machine: str | None = None) -> str:
    """An architecture in target terms (``x86_64``, ``aarch64``, ``armv7``): of ``machine``
    (what ``uname -m`` printed, e.g. on a device), or of this machine."""
    m = (platform.machine() if machine is None else machine).strip().lower()
    for arch, names in ARCH_ALIASES.items():
        if m in names:
            return arch
    return m


def check_plain_name(name: Any, what: str) -> str:
    """A file name the runtime may open: relative, one path component, no NUL."""
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"manifest: {what} must be a file name, got {name!r}")
    if "/" in name or "\\" in name or "\0" in name or name in (".", "..") \
            or Path(name).is_absolute():
        raise ArtifactError(f"manifest: {what} {name!r} is not a plain file name inside the "
                            "artifact (no '/', '..', absolute paths or NUL); refusing to load it")
    return name


# ---------------------------------------------------------------- field readers


def _req(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ArtifactError(f"manifest: {where} has no {key!r} entry")
    return d[key]


def _dict(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ArtifactError(f"manifest: {where} must be an object, got {type(v).__name__}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ArtifactError(f"manifest: {where} must be a non-empty string, got {v!r}")
    return v


def _int(v: Any, where: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ArtifactError(f"manifest: {where} must be an integer {rng}, got {v!r}")
    return v


def _float(v: Any, where: str, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or (positive and v <= 0):
        kind = "a positive number" if positive else "a finite number"
        raise ArtifactError(f"manifest: {where} must be {kind}, got {v!r}")
    return float(v)


def _opt_dict(d: Mapping[str, Any], key: str, where: str) -> dict[str, Any] | None:
    return None if d.get(key) is None else _dict(d[key], f"{where}.{key}")


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


# ---------------------------------------------------------------- typed blocks


@dataclass(frozen=True)
class TargetInfo:
    """What the artifact was built for; ``arch`` is checked against this machine at load."""

    name: str
    arch: str
    description: str | None = None
    tvm: dict[str, Any] | None = None  # the TVM target dict, as recorded
    toolchain: dict[str, Any] | None = None
    device: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Any) -> TargetInfo:
        d = _dict(d, "target")
        desc = d.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ArtifactError(f"manifest: target.description must be a string, got {desc!r}")
        return cls(name=_str(_req(d, "name", "target"), "target.name"),
                   arch=_str(_req(d, "arch", "target"), "target.arch"), description=desc,
                   tvm=_opt_dict(d, "tvm", "target"),
                   toolchain=_opt_dict(d, "toolchain", "target"),
                   device=_opt_dict(d, "device", "target"))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"name": self.name, "arch": self.arch, "description": self.description,
                           "tvm": self.tvm, "toolchain": self.toolchain, "device": self.device})


@dataclass(frozen=True)
class InputSpec:
    """The model's input tensor (``x``: 1x3xHxW float32, BGR, NCHW)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str | None = None
    color: str | None = None

    @classmethod
    def from_dict(cls, d: Any) -> InputSpec:
        d = _dict(d, "input")
        shape = _req(d, "shape", "input")
        if not isinstance(shape, list) or not shape:
            raise ArtifactError(f"manifest: input.shape must be a list of sizes, got {shape!r}")
        dtype = _str(_req(d, "dtype", "input"), "input.dtype")
        if dtype != "float32":
            raise ArtifactError(f"manifest: input.dtype {dtype!r}: this runtime feeds float32")
        opt = {k: _str(d[k], f"input.{k}") for k in ("layout", "color") if d.get(k) is not None}
        return cls(name=_str(_req(d, "name", "input"), "input.name"),
                   shape=tuple(_int(s, "input.shape[]", 1) for s in shape), dtype=dtype, **opt)

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"name": self.name, "shape": list(self.shape), "layout": self.layout,
                           "dtype": self.dtype, "color": self.color})


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, d: Any, name: str) -> FileEntry:
        where = f"files[{name!r}]"
        d = _dict(d, where)
        sha = _req(d, "sha256", where)
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ArtifactError(f"manifest: {where}.sha256 must be 64 lowercase hex digits")
        return cls(sha, _int(_req(d, "size", where), f"{where}.size", 0))

    @classmethod
    def of(cls, path: Path) -> FileEntry:
        return cls(sha256_file(path), Path(path).stat().st_size)

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class RuntimeSpec:
    """How to call the module: ``entry(x, *params[param_order])``."""

    entry: str
    params: str | None = None  # a params file (runtime.params_codec) listed in ``files``
    param_order: tuple[str, ...] = ()
    num_threads: int | None = None  # the target's cores; $TVM_NUM_THREADS or the caller wins

    @classmethod
    def from_dict(cls, d: Any) -> RuntimeSpec:
        d = _dict(d, "runtime")
        params = d.get("params")
        if params is not None:
            check_plain_name(params, "runtime.params")
        order = d.get("param_order", [])
        if not isinstance(order, list) or not all(isinstance(n, str) and n for n in order):
            raise ArtifactError("manifest: runtime.param_order must be a list of weight names")
        if params is not None and not order:
            raise ArtifactError("manifest: runtime.param_order is missing: the order the "
                                "weights are passed in must be recorded (rebuild the artifact)")
        threads = d.get("num_threads")
        return cls(entry=_str(_req(d, "entry", "runtime"), "runtime.entry"), params=params,
                   param_order=tuple(order),
                   num_threads=None if threads is None else _int(threads, "runtime.num_threads",
                                                                 1, 1024))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"entry": self.entry}
        if self.params is not None:
            d["params"] = self.params
        if self.params is not None or self.param_order:
            d["param_order"] = list(self.param_order)
        if self.num_threads is not None:
            d["num_threads"] = self.num_threads
        return d


def _preprocess(d: Any) -> Preprocess:
    d = _dict(d, "preprocess")
    check_version(d)
    kw: dict[str, Any] = {}
    for k in ("width", "height"):
        if k in d:
            kw[k] = _int(d[k], f"preprocess.{k}", 1, _MAX_SIDE)
    if "mean" in d:
        kw["mean"] = _float(d["mean"], "preprocess.mean")
    if "scale" in d:
        kw["scale"] = _float(d["scale"], "preprocess.scale", positive=True)
    if "color" in d and d["color"] != "BGR":
        raise ArtifactError(f"manifest: preprocess.color {d['color']!r}: this runtime feeds "
                            "BGR images (the LPRNet convention)")
    return Preprocess(**kw)


def _charset(d: Any) -> Charset:
    d = _dict(d, "charset")
    chars = _req(d, "chars", "charset")
    if not isinstance(chars, list) or not chars or not all(isinstance(c, str) and c
                                                           for c in chars):
        raise ArtifactError("manifest: charset.chars must be a non-empty list of strings")
    try:
        return Charset(name=_str(_req(d, "name", "charset"), "charset.name"), chars=tuple(chars),
                       blank=_int(_req(d, "blank", "charset"), "charset.blank", 0),
                       region_chars=_int(d.get("region_chars", 0), "charset.region_chars", 0))
    except ArtifactError:
        raise
    except LprnetEdgeError as e:
        raise ArtifactError(f"manifest: {e}") from e


_TYPED = ("schema_version", "backend", "model_file", "target", "input", "preprocess", "charset",
          "files", "runtime")


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, typed. Build with :meth:`from_dict` (validates) or directly."""

    backend: str
    model_file: str
    target: TargetInfo
    input: InputSpec
    preprocess: Preprocess
    charset: Charset
    files: dict[str, FileEntry]
    runtime: RuntimeSpec
    # Everything else (name, output, source, stages, reports, versions, created, built_on,
    # sizes, param_encodings, verification, accuracy, and keys newer builds add): free-form.
    records: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_plain_name(self.model_file, "model_file")
        for name in self.files:
            check_plain_name(name, "a name in files")
        for what, name in (("model_file", self.model_file), ("runtime.params",
                                                               self.runtime.params)):
            if name is not None and name not in self.files:
                raise ArtifactError(f"manifest: {what} {name!r} is not listed in files with "
                                    "its checksum; refusing to load an unchecked file")
        want = (1, 3, self.preprocess.height, self.preprocess.width)
        if len(self.input.shape) != 4 or self.input.shape != want:
            raise ArtifactError(f"manifest: input.shape {list(self.input.shape)} does not match "
                                f"preprocess {self.preprocess.width}x{self.preprocess.height} "
                                f"(expected {list(want)})")

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Validate every field the runtime uses; :class:`ArtifactError` names the bad one."""
        d = _dict(d, "the manifest")
        version = d.get("schema_version")
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            raise ArtifactError(
                f"manifest schema version {version!r}, this lprnet-edge reads version "
                f"{SCHEMA_VERSION}; rebuild the artifact with this version")
        backend = _str(_req(d, "backend", "the manifest"), "backend")
        if backend not in BACKENDS:
            raise ArtifactError(f"manifest: unknown backend {backend!r} (this runtime runs "
                                f"{' / '.join(map(repr, BACKENDS))} artifacts; rebuild it with "
                                "lprnet-edge build)")
        files = _dict(_req(d, "files", "the manifest"), "files")
        entries = {check_plain_name(n, "a name in files"): FileEntry.from_dict(e, n)
                   for n, e in files.items()}
        return cls(backend=backend,
                   model_file=check_plain_name(_req(d, "model_file", "the manifest"),
                                               "model_file"),
                   target=TargetInfo.from_dict(_req(d, "target", "the manifest")),
                   input=InputSpec.from_dict(_req(d, "input", "the manifest")),
                   preprocess=_preprocess(_req(d, "preprocess", "the manifest")),
                   charset=_charset(_req(d, "charset", "the manifest")),
                   files=entries,
                   runtime=RuntimeSpec.from_dict(_req(d, "runtime", "the manifest")),
                   records={k: v for k, v in d.items() if k not in _TYPED},
                   schema_version=version)

    def to_dict(self) -> dict[str, Any]:
        typed = {
            "schema_version": self.schema_version, "backend": self.backend,
            "model_file": self.model_file, "target": self.target.to_dict(),
            "input": self.input.to_dict(), "preprocess": self.preprocess.to_dict(),
            "charset": self.charset.to_dict(),
            "files": {n: e.to_dict() for n, e in self.files.items()},
            "runtime": self.runtime.to_dict(),
        }
        return {**typed, **self.records}

    # Build records, read-only conveniences (absent: empty / None).
    @property
    def name(self) -> str | None:
        return self.records.get("name")

    @property
    def stages(self) -> dict[str, Any]:
        return self.records.get("stages") or {}

    @property
    def reports(self) -> dict[str, Any]:
        return self.records.get("reports") or {}

    @property
    def verification(self) -> dict[str, Any] | None:
        return self.records.get("verification")


def load_manifest(root: str | Path) -> Manifest:
    """Parse and validate ``root/manifest.json`` (files are not checked: see Artifact)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST} (not an lprnet-edge artifact?)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt manifest ({e})") from e
    try:
        return Manifest.from_dict(d)
    except ArtifactError as e:
        raise ArtifactError(f"{root}: {e}") from None


# ---------------------------------------------------------------- the artifact


class Artifact:
    """An artifact directory with a validated manifest.

    ``Artifact.open(path)`` is the normal way in (validate, verify checksums, check the
    architecture). ``Artifact(root, manifest)`` wraps a manifest held in memory, e.g. the build's
    staging directory before ``manifest.json`` is written; call :meth:`verify` before loading.
    """

    def __init__(self, root: str | Path, manifest: Manifest) -> None:
        self._root = Path(root)
        self._manifest = manifest

    @classmethod
    def open(cls, path: str | Path, check_arch: bool = True) -> Artifact:
        art = cls(path, load_manifest(path))
        art.verify(check_arch=check_arch)
        return art

    @property
    def root(self) -> Path:
        return self._root

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def lib_path(self) -> Path:
        return self._root / self._manifest.model_file

    @property
    def params_path(self) -> Path | None:
        p = self._manifest.runtime.params
        return None if p is None else self._root / p

    @property
    def entry(self) -> str:
        return self._manifest.runtime.entry

    @property
    def param_order(self) -> tuple[str, ...]:
        return self._manifest.runtime.param_order

    @property
    def num_threads(self) -> int | None:
        return self._manifest.runtime.num_threads

    def params(self) -> list[np.ndarray]:
        """The weights decoded (float32, or the type of a ``raw`` one), in the order the entry
        function takes them."""
        if self.params_path is None:
            return []
        from lprnet_edge.runtime.params_codec import load_params

        arrays = load_params(self.params_path)
        missing = [k for k in self.param_order if k not in arrays]
        if missing:
            raise ArtifactError(f"{self.params_path}: weights {missing[:3]} listed in the "
                                "manifest are missing (rebuild the artifact)")
        return [arrays[k] for k in self.param_order]

    def verify(self, check_arch: bool = True) -> Artifact:
        """Check every listed file's size and sha256, and (``check_arch``) the architecture."""
        root = self._root
        real_root = root.resolve()
        for name, entry in self._manifest.files.items():
            p = root / name
            if not p.is_file():
                raise ArtifactError(f"{root}: file {name} listed in the manifest is missing")
            if p.resolve().parent != real_root:
                raise ArtifactError(f"{root}: file {name} points outside the artifact")
            if p.stat().st_size != entry.size or sha256_file(p) != entry.sha256:
                raise ArtifactError(
                    f"{root}: checksum mismatch for {name}: the artifact was modified or "
                    "damaged; rebuild or re-deploy it")
        if check_arch:
            t = self._manifest.target
            if t.arch != machine_arch():
                raise ArtifactError(
                    f"{root}: built for {t.name} ({t.arch}), but this machine is "
                    f"{machine_arch()}; build with --target for this machine or run it on the "
                    "device")
        return self

    def __repr__(self) -> str:
        return f"Artifact({str(self._root)!r}, target={self._manifest.target.name!r})"


# ---------------------------------------------------------------- bundles


def bundle(artifact: str | Path, out: str | Path | None = None) -> Path:
    """Pack an artifact directory into ``<name>.tar.gz`` (written atomically)."""
    import tarfile

    art = Artifact.open(artifact, check_arch=False)
    out = Path(out) if out else art.root.with_name(art.root.name + ".tar.gz")
    with atomic_file(out) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(art.root, arcname=art.root.name)
    return out


def unbundle(archive: str | Path, dest: str | Path) -> Path:
    """Extract a bundle made by :func:`bundle` (safe extraction) and verify it."""
    import tarfile

    dest = Path(dest)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = {n.split("/", 1)[0] for n in tar.getnames()}
            if len(names) != 1:
                raise ArtifactError(f"{archive}: not an lprnet-edge bundle")
            safe_extractall(tar, dest)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArtifactError(f"{archive}: not a readable bundle ({e})") from e
    root = dest / names.pop()
    Artifact.open(root, check_arch=False)
    return root
