"""The cores the instrument models: what qemu emulates and what llvm-mca schedules for each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lprnet_edge.errors import LprnetEdgeError


@dataclass(frozen=True)
class CpuModel:
    """One core: qemu's ``-cpu`` (which features the guest sees), llvm-mca's ``-mcpu`` (whose
    scheduling model weighs the blocks) and the clocks figures are given at."""

    name: str
    arch: str
    qemu_cpu: str
    mca_cpu: str
    clocks_ghz: tuple[float, ...]
    board: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "arch": self.arch, "qemu_cpu": self.qemu_cpu,
                "mca_cpu": self.mca_cpu, "clocks_ghz": list(self.clocks_ghz),
                "board": self.board}


# LLVM has no Cortex-A72 model and schedules it as a Cortex-A57 (same FP width: one 128-bit
# FMA per cycle). Under cortex-a76 it uses that A57 model too; its Neoverse N1 model is of the
# A76's server sibling (the same two 128-bit FP pipes and dot products), so the A76 is
# weighed as an N1 while qemu still emulates a cortex-a76 (its features pick the code).
CPUS = {
    "cortex-a72": CpuModel("cortex-a72", "aarch64", "cortex-a72", "cortex-a72", (1.5, 1.8),
                           "Raspberry Pi 4"),
    "cortex-a76": CpuModel("cortex-a76", "aarch64", "cortex-a76", "neoverse-n1", (2.4,),
                           "Raspberry Pi 5"),
}
TARGET_CPU = {"rpi4": "cortex-a72", "rpi5": "cortex-a76"}


def cpu_model(name: str) -> CpuModel:
    """A board core by name (``cortex-a72``, ``cortex-a76``) or ``host`` for this x86 CPU."""
    if name == "host":
        return host_cpu()
    if name not in CPUS:
        raise LprnetEdgeError(f"unknown CPU {name!r}: use one of {', '.join(CPUS)} or host")
    return CPUS[name]


def _cpuinfo_fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out.setdefault(k.strip(), v.strip())
    return out


def llvm_x86_cpu(cpuinfo: str) -> str:
    """The LLVM scheduling model for this x86 CPU family. AMD Zen 3 and later map to znver3:
    the x86 validation compiles for this name and must stay at AVX2 (what qemu runs), and
    LLVM's Zen 4 model (also its znver5) weighs those AVX2 programs as its Zen 3 model does."""
    f = _cpuinfo_fields(cpuinfo)
    family, model = int(f.get("cpu family", "0")), int(f.get("model", "0"))
    if f.get("vendor_id") == "AuthenticAMD" or "AMD" in f.get("model name", ""):
        if family >= 0x19:
            return "znver3"
        return "znver2" if family == 0x17 and model >= 0x30 else "znver1"
    if "avx512f" in f.get("flags", "").split():
        return "skylake-avx512"
    return "haswell" if "avx2" in f.get("flags", "").split() else "x86-64"


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuModel:
    """This machine's core as qemu-x86_64 runs it: TCG's ``max`` (up to AVX2; qemu 7.2 has no
    AVX-512), weighed with the LLVM model of its family."""
    mca = llvm_x86_cpu(cpuinfo.read_text())
    return CpuModel(f"host-{mca}", "x86_64", "max", mca, (), "this x86 host")
