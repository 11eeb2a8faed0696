"""Finding, downloading and verifying the pretrained weights (no torch needed here).

Resolution order: ``--weights`` > ``$LPRNET_EDGE_WEIGHTS`` > ``$LPRNET_EDGE_DATA/weights/`` >
the user cache (filled by ``lprnet-edge weights download``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lprnet_edge.paths import cache_dir, data_root
from lprnet_edge.runtime.errors import WeightsError
from lprnet_edge.runtime.files import sha256_file


@dataclass(frozen=True)
class WeightsSpec:
    name: str
    url: str
    sha256: str
    filename: str
    num_classes: int = 68


SIRIUS = WeightsSpec(
    name="sirius-ai",
    url="https://github.com/sirius-ai/LPRNet_Pytorch/raw/master/weights/Final_LPRNet_model.pth",
    sha256="d1ca22ca7a251a90702a166c8ad8ce7f05acb39f5ef8055139a33d462716d1ad",
    filename="Final_LPRNet_model.pth",
)
KNOWN = {SIRIUS.name: SIRIUS}
KNOWN_SHA256 = {s.sha256: s for s in KNOWN.values()}


def resolve_weights(explicit: str | Path | None = None, spec: WeightsSpec = SIRIUS) -> Path:
    """The weights file to use, or an error that says how to get one."""
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("--weights", Path(explicit)))
    elif env := os.environ.get("LPRNET_EDGE_WEIGHTS"):
        candidates.append(("$LPRNET_EDGE_WEIGHTS", Path(env)))
    else:
        if (d := data_root()) is not None:
            candidates.append(("$LPRNET_EDGE_DATA", d / "weights" / spec.filename))
        candidates.append(("cache", cache_dir() / "weights" / spec.filename))
    for source, p in candidates:
        if p.is_file():
            return p
        if source != "cache" and source != "$LPRNET_EDGE_DATA":
            raise WeightsError(f"{p}: weights file not found (from {source})")
    raise WeightsError(
        "no LPRNet weights found: run `lprnet-edge weights download`, or pass --weights PATH "
        "(or set LPRNET_EDGE_WEIGHTS / LPRNET_EDGE_DATA)"
    )


def download(spec: WeightsSpec = SIRIUS, url: str | None = None, dest_dir: Path | None = None,
             force: bool = False, progress: Callable[[int, int], None] | None = None,
             timeout: float = 60.0) -> Path:
    """Download ``spec`` into the cache, verify its sha256, and move it in place atomically.

    ``url`` overrides the pinned address (a mirror, or ``file://`` for an offline copy); the
    pinned checksum is still enforced, so a wrong file never lands in the cache.
    """
    dest_dir = Path(dest_dir) if dest_dir else cache_dir() / "weights"
    dest = dest_dir / spec.filename
    if dest.is_file() and not force:
        if sha256_file(dest) == spec.sha256:
            return dest
    src = url or spec.url
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=dest_dir)
    except OSError as e:
        raise WeightsError(f"cannot write the weights to {dest_dir}: {e} (set "
                           "LPRNET_EDGE_CACHE to a writable folder)") from e
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(src, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while block := resp.read(1 << 16):
                out.write(block)
                h.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
        if total and done != total:
            raise WeightsError(f"download from {src} was cut short: got {done} of {total} "
                               "bytes; try again")
        if h.hexdigest() != spec.sha256:
            raise WeightsError(
                f"downloaded file from {src} has sha256 {h.hexdigest()}, expected "
                f"{spec.sha256}: refusing it (wrong file or corrupted transfer)"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise WeightsError(f"cannot download {src}: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return dest
