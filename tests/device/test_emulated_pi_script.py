"""scripts/emulated-pi without the device: where its Debian mirror comes from (issue 12: the
host's apt configuration, not a hard-coded host name)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "emulated-pi"


def mirror(etc: Path, env_mirror: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LPRNET_EDGE_DEBIAN_MIRROR"}
    env["LPRNET_EDGE_APT_ETC"] = str(etc)
    if env_mirror:
        env["LPRNET_EDGE_DEBIAN_MIRROR"] = env_mirror
    return subprocess.run(["bash", str(SCRIPT), "__mirror"], capture_output=True, text=True,
                          env=env, timeout=60)


def apt_etc(tmp_path: Path, files: dict[str, str]) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    return etc


def test_mirror_from_deb822_sources(tmp_path):
    etc = apt_etc(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\n# a comment\nURIs: http://mirror.example.org/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://src.example.org/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example.org/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")})
    r = mirror(etc)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://mirror.example.org/debian"


def test_mirror_from_one_line_list_with_options(tmp_path):
    etc = apt_etc(tmp_path, {
        "sources.list": "# deb http://old.example.org/debian bookworm main\n",
        "sources.list.d/local.list": (
            "deb-src http://src.example.org/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/k.gpg] https://local.example.net/debian trixie main\n")})
    r = mirror(etc)  # another release: the same mirror serves bookworm
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "https://local.example.net/debian"


def test_no_mirror_is_an_error_naming_the_variable(tmp_path):
    etc = apt_etc(tmp_path, {"sources.list.d/node.sources": (
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n")})
    r = mirror(etc)
    assert r.returncode == 1
    assert "LPRNET_EDGE_DEBIAN_MIRROR" in r.stderr and r.stdout == ""
    assert mirror(etc, "http://given.example.org/debian").stdout.strip() == \
        "http://given.example.org/debian"


@pytest.mark.skipif(not Path("/etc/apt").is_dir(), reason="not a Debian-like host")
def test_this_hosts_mirror_is_found():
    r = mirror(Path("/etc/apt"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(("http://", "https://", "file://"))
