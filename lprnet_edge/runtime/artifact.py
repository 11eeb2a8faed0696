"""``manifest.json``: what an artifact is, how it was built, and how to check it is intact.

The runtime reads it (no torch, no compiler): schema version, target architecture, input and
preprocessing conventions, charset, file checksums, stage configs and measured figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lprnet_edge.runtime.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# Names the machine reports (platform.machine()) for each architecture a target can have.
_ARCH_ALIASES = {
    "x86_64": {"x86_64", "amd64"},
    "aarch64": {"aarch64", "arm64"},
    "armv7": {"armv7l", "armv7", "armv8l"},
}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def machine_arch() -> str:
    """This machine's architecture in target terms (``x86_64``, ``aarch64``, ``armv7``)."""
    m = platform.machine().lower()
    for arch, names in _ARCH_ALIASES.items():
        if m in names:
            return arch
    return m


def file_entries(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256_file(root / n), "size": (root / n).stat().st_size} for n in names}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path, executable: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the modes a normal write would have."""
    os.chmod(path, (0o777 if executable or Path(path).is_dir() else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON next to ``path`` then rename: a reader never sees half a file."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


@contextlib.contextmanager
def staging_dir(final: Path, overwrite: bool = True) -> Iterator[Path]:
    """A temporary directory beside ``final`` that becomes ``final`` only if the block succeeds.

    On failure (or Ctrl-C) it is removed and any previous ``final`` stays untouched.
    """
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} exists (use --force to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        publish_mode(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(artifact: str | Path) -> dict[str, Any]:
    """Load and sanity-check an artifact's manifest (not its files: see :func:`verify`)."""
    root = Path(artifact)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST} (not an lprnet-edge artifact?)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt manifest ({e})") from e
    version = m.get("schema_version") if isinstance(m, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{root}: manifest schema version {version!r}, this lprnet-edge reads "
            f"version {SCHEMA_VERSION}; rebuild the artifact with this version"
        )
    for key in ("backend", "files", "target", "charset", "preprocess", "input"):
        if key not in m:
            raise ArtifactError(f"{path}: manifest has no {key!r} entry")
    return m


def verify(artifact: str | Path, manifest: dict[str, Any] | None = None,
           check_arch: bool = True) -> dict[str, Any]:
    """Check every listed file's size and sha256, and the target architecture."""
    root = Path(artifact)
    m = manifest or read_manifest(root)
    for name, entry in m["files"].items():
        p = root / name
        if not p.is_file():
            raise ArtifactError(f"{root}: file {name} listed in the manifest is missing")
        if p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            raise ArtifactError(
                f"{root}: checksum mismatch for {name}: the artifact was modified or "
                "damaged; rebuild or re-deploy it"
            )
    if check_arch:
        arch = m["target"].get("arch")
        if arch and arch != machine_arch():
            raise ArtifactError(
                f"{root}: built for {m['target'].get('name', '?')} ({arch}), but this machine "
                f"is {machine_arch()}; build with --target for this machine or run it on the device"
            )
    return m


def bundle(artifact: str | Path, out: str | Path | None = None) -> Path:
    """Pack an artifact directory into ``<name>.tar.gz`` (written atomically)."""
    import tarfile

    root = Path(artifact)
    verify(root, check_arch=False)
    out = Path(out) if out else root.with_name(root.name + ".tar.gz")
    with atomic_file(out) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    return out


def safe_extractall(tar: Any, dest: Path) -> None:
    """Extract plain files and folders only, never outside ``dest``.

    Uses tarfile's "data" filter where Python has it (3.11.4+); Debian 12's 3.11.2 does not,
    so the same rules are checked by hand there.
    """
    import tarfile

    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    members = []
    for m in tar.getmembers():
        if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
            raise ArtifactError(f"unsafe member {m.name!r} in the archive")
        members.append(m)
    tar.extractall(dest, members=members)


def unbundle(archive: str | Path, dest: str | Path) -> Path:
    """Extract a bundle made by :func:`bundle` (safe extraction) and verify it."""
    import tarfile

    dest = Path(dest)
    with tarfile.open(archive, "r:gz") as tar:
        names = {n.split("/", 1)[0] for n in tar.getnames()}
        if len(names) != 1:
            raise ArtifactError(f"{archive}: not an lprnet-edge bundle")
        safe_extractall(tar, dest)
    root = dest / names.pop()
    verify(root, check_arch=False)
    return root
