"""Targets as data (targets/*.toml, user files) and finding the compiler for each."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_user_error

from lprnet_edge.compiler.target import (
    ARCHES,
    list_targets,
    load_target,
    parse_target,
    target_names,
)
from lprnet_edge.compiler.toolchain import find_compiler
from lprnet_edge.runtime.artifact import machine_arch
from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError

BUILTIN = ("host", "rpi4", "rpi5", "rpi3", "rpi-armv7", "jetson-nano")


@pytest.fixture(autouse=True)
def _no_user_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Only the packaged targets unless a test adds its own."""
    monkeypatch.delenv("LPRNET_EDGE_TARGETS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def test_builtin_targets_load():
    assert set(BUILTIN) <= set(target_names())
    for t in list_targets():
        assert t.arch in ARCHES, t
        assert t.tvm["kind"] == "llvm"
        assert isinstance(t.tvm["num-cores"], int) and t.tvm["num-cores"] >= 1
        assert t.description


def test_device_targets_have_the_expected_tvm_dicts():
    rpi4 = load_target("rpi4")
    assert rpi4.arch == "aarch64"
    assert rpi4.tvm == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                        "mattr": ["+neon"], "num-cores": 4}
    assert rpi4.toolchain["debian_package"] == "g++-aarch64-linux-gnu"
    assert rpi4.device["num_threads"] == 4
    assert load_target("rpi5").tvm["mcpu"] == "cortex-a76"
    assert "+dotprod" in load_target("rpi5").tvm["mattr"]
    assert load_target("rpi3").tvm["mcpu"] == "cortex-a53"
    assert load_target("jetson-nano").tvm["mcpu"] == "cortex-a57"
    armv7 = load_target("rpi-armv7")
    assert armv7.arch == "armv7"
    assert armv7.tvm["mtriple"] == "armv7l-linux-gnueabihf"
    assert armv7.tvm["mfloat-abi"] == "hard"  # required to link with the armhf toolchain
    assert armv7.toolchain["triple"] == "arm-linux-gnueabihf"
    for name in ("rpi4", "rpi-armv7"):
        assert not load_target(name).is_native or machine_arch() != "x86_64"


def test_host_cpu_is_detected_not_native():
    pytest.importorskip("tvm")
    from tvm.target import codegen

    host = load_target("host")
    assert host.arch == machine_arch()
    assert host.is_native
    assert host.tvm["num-cores"] == os.cpu_count()
    # LLVM treats "native" as generic: the real CPU name must be in the dict.
    assert host.tvm.get("mcpu") not in (None, "native", "auto", "generic")
    assert host.tvm["mcpu"] == str(codegen.llvm_get_system_cpu())


def test_tvm_accepts_every_target():
    pytest.importorskip("tvm")
    for t in list_targets():
        tgt = t.tvm_target()
        assert tgt.kind.name == "llvm"
        assert str(tgt.attrs.get("mcpu", "")) == t.tvm.get("mcpu", "")


def test_tvm_rejections_are_clear_errors():
    pytest.importorskip("tvm")
    bad_cpu = parse_target(BOARD.replace("cortex-a55", "cortex-a999"), "board.toml")
    with pytest.raises(LprnetEdgeError, match="LLVM does not know mcpu 'cortex-a999'"):
        bad_cpu.tvm_target()
    bad_value = parse_target(BOARD.replace("num-cores = 8", 'num-cores = "eight"'), "b.toml")
    with pytest.raises(LprnetEdgeError, match=r"b.toml.*TVM rejects the \[tvm\] table"):
        bad_value.tvm_target()


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(LprnetEdgeError) as e:
        load_target("rpi9")
    msg = str(e.value)
    assert "unknown target 'rpi9'" in msg
    for name in BUILTIN:
        assert name in msg


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


BOARD = """\
name = "myboard"
description = "A test board"
arch = "aarch64"

[tvm]
kind = "llvm"
mtriple = "aarch64-linux-gnu"
mcpu = "cortex-a55"
num-cores = 8

[toolchain]
triple = "aarch64-linux-gnu"

[device]
ssh_user = "me"
num_threads = 8
"""


def test_user_targets_from_env_dir_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    envdir = tmp_path / "envtargets"
    _write(envdir / "myboard.toml", BOARD)
    # A user file with a packaged name overrides the packaged one.
    _write(envdir / "rpi4.toml", BOARD.replace('"myboard"', '"rpi4"').replace("8", "2"))
    monkeypatch.setenv("LPRNET_EDGE_TARGETS", str(envdir))
    t = load_target("myboard")
    assert t.tvm["mcpu"] == "cortex-a55" and t.device["ssh_user"] == "me"
    assert t.source == str(envdir / "myboard.toml")
    assert load_target("rpi4").tvm["num-cores"] == 2
    assert "myboard" in target_names()

    monkeypatch.delenv("LPRNET_EDGE_TARGETS")
    cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "lprnet-edge" / "targets"
    _write(cfg / "other.toml", BOARD.replace('"myboard"', '"other"'))
    assert load_target("other").name == "other"
    assert load_target("rpi4").tvm["num-cores"] == 4  # the packaged one again


def test_target_file_by_path(tmp_path: Path):
    p = _write(tmp_path / "board.toml", BOARD.replace('name = "myboard"\n', ""))
    t = load_target(str(p))
    assert t.name == "board"  # defaults to the file name
    assert t.arch == "aarch64"


@pytest.mark.parametrize("text, fragment", [
    ("name = \n", "not valid TOML"),
    (BOARD.replace('arch = "aarch64"', 'arch = "mips"'), "arch 'mips'"),
    (BOARD.replace('kind = "llvm"\n', ""), "[tvm] needs kind"),
    ("flavour = 1\n" + BOARD, "unknown keys ['flavour']"),
    (BOARD.replace('mtriple = "aarch64-linux-gnu"', 'mtriple = "x86_64-linux-gnu"'),
     "mtriple 'x86_64-linux-gnu' is for x86_64"),
    (BOARD.replace("num_threads = 8", 'num_threads = "eight"'), "num_threads must be"),
    (BOARD.replace('triple = "aarch64-linux-gnu"\n\n[device]',
                   'triple = "aarch64-linux-gnu"\nlinker = "ld"\n\n[device]'),
     "[toolchain] unknown keys ['linker']"),
    (BOARD.replace('ssh_user = "me"', 'ssh_user = "me"\nssh_prot = 22'),
     "[device] unknown keys ['ssh_prot']; use ['host', 'num_threads', 'python', 'rpc_key', "
     "'rpc_port', 'ssh_port', 'ssh_user', 'workdir']"),
    (BOARD.replace("num-cores = 8", "num-cores = 8\nmcpus = 1"), "[tvm] unknown keys ['mcpus']"),
], ids=["toml", "arch", "kind", "key", "mtriple", "device-type", "toolchain-key", "device-key",
        "tvm-key"])
def test_invalid_target_files_name_the_file(tmp_path: Path, text: str, fragment: str):
    p = _write(tmp_path / "bad.toml", text)
    with pytest.raises(LprnetEdgeError) as e:
        load_target(str(p))
    assert str(p) in str(e.value)
    assert fragment in str(e.value)


def test_llvm_keys_are_the_ones_tvm_accepts():
    """The [tvm] check runs without TVM; its list must be what TVM's llvm kind takes."""
    tvm = pytest.importorskip("tvm")
    from lprnet_edge.compiler.target import LLVM_KEYS

    assert set(tvm.target.TargetKind.options_from_name("llvm")) == LLVM_KEYS


def test_missing_target_file(tmp_path: Path):
    with pytest.raises(LprnetEdgeError, match="no such file"):
        load_target(str(tmp_path / "nope.toml"))


# ---------------------------------------------------------------- toolchains


def test_host_uses_the_system_compiler():
    cc = find_compiler(load_target("host"))
    assert not cc.cross
    assert Path(cc.path).name in ("g++", "c++", "clang++", "cc")


@pytest.mark.parametrize("name, exe", [("rpi4", "aarch64-linux-gnu-g++"),
                                       ("rpi-armv7", "arm-linux-gnueabihf-g++")])
def test_cross_compilers_are_found(name: str, exe: str):
    if shutil.which(exe) is None:
        pytest.skip(f"{exe} not installed")
    cc = find_compiler(load_target(name))
    assert Path(cc.path).name == exe
    assert cc.cross == (machine_arch() != load_target(name).arch)


def test_missing_toolchain_names_the_debian_package(tmp_path: Path):
    text = BOARD.replace('[toolchain]\ntriple = "aarch64-linux-gnu"',
                         '[toolchain]\ntriple = "aarch64-none-linux-gnu"\n'
                         'compiler = "no-such-g++"\ndebian_package = "g++-no-such-package"')
    spec = parse_target(text, "test")
    with pytest.raises(ToolchainError) as e:
        find_compiler(spec)
    msg = str(e.value)
    assert "apt-get install g++-no-such-package" in msg
    assert "--cc" in msg and "no-such-g++" in msg


def test_cc_override_is_checked():
    if machine_arch() != "x86_64" or shutil.which("g++") is None:
        pytest.skip("needs an x86_64 host with g++")
    with pytest.raises(ToolchainError, match="produces code for"):
        find_compiler(load_target("rpi4"), "g++")  # a host compiler for an aarch64 target
    with pytest.raises(ToolchainError, match="no such compiler"):
        find_compiler(load_target("rpi4"), "/nonexistent/aarch64-g++")


# ---------------------------------------------------------------- CLI


def test_cli_targets_list_and_show(cli_runner):
    r = cli_runner("targets", "list")
    assert r.exit_code == 0, r.output
    for name in BUILTIN:
        assert name in r.output
    assert "cortex-a72" in r.output

    r = cli_runner("targets", "show", "rpi4")
    assert r.exit_code == 0, r.output
    assert 'mcpu = "cortex-a72"' in r.output and 'mattr = ["+neon"]' in r.output

    r = cli_runner("targets", "show", "rpi-armv7", "--json")
    assert r.exit_code == 0, r.output
    import json

    d = json.loads(r.stdout)
    assert d["tvm"]["mfloat-abi"] == "hard" and d["arch"] == "armv7"


def test_cli_targets_list_does_not_load_tvm():
    """Listing reads TOML files and asks the compilers; detecting the host's CPU would load
    TVM (and torch through it), so the list shows the host's mcpu as written."""
    code = ("import sys\nfrom lprnet_edge.cli.main import cli\n"
            "cli(['targets', 'list'], standalone_mode=False)\n"
            "print('loaded:', sorted(m for m in ('tvm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True,
                         check=True).stdout
    assert "host" in out and "native" in out
    assert "loaded: []" in out


def test_cli_targets_show_unknown(cli_runner):
    r = cli_runner("targets", "show", "nope")
    assert_user_error(r, "unknown target 'nope'", "rpi4", "host")


def test_cli_targets_show_file(cli_runner, tmp_path: Path):
    p = _write(tmp_path / "b.toml", BOARD)
    r = cli_runner("targets", "show", "--target-file", str(p))
    assert r.exit_code == 0, r.output
    assert 'name = "myboard"' in r.output and "cortex-a55" in r.output


def test_cli_targets_list_shows_a_broken_user_file(cli_runner, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    d = tmp_path / "t"
    _write(d / "broken.toml", "arch = 'mips'\n[tvm]\nkind = 'llvm'\n")
    monkeypatch.setenv("LPRNET_EDGE_TARGETS", str(d))
    r = cli_runner("targets", "list")
    assert r.exit_code == 0, r.output
    assert "broken" in r.output and "INVALID" in r.output and "rpi4" in r.output


def test_host_mattr_follows_cpuinfo():
    """The host target carries the features /proc/cpuinfo lists, and switches off the ones its
    CPU name implies but the machine (e.g. a VM) lacks."""
    from lprnet_edge.compiler.target import cpu_flags, host_mattr

    avx2_only = "processor\t: 0\nflags\t\t: fpu sse4_1 sse4_2 avx avx2 fma f16c\n"
    m = host_mattr("znver4", avx2_only)
    assert {"+avx2", "+fma", "-avx512f", "-avx512vnni"} <= set(m)
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid asimddp\n"
    assert {"+neon", "+dotprod", "-i8mm"} <= set(host_mattr("cortex-a76", arm))
    assert host_mattr("znver4", "no flags here\n") == []
    host = load_target("host")
    flags = cpu_flags()
    if host.tvm.get("mcpu") and flags and "asimd" not in flags:
        mattr = set(host.tvm["mattr"])
        for flag, feat in (("avx2", "avx2"), ("avx512f", "avx512f"), ("fma", "fma")):
            assert (("+" if flag in flags else "-") + feat) in mattr
