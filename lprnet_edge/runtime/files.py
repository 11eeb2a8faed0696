"""File helpers shared by the build and the device: checksums, atomic writes, safe tar extraction.

Runtime side (standard library only). Writes go through a temporary file or directory beside
the target and a rename, so a reader (or a board mid-deploy) never sees half an artifact.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import signal
import stat
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from lprnet_edge.runtime.errors import ArtifactError


def read_npz(path: str | Path, what: str) -> tuple[dict[str, np.ndarray], int | None]:
    """The arrays of an artifact's ``.npz`` check file and its ``format`` (None if absent):
    the files a board reads before it trusts a deployment, refused when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: not a readable {what} ({e})") from None
    fmt = int(data["format"]) if "format" in data and data["format"].size == 1 else None
    return data, fmt


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM held back for the block (main thread; elsewhere they are not delivered
    to this thread anyway) and delivered right after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
        with _signals_deferred():  # never stop between moving the old one away and the new in
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


# ---------------------------------------------------------------- tar extraction


def check_member(m: tarfile.TarInfo) -> None:
    """Refuse (never re-root) a member that could land outside the destination or is not a
    plain file or folder: absolute names, ``..``, NUL, links, devices, FIFOs."""
    name = m.name
    if "\0" in name or name.startswith(("/", "\\")) or os.path.isabs(name):
        raise ArtifactError(f"unsafe member {name!r} in the archive (absolute path)")
    if ".." in PurePosixPath(name).parts or ".." in Path(name).parts:
        raise ArtifactError(f"unsafe member {name!r} in the archive (path with '..')")
    if not (m.isfile() or m.isdir()):
        raise ArtifactError(f"unsafe member {name!r} in the archive (links, devices and "
                            "FIFOs are refused; only files and folders are extracted)")


def _sanitized(m: tarfile.TarInfo) -> tarfile.TarInfo:
    """A copy without setuid/setgid/sticky or group/other write bits, owned by us."""
    m = copy.copy(m)
    keep = 0o755 if m.isdir() else 0o644 | (0o111 if m.mode & 0o100 else 0)
    m.mode = stat.S_IMODE(m.mode) & keep | (0o700 if m.isdir() else 0o600)
    m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
    return m


def safe_extractall(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract plain files and folders only, never outside ``dest``, with safe modes.

    Every member is checked first (:func:`check_member`: one bad member refuses the whole
    archive before anything is written). Python 3.11.4+ then extracts through tarfile's
    "data" filter; Debian 12's 3.11.2 has no filters, so modes and owners are sanitized by hand.
    """
    members = tar.getmembers()
    for m in members:
        check_member(m)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
        return
    tar.extractall(dest, members=[_sanitized(m) for m in members])
