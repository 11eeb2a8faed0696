"""One-command board set-up: ``lprnet-edge device setup --host pi@HOST [--offline]``.

Over SSH, on the device:

1. checks ``uname -m`` and the python the venv is made from (``python3``, or ``--python``);
2. creates the runtime venv ``REMOTE_DIR/venv`` (``python3 -m venv``) unless it exists;
3. installs the runtime dependencies (:data:`RUNTIME_REQUIREMENTS`): from the board's own
   package index (``pip install``), or with ``offline`` from wheels downloaded *here* for the
   board's platform and Python (``pip download --platform manylinux_2_28_aarch64
   --only-binary=:all: --python-version 3.11``), uploaded, checked by sha256 on the device
   (``sha256sum -c``) and installed with ``pip install --no-index``;
4. installs lprnet_edge's runtime (``lprnet_edge/__init__.py`` + ``lprnet_edge/runtime/``, what
   ``deploy`` ships) into ``REMOTE_DIR/runtime`` and puts a ``lprnet_edge.pth`` in the venv's
   site-packages naming ``REMOTE_DIR/current/runtime`` first and ``REMOTE_DIR/runtime`` second:
   ``from lprnet_edge import Recognizer`` works in that venv for the user's own scripts, with
   the code of the current deployment once there is one (a rollback switches both);
5. checks, in a fresh login shell without PYTHONPATH, that ``from lprnet_edge import
   Recognizer``, numpy, OpenCV and ``tvm.runtime`` import.

Running it again is safe: an existing venv is kept, pip skips what is installed, the runtime
copy is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from shlex import quote
from typing import Any

from lprnet_edge.device.deploy import runtime_zip
from lprnet_edge.device.device import Device, Progress
from lprnet_edge.paths import cache_dir
from lprnet_edge.runtime.artifact import machine_arch
from lprnet_edge.runtime.errors import DeviceError, LprnetEdgeError, ToolchainError
from lprnet_edge.runtime.files import sha256_file

RUNTIME_REQUIREMENTS = ("numpy", "opencv-python-headless", "apache-tvm==0.27.*",
                        "apache-tvm-ffi==0.1.14.post1")
RPC_REQUIREMENTS = ("cloudpickle", "tornado", "psutil")  # TVM's RPC server (bench --rpc, tune)
# manylinux tag of the wheels per architecture (glibc 2.28+: Raspberry Pi OS bookworm has 2.36).
WHEEL_PLATFORMS = {"aarch64": "manylinux_2_28_aarch64", "x86_64": "manylinux_2_28_x86_64"}
PTH_NAME = "lprnet_edge.pth"
DOWNLOAD_TIMEOUT = 1800  # s for pip download on the host
INSTALL_TIMEOUT = 3600  # s for pip install on the device (slow boards, emulation)

_PROBE = ("import json, platform, sys, sysconfig; print(json.dumps({'machine': "
          "platform.machine(), 'python': '%d.%d' % sys.version_info[:2], "
          "'implementation': sys.implementation.name}))")
_CHECK = ("import json, sys; sys.modules['torch'] = None\n"
          "import lprnet_edge, numpy, cv2, tvm.runtime\n"
          "from lprnet_edge import Recognizer\n"
          "from tvm.runtime.vm import VirtualMachine\n"
          "print(json.dumps({'lprnet_edge': lprnet_edge.__version__, 'lprnet_edge_path': "
          "lprnet_edge.__file__, 'numpy': numpy.__version__, 'opencv': cv2.__version__, "
          "'tvm': tvm.__version__, 'python': sys.executable}))")


@dataclass(frozen=True)
class SetupResult:
    host: str
    venv: str
    machine: str
    python: str
    mode: str  # "index" (the board's package index) or "offline" (wheels uploaded from here)
    requirements: list[str]
    runtime: str  # where lprnet_edge's runtime was installed
    pth: str
    versions: dict[str, Any]
    wheels: list[dict[str, Any]] = field(default_factory=list)
    bytes_uploaded: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- host side: wheels


def wheel_platform(machine: str) -> str:
    """The ``pip download --platform`` tag for a device's ``uname -m``."""
    arch = machine_arch(machine)
    if arch not in WHEEL_PLATFORMS:
        raise DeviceError(
            f"no apache-tvm wheel exists for {machine}: a 32-bit OS (armv7) needs the TVM "
            "runtime built from source; flash Raspberry Pi OS 64-bit (aarch64) instead")
    return WHEEL_PLATFORMS[arch]


def download_wheels(requirements: list[str], platform: str, python: str,
                    dest: Path | None = None, log: Callable[[str], None] | None = None
                    ) -> list[Path]:
    """``pip download`` the wheels of ``requirements`` (with their dependencies) for another
    machine: binary wheels only, for ``platform`` and CPython ``python`` (``"3.11"``).

    ``dest`` defaults to a folder of the lprnet-edge cache per platform, Python and
    requirement set (so it holds exactly these wheels): a second set-up downloads nothing."""
    if dest is None:
        key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:8]
        dest = cache_dir() / "wheels" / f"{platform}-cp{python.replace('.', '')}-{key}"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
           "--only-binary=:all:", "--platform", platform, "--python-version", python,
           "--implementation", "cp", "-d", str(dest), *requirements]
    if log:
        log(f"downloading wheels for {platform}, Python {python} into {dest}")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ToolchainError(f"pip download did not finish in {DOWNLOAD_TIMEOUT} s; download "
                             "the wheels by hand and pass --wheels DIR") from None
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip())[-1200:]
        raise ToolchainError(f"pip download of the {platform} wheels failed (is the package "
                             f"index reachable from this host? or pass --wheels DIR): {tail}")
    return wheels_in(dest)


def wheels_in(folder: Path) -> list[Path]:
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        raise DeviceError(f"no .whl files in {folder}")
    return wheels


# ---------------------------------------------------------------- device side


def probe_python(dev: Device, python: str) -> dict[str, str]:
    """Machine, Python version and implementation of ``python`` on the device."""
    res = dev.sh(f"{quote(python)} -c {quote(_PROBE)}", check=False, timeout=300)
    try:
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise DeviceError(
            f"cannot run {python} on {dev.spec} ({(res.stderr.strip() or 'no output')[-300:]})"
            ": install Python 3 (`sudo apt-get install -y python3 python3-venv`) or give "
            "--python PATH") from None
    if info.get("implementation") != "cpython":
        raise DeviceError(f"{python} on {dev.spec} is {info.get('implementation')}, not "
                          "CPython: the TVM wheels need CPython")
    return info


def make_venv(dev: Device, base_python: str, step: Callable[[str], None]) -> str:
    """``REMOTE_DIR/venv`` (kept if it is already there); returns its python."""
    venv = f"{dev.root}/venv"
    py = f"{venv}/bin/python"
    if dev.sh(f"test -x {quote(py)} && {quote(py)} -c 'import pip'", check=False, timeout=300).ok:
        step(f"reusing the venv {venv}")
        return py
    step(f"creating the venv {venv} ({base_python} -m venv)")
    dev.sh(f"mkdir -p {quote(dev.root)}")
    res = dev.sh(f"{quote(base_python)} -m venv --clear {quote(venv)}", check=False, timeout=1800)
    if not res.ok:
        tail = (res.stderr.strip() or res.stdout.strip())[-600:]
        raise DeviceError(f"`{base_python} -m venv` failed on {dev.spec}: {tail}. On "
                          "Debian / Raspberry Pi OS: sudo apt-get install -y python3-venv")
    return py


def _pip_install(dev: Device, py: str, args: list[str], hint: str) -> None:
    res = dev.sh(f"{quote(py)} -m pip install --disable-pip-version-check --no-input "
                 + " ".join(quote(a) for a in args), check=False, timeout=INSTALL_TIMEOUT)
    if not res.ok:
        tail = (res.stderr.strip() or res.stdout.strip())[-1200:]
        raise DeviceError(f"pip install failed on {dev.spec}: {tail}. {hint}")


def install_from_index(dev: Device, py: str, requirements: list[str]) -> None:
    _pip_install(dev, py, requirements,
                 "Without network on the board, re-run with --offline (wheels downloaded on "
                 "this host and uploaded)")


def install_offline(dev: Device, py: str, requirements: list[str], wheels: list[Path],
                    progress: Progress | None, step: Callable[[str], None]) -> int:
    """Upload ``wheels``, check their sha256 on the device, ``pip install --no-index`` them.
    Returns the bytes uploaded."""
    total = sum(w.stat().st_size for w in wheels)
    sums = "".join(f"{sha256_file(w)}  {w.name}\n" for w in wheels)
    dev.mkdirs()
    job = f"{dev.root}/tmp/wheels-{secrets.token_hex(4)}"
    dev.sh(f"mkdir -p {quote(job)}")
    try:
        free = dev.free_bytes(job)
        if free < 3 * total:  # the wheels, then what they unpack to
            raise DeviceError(f"not enough disk space on {dev.spec}: {job} has "
                              f"{free / 1e6:.0f} MB free, the wheels need ~{3 * total / 1e6:.0f}"
                              " MB")
        step(f"uploading {len(wheels)} wheels ({total / 1e6:.1f} MB)")
        done = 0
        for w in wheels:
            dev.conn.put(w, f"{job}/{w.name}",
                         progress=(lambda d, _t, b=done: progress(b + d, total))
                         if progress else None)
            done += w.stat().st_size
        dev.conn.put_bytes(sums.encode(), f"{job}/SHA256SUMS")
        step("checking the wheels' sha256 on the device")
        res = dev.sh(f"cd {quote(job)} && sha256sum -c --quiet SHA256SUMS", check=False)
        if not res.ok:
            raise DeviceError(f"sha256 mismatch of the uploaded wheels on {dev.spec}: "
                              f"{(res.stdout + res.stderr).strip()[-600:]}")
        step("installing them with the device's pip (--no-index)")
        _pip_install(dev, py, ["--no-index", "--find-links", job, *requirements],
                     "The wheels were downloaded for the device's platform and Python; check "
                     "that its pip is recent enough for manylinux_2_28 (pip >= 20.3)")
    finally:
        try:
            dev.sh(f"rm -rf {quote(job)}", check=False, timeout=120)
        except LprnetEdgeError:
            pass
    return total


def install_runtime(dev: Device, py: str) -> tuple[str, str]:
    """lprnet_edge's runtime into ``REMOTE_DIR/runtime`` (replaced atomically) and a ``.pth``
    naming ``current/runtime`` then ``runtime``. Returns (runtime dir, pth path)."""
    target = f"{dev.root}/runtime"
    new = f"{dev.root}/.runtime-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="lprnet-setup-") as tmpd:
        rz = runtime_zip(Path(tmpd))
        dev.sh(f"mkdir -p {quote(new)}")
        dev.conn.put(rz, f"{new}/runtime.zip")
        want = sha256_file(rz)
    unzip = "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])"
    old = f"{dev.root}/.runtime-old-{secrets.token_hex(4)}"
    res = dev.sh(
        f"cd {quote(new)} && echo {want}'  runtime.zip' | sha256sum -c --quiet && "
        f"{quote(py)} -c {quote(unzip)} runtime.zip . && rm runtime.zip && "
        f"{quote(py)} -m compileall -q lprnet_edge >/dev/null && "
        f"{{ test ! -e {quote(target)} || mv -T {quote(target)} {quote(old)}; }} && "
        f"mv -T {quote(new)} {quote(target)} && rm -rf {quote(old)}", check=False, timeout=900)
    if not res.ok:
        dev.sh(f"rm -rf {quote(new)}", check=False)
        raise DeviceError(f"installing the runtime into {target} on {dev.spec} failed: "
                          f"{(res.stderr.strip() or res.stdout.strip())[-600:]}")
    site = dev.sh(f"{quote(py)} -c " + quote("import sysconfig; print(sysconfig.get_paths()"
                                       "['purelib'])"), timeout=300).stdout.strip()
    pth = f"{site}/{PTH_NAME}"
    # Lines of a .pth that name missing folders are skipped by `site`: before the first
    # deploy, `current/runtime` does not exist and the set-up copy is used.
    dev.conn.put_bytes(f"{dev.root}/current/runtime\n{target}\n".encode(), pth)
    return target, pth


def check_venv(dev: Device, py: str) -> dict[str, Any]:
    """Import the runtime in a fresh login shell from the home folder, without PYTHONPATH."""
    env = "env -u PYTHONPATH TVM_USE_RUNTIME_LIB=1 " if dev.runtime_lib_only else \
        "env -u PYTHONPATH "
    res = dev.sh(f"cd && {env}{quote(py)} -c {quote(_CHECK)}", check=False, timeout=900)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise DeviceError(f"the venv on {dev.spec} cannot import the runtime: "
                          f"{(res.stderr.strip() or res.stdout.strip())[-800:]}") from None


def setup_device(dev: Device, offline: bool = False, wheels_dir: str | Path | None = None,
                 base_python: str = "python3", rpc: bool = False,
                 progress: Progress | None = None,
                 on_step: Callable[[str], None] | None = None) -> SetupResult:
    """Create the runtime venv on the device and install what ``deploy`` and the user's own
    scripts need (see the module docstring). ``wheels_dir``: wheels already downloaded for
    the device (implies ``offline``)."""
    t0 = time.perf_counter()
    step = on_step or (lambda _s: None)
    reqs = list(RUNTIME_REQUIREMENTS) + (list(RPC_REQUIREMENTS) if rpc else [])
    step(f"checking {base_python} on the device")
    info = probe_python(dev, base_python)
    offline = offline or wheels_dir is not None
    wheels: list[Path] = []
    if offline:  # before touching the device: a failed download changes nothing there
        wheels = (wheels_in(Path(wheels_dir)) if wheels_dir else
                  download_wheels(reqs, wheel_platform(info["machine"]), info["python"],
                                  log=step))
    py = make_venv(dev, base_python, step)
    sent = 0
    if offline:
        sent = install_offline(dev, py, reqs, wheels, progress, step)
    else:
        step(f"installing {' '.join(reqs)} from the device's package index")
        install_from_index(dev, py, reqs)
    step("installing lprnet_edge's runtime into the venv")
    runtime, pth = install_runtime(dev, py)
    step("checking `from lprnet_edge import Recognizer` in the venv")
    versions = check_venv(dev, py)
    return SetupResult(
        host=str(dev.spec), venv=f"{dev.root}/venv", machine=info["machine"],
        python=info["python"], mode="offline" if offline else "index", requirements=reqs,
        runtime=runtime, pth=pth, versions=versions,
        wheels=[{"name": w.name, "size": w.stat().st_size} for w in wheels],
        bytes_uploaded=sent, seconds=time.perf_counter() - t0)
