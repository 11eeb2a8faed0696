"""Safe tar extraction (issue 12 defect 9): absolute names and '..' are refused (not re-rooted),
links and devices refused, setuid/setgid/sticky stripped; on Python's "data" filter path and on
the 3.11.2 fallback (no tarfile.data_filter), both exercised here."""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_manifest import manifest_dict, write

from lprnet_edge.runtime.artifact import bundle, unbundle
from lprnet_edge.runtime.errors import ArtifactError
from lprnet_edge.runtime.files import safe_extractall
from lprnet_edge.runtime.params_codec import save_params


@pytest.fixture(params=["data-filter", "fallback"])
def path_kind(request, monkeypatch) -> str:
    if request.param == "fallback":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile.data_filter (3.11.2): only the fallback")
    return request.param


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def file_member(name: str, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info


def link_member(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


UNSAFE = {
    "absolute": [(file_member("/tmp/evil.txt"), b"x")],
    "dotdot": [(file_member("ok/../../evil.txt"), b"x")],
    "dotdot-first": [(file_member("../evil.txt"), b"x")],
    "symlink": [(link_member("ok/link", tarfile.SYMTYPE, "/etc/passwd"), None)],
    "symlink-inside": [(file_member("ok/a"), b"x"), (link_member("ok/b", tarfile.SYMTYPE, "a"),
                                                      None)],
    "hardlink": [(file_member("ok/a"), b"x"), (link_member("ok/h", tarfile.LNKTYPE, "ok/a"),
                                                None)],
    "chardev": [(link_member("ok/dev", tarfile.CHRTYPE), None)],
    "fifo": [(link_member("ok/fifo", tarfile.FIFOTYPE), None)],
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_members_are_refused(tmp_path: Path, path_kind: str, case: str):
    tar_path = make_tar(tmp_path / "a.tar", [(file_member("ok/fine.txt"), b"fine")]
                        + UNSAFE[case])
    dest = tmp_path / "dest"
    with tarfile.open(tar_path) as tar, pytest.raises(ArtifactError, match="unsafe member"):
        safe_extractall(tar, dest)
    # Refused as a whole, before anything is written; nothing outside either.
    assert not (dest / "ok").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_special_bits_are_stripped(tmp_path: Path, path_kind: str):
    tar_path = make_tar(tmp_path / "a.tar", [
        (file_member("ok/suid", 0o4755), b"#!/bin/sh\n"),
        (file_member("ok/sgid", 0o2775), b"x"),
        (file_member("ok/world", 0o666), b"x"),
    ])
    dest = tmp_path / "dest"
    with tarfile.open(tar_path) as tar:
        safe_extractall(tar, dest)
    for name in ("suid", "sgid", "world"):
        mode = (dest / "ok" / name).stat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), (name, oct(mode))
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), (name, oct(mode))
    assert (dest / "ok" / "suid").read_bytes() == b"#!/bin/sh\n"
    assert (dest / "ok" / "suid").stat().st_mode & stat.S_IXUSR  # the exec bit is kept


def test_bundle_round_trip_and_refusals(tmp_path: Path, path_kind: str):
    root = tmp_path / "lprnet-x"
    root.mkdir()
    (root / "model.so").write_bytes(b"stand-in")
    save_params(root / "params.npz", {"w1": np.ones(3, np.float32),
                                      "w0": np.zeros(2, np.float32)})
    write(root, manifest_dict(root))
    tar = bundle(root, tmp_path / "x.tar.gz")
    out = unbundle(tar, tmp_path / "unpacked")
    assert out == tmp_path / "unpacked" / "lprnet-x"
    assert (out / "params.npz").read_bytes() == (root / "params.npz").read_bytes()
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as t:
        t.add(root, arcname="lprnet-x")
        info = file_member("lprnet-x/../../escape.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ArtifactError, match="unsafe member"):
        unbundle(evil, tmp_path / "unpacked2")
    assert not (tmp_path / "escape.txt").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ArtifactError, match="not a readable bundle"):
        unbundle(tmp_path / "junk.tar.gz", tmp_path / "unpacked3")
