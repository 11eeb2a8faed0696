"""The aarch64 root filesystem a local estimate runs its guest Python in.

``qemu-aarch64 -L ROOTFS`` finds the guest's loader and libraries there. The emulated Pi's
rootfs (``scripts/emulated-pi build``) has Python 3 and the device venv with the aarch64 TVM
runtime, numpy and OpenCV, which is exactly what a board has: it is unpacked once into the
cache (again when the tarball changes). ``$LPRNET_EDGE_AARCH64_ROOTFS`` points at another one.

qemu 7.2 passes the host's x86 ``/proc/cpuinfo`` through to an aarch64 guest, which runtimes
that detect the CPU (ONNX Runtime) cannot parse; with ``/proc`` not mounted in the rootfs, a
regular file ``ROOTFS/proc/cpuinfo`` is found first through ``-L``. It is written for the
core being emulated.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from lprnet_edge.errors import ToolchainError
from lprnet_edge.paths import cache_dir

from .cpus import CpuModel

VENV = "/home/pi/.lprnet-edge/venv"
GUEST_PYTHON = "/usr/bin/python3"
# CPU part numbers and the hwcaps a board's kernel prints (Features line).
_PARTS = {"cortex-a72": ("0xd08", "fp asimd evtstrm crc32 cpuid"),
          "cortex-a76": ("0xd0b", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
                                  "asimdhp cpuid asimdrdm lrcpc dcpop asimddp")}


def tarball() -> Path:
    base = os.environ.get("LPRNET_EDGE_DEVICE_CACHE") or cache_dir() / "emulated-pi"
    return Path(base) / "rootfs-rpi4.tar.zst"


def _unpack(src: Path, dest: Path) -> None:
    stamp = dest.parent / f".{dest.name}.stamp"
    want = f"{src.stat().st_size} {int(src.stat().st_mtime)}"
    if dest.is_dir() and stamp.is_file() and stamp.read_text() == want:
        return
    tmp = dest.with_name(dest.name + ".tmp")
    for d in (tmp, dest):
        shutil.rmtree(d, ignore_errors=True)
    tmp.mkdir(parents=True)
    with subprocess.Popen(["zstd", "-q", "-dc", str(src)], stdout=subprocess.PIPE) as z:
        proc = subprocess.run(["tar", "--numeric-owner", "-C", str(tmp), "-xf", "-"],
                              stdin=z.stdout, capture_output=True, text=True)
    if z.returncode or proc.returncode:
        raise ToolchainError(f"unpacking {src} failed: {proc.stderr.strip()}")
    tmp.rename(dest)
    stamp.write_text(want)


def aarch64_rootfs() -> Path:
    """An aarch64 rootfs with Python and the TVM runtime (unpacked into the cache if needed)."""
    if env := os.environ.get("LPRNET_EDGE_AARCH64_ROOTFS"):
        root = Path(env)
    else:
        src = tarball()
        if not src.is_file():
            raise ToolchainError(
                f"no aarch64 rootfs: build the emulated Pi's ({src}) with "
                "'scripts/emulated-pi build', or set LPRNET_EDGE_AARCH64_ROOTFS to a rootfs "
                f"with python3 and the TVM runtime in {VENV}")
        root = cache_dir() / "cost" / "rootfs-aarch64"
        _unpack(src, root)
    if not (root / GUEST_PYTHON.lstrip("/")).exists():
        raise ToolchainError(f"{root}: no {GUEST_PYTHON} in this aarch64 rootfs")
    return root


def cpuinfo_text(cpu: CpuModel, cores: int = 4) -> str:
    """A board's ``/proc/cpuinfo`` for ``cpu``: ARM implementer, part and hwcaps."""
    part, features = _PARTS.get(cpu.name, _PARTS["cortex-a72"])
    one = (f"BogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
           f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 3\n")
    return "".join(f"processor\t: {i}\n{one}\n" for i in range(cores))


def lay_cpuinfo(root: Path, cpu: CpuModel) -> None:
    """Write ``ROOTFS/proc/cpuinfo`` for ``cpu`` unless ``/proc`` is a mount there."""
    proc = root / "proc"
    if os.path.ismount(proc):
        return
    proc.mkdir(exist_ok=True)
    path, text = proc / "cpuinfo", cpuinfo_text(cpu)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def guest_site_packages(root: Path) -> str:
    """The device venv's site-packages as the guest sees it."""
    lib = root / VENV.lstrip("/") / "lib"
    found = sorted(lib.glob("python3*/site-packages"))
    if not found:
        raise ToolchainError(f"{root}: no device venv at {VENV} (python3 -m venv, then pip "
                             "install apache-tvm numpy there)")
    return "/" + str(found[-1].relative_to(root))
