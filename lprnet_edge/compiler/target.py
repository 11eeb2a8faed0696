"""Compilation targets as data: ``targets/*.toml`` (packaged) plus the user's own files.

A target file says what to generate code for (``[tvm]``: the TVM target dict), how to link it
(``[toolchain]``), and how to reach the device (``[device]``). Search order for a name:
``$LPRNET_EDGE_TARGETS`` (one or more directories, ``:``-separated), then
``$XDG_CONFIG_HOME/lprnet-edge/targets`` (default ``~/.config/lprnet-edge/targets``), then the
packaged targets; a user file with a packaged name overrides it. A path to a ``.toml`` file
(``--target-file``) is loaded as is.

Loading a target does not need the TVM compiler, except to detect the CPU of ``host``.
"""

from __future__ import annotations

import functools
import json
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lprnet_edge.runtime.artifact import machine_arch
from lprnet_edge.runtime.errors import LprnetEdgeError

ARCHES = ("x86_64", "aarch64", "armv7")
_TOP_KEYS = {"name", "description", "arch", "tvm", "toolchain", "device"}
_TOOLCHAIN_KEYS = {"triple", "compiler", "debian_package", "options"}
# The [device] keys and their types: a misspelled key would silently fall back to a default.
_DEVICE_TYPES: dict[str, type | tuple[type, ...]] = {
    "host": str, "ssh_user": str, "ssh_port": int, "rpc_port": int, "rpc_key": str,
    "num_threads": int, "python": str, "workdir": str,
}
# The options TVM's "llvm" target kind accepts (``TargetKind.options_from_name("llvm")``),
# so a target file is checked without loading TVM; other kinds are checked by TVM itself.
LLVM_KEYS = frozenset({
    "kind", "keys", "tag", "device", "model", "libs", "host", "from_device",
    "target_device_type", "mattr", "mcpu", "mtriple", "mfloat-abi", "mabi", "num-cores",
    "fast-math", "fast-math-nnan", "fast-math-ninf", "fast-math-nsz", "fast-math-arcp",
    "fast-math-contract", "fast-math-reassoc", "opt-level", "cl-opt", "jit", "vector-width",
})
# Words in a target file that mean "this machine's value", resolved by load_target.
_AUTO = ("native", "auto")


@dataclass(frozen=True)
class TargetSpec:
    """One resolved target: ``tvm`` is ready for ``tvm.target.Target(spec.tvm)``."""

    name: str
    description: str
    arch: str  # x86_64 | aarch64 | armv7 (manifest.machine_arch() names)
    tvm: dict[str, Any]
    toolchain: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it came from
    notes: tuple[str, ...] = ()  # what was detected or could not be (host)

    @property
    def is_native(self) -> bool:
        """True if modules built for it run on this machine (no cross compiler needed)."""
        return self.arch == machine_arch()

    @property
    def cores(self) -> int:
        """The cores its runtime runs on (``num-cores``; 1 when the target does not say)."""
        return int(self.tvm.get("num-cores") or 1)

    @property
    def triple(self) -> str | None:
        return self.toolchain.get("triple") or self.tvm.get("mtriple")

    @property
    def num_threads(self) -> int | None:
        n = self.device.get("num_threads")
        return int(n) if n else None

    def tvm_target(self) -> Any:
        """The ``tvm.target.Target`` (imports the TVM compiler).

        An ``mcpu`` LLVM does not know is an error here: LLVM would only log it and quietly
        generate code for a generic CPU.
        """
        import tvm

        mcpu = self.tvm.get("mcpu")
        if self.tvm.get("kind") == "llvm" and isinstance(mcpu, str):
            from tvm.target import codegen

            triple = self.tvm.get("mtriple") or str(codegen.llvm_get_system_triple())
            if not codegen.llvm_is_valid_cpu(mcpu, triple):
                raise LprnetEdgeError(
                    f"target {self.name!r} ({self.source}): LLVM does not know mcpu "
                    f"{mcpu!r} for {triple} (it would silently build for a generic CPU)")
        try:
            return tvm.target.Target(dict(self.tvm))
        except Exception as e:  # TVM raises ValueError / TVMError for bad keys
            raise LprnetEdgeError(
                f"target {self.name!r} ({self.source}): TVM rejects the [tvm] table: "
                f"{(str(e).strip().splitlines() or [type(e).__name__])[-1]}"
            ) from e

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "arch": self.arch,
            "tvm": dict(self.tvm),
            "toolchain": dict(self.toolchain),
            "device": dict(self.device),
            "source": self.source,
            **({"notes": list(self.notes)} if self.notes else {}),
        }

    def to_toml(self) -> str:
        """The resolved target as TOML (what ``lprnet-edge targets show`` prints)."""
        lines = [f"# source: {self.source}"]
        lines += [f"# {n}" for n in self.notes]
        lines += [f"name = {_toml_value(self.name)}",
                  f"description = {_toml_value(self.description)}",
                  f"arch = {_toml_value(self.arch)}"]
        for table in ("tvm", "toolchain", "device"):
            d = getattr(self, table)
            if d:
                lines.append(f"\n[{table}]")
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items()]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- search paths


def user_target_dirs() -> list[Path]:
    dirs = []
    if env := os.environ.get("LPRNET_EDGE_TARGETS"):
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    dirs.append(Path(base) / "lprnet-edge" / "targets")
    return dirs


def _packaged() -> dict[str, Any]:
    root = resources.files("lprnet_edge.targets")
    return {f.name[:-5]: f for f in root.iterdir() if f.name.endswith(".toml")}


def _available() -> dict[str, Any]:
    """name -> file (Path or packaged resource); user directories win over packaged files."""
    found: dict[str, Any] = dict(_packaged())
    for d in reversed(user_target_dirs()):  # earlier directories take precedence
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found[p.stem] = p
    return found


def target_names() -> list[str]:
    return sorted(_available())


def list_targets() -> list[TargetSpec]:
    """Every known target, resolved, sorted by name (a broken user file raises)."""
    return [load_target(n) for n in target_names()]


def load_target(name_or_path: str | Path, detect_cpu: bool = True) -> TargetSpec:
    """A target by name (``rpi4``) or a path to a TOML file. ``detect_cpu=False`` leaves
    ``mcpu = "native"`` as written: detecting the CPU loads TVM, seconds a listing need not
    pay."""
    s = str(name_or_path)
    p = Path(s)
    if s.endswith(".toml") or os.sep in s:
        if not p.is_file():
            raise LprnetEdgeError(f"target file {p}: no such file")
        return parse_target(p.read_bytes(), str(p), default_name=p.stem, detect_cpu=detect_cpu)
    found = _available()
    if s not in found:
        raise LprnetEdgeError(f"unknown target {s!r}: use one of {sorted(found)} "
                              "(or --target-file PATH)")
    res = found[s]
    return parse_target(res.read_bytes(), str(res), default_name=s, detect_cpu=detect_cpu)


# ---------------------------------------------------------------- parsing and checks


def parse_target(data: bytes | str, source: str, default_name: str | None = None,
                 detect_cpu: bool = True) -> TargetSpec:
    """Validate a target file's content; every error names ``source``."""

    def bad(msg: str) -> LprnetEdgeError:
        return LprnetEdgeError(f"target file {source}: {msg}")

    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        d = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise bad(f"not valid TOML ({e})") from e
    _refuse_unknown(d, _TOP_KEYS, "", bad)
    name = d.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise bad("'name' must be a non-empty string")
    desc = d.get("description", "")
    if not isinstance(desc, str):
        raise bad("'description' must be a string")
    for table in ("tvm", "toolchain", "device"):
        if table in d and not isinstance(d[table], dict):
            raise bad(f"[{table}] must be a table")
    tvm_d = _checked_tvm(dict(d.get("tvm") or {}), bad)
    toolchain = _checked_toolchain(dict(d.get("toolchain") or {}), bad)
    device = _checked_device(dict(d.get("device") or {}), bad)
    arch = d.get("arch")
    if arch in _AUTO:
        arch = machine_arch()
    if arch not in ARCHES:
        raise bad(f"arch {arch!r}: use one of {list(ARCHES)} (or \"native\")")
    notes = _resolve_auto(tvm_d, arch, detect_cpu, bad)
    for where, triple in (("[tvm] mtriple", tvm_d.get("mtriple")),
                          ("[toolchain] triple", toolchain.get("triple"))):
        if isinstance(triple, str) and triple_arch(triple) not in (None, arch):
            raise bad(f"{where} {triple!r} is for {triple_arch(triple)}, but arch is {arch!r}")
    return TargetSpec(name=name, description=desc, arch=arch, tvm=tvm_d, toolchain=toolchain,
                      device=device, source=source, notes=tuple(notes))


def _checked_tvm(tvm_d: dict[str, Any], bad: Callable[[str], LprnetEdgeError]
                 ) -> dict[str, Any]:
    if not isinstance(tvm_d.get("kind"), str):
        raise bad("[tvm] needs kind = \"llvm\" (the TVM target kind)")
    if tvm_d["kind"] == "llvm":
        _refuse_unknown(tvm_d, LLVM_KEYS, "[tvm] ", bad)
    for k, v in tvm_d.items():
        if not _scalar_or_str_list(v):
            raise bad(f"[tvm] {k}: expected a string, number, boolean or list of strings")
    return tvm_d


def _checked_toolchain(toolchain: dict[str, Any], bad: Callable[[str], LprnetEdgeError]
                       ) -> dict[str, Any]:
    _refuse_unknown(toolchain, _TOOLCHAIN_KEYS, "[toolchain] ", bad)
    for k in ("triple", "debian_package"):
        if k in toolchain and not isinstance(toolchain[k], str):
            raise bad(f"[toolchain] {k} must be a string")
    for k in ("compiler", "options"):
        v = toolchain.get(k)
        if v is not None and not (isinstance(v, str) or _str_list(v)):
            raise bad(f"[toolchain] {k} must be a string or a list of strings")
    return toolchain


def _checked_device(device: dict[str, Any], bad: Callable[[str], LprnetEdgeError]
                    ) -> dict[str, Any]:
    _refuse_unknown(device, set(_DEVICE_TYPES), "[device] ", bad)
    for k, typ in _DEVICE_TYPES.items():
        if k in device and (not isinstance(device[k], typ) or isinstance(device[k], bool)):
            raise bad(f"[device] {k} must be of type {typ.__name__}")  # type: ignore[union-attr]
    return device


def _resolve_auto(tvm_d: dict[str, Any], arch: str, detect_cpu: bool,
                  bad: Callable[[str], LprnetEdgeError]) -> list[str]:
    """Replace "native"/"auto" in ``tvm_d`` by this machine's values; returns the notes."""
    notes: list[str] = []
    if tvm_d.get("num-cores") in _AUTO:
        tvm_d["num-cores"] = os.cpu_count() or 1
    if tvm_d.get("mcpu") not in _AUTO:
        return notes
    if arch != machine_arch():
        raise bad("mcpu = \"native\" only makes sense for this machine's architecture")
    if not detect_cpu:
        return ["mcpu: this machine's CPU, detected when a build loads the target"]
    cpu = detect_host_cpu()
    if cpu:
        tvm_d["mcpu"] = cpu
        notes.append(f"mcpu {cpu!r} detected on this machine")
        if "mattr" not in tvm_d and (mattr := host_mattr(cpu)):
            tvm_d["mattr"] = mattr
            notes.append("mattr from /proc/cpuinfo: " + " ".join(mattr))
    else:
        del tvm_d["mcpu"]
        notes.append("CPU not detected (TVM compiler not installed): generic code")
    return notes


def _refuse_unknown(table: dict[str, Any], allowed: set[str] | frozenset[str], where: str,
                    bad: Callable[[str], LprnetEdgeError]) -> None:
    unknown = set(table) - set(allowed)
    if unknown:
        raise bad(f"{where}unknown keys {sorted(unknown)}; use {sorted(allowed)}")


def triple_arch(triple: str) -> str | None:
    """The target architecture family of a GNU/LLVM triple, in ``ARCHES`` terms."""
    head = triple.split("-", 1)[0].lower()
    if head in ("aarch64", "arm64", "aarch64_be"):
        return "aarch64"
    if head.startswith(("armv7", "arm", "thumbv7")):
        return "armv7"
    if head in ("x86_64", "amd64"):
        return "x86_64"
    return None


@functools.lru_cache(maxsize=1)
def detect_host_cpu() -> str | None:
    """LLVM's name for this CPU (``znver1``, ``cortex-a72``...), or None without TVM.

    LLVM treats ``mcpu="native"`` as a generic CPU, so the name must be spelled out.
    """
    try:
        from tvm.target import codegen
    except Exception:  # noqa: BLE001 - runtime-only TVM, or no TVM at all
        return None
    try:
        cpu = str(codegen.llvm_get_system_cpu())
    except Exception:  # noqa: BLE001
        return None
    return cpu if cpu and cpu != "generic" else None


# /proc/cpuinfo flag -> LLVM feature: the vector units schedules and LLVM care about.
_X86_FLAGS = {
    "sse4_1": "sse4.1", "sse4_2": "sse4.2", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "f16c": "f16c", "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw",
    "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512_vnni": "avx512vnni",
    "avx_vnni": "avxvnni", "avx512_bf16": "avx512bf16",
}
_ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "fphp": "fullfp16", "i8mm": "i8mm"}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on ARM) from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(val.split())
    return set()


def host_mattr(cpu: str, cpuinfo: str | None = None) -> list[str]:
    """``mattr`` for the host: ``+f`` for each vector feature /proc/cpuinfo lists and ``-f``
    for one that ``cpu`` implies but this machine lacks (a VM that hides AVX-512 from a
    Zen 4 guest would otherwise get code that dies with SIGILL). Empty without cpuinfo."""
    flags = cpu_flags(cpuinfo)
    if not flags:
        return []
    table = _ARM_FLAGS if "asimd" in flags else _X86_FLAGS
    return [("+" if f in flags else "-") + llvm for f, llvm in table.items()]


def _scalar_or_str_list(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or _str_list(v)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _toml_key(k: str) -> str:
    return k if all(c.isalnum() or c in "-_" for c in k) else _toml_value(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)
