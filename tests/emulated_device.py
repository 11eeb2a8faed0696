"""The emulated Raspberry Pi 4 (``scripts/emulated-pi``) for tests: a helper class and a fixture.

The device is an aarch64 Debian 12 userland under qemu-user, reached over real SSH on 127.0.0.1
(see docs/emulated-pi.md). The ``emulated_pi`` fixture (session scope) builds the rootfs (or
reuses the cached tarball), starts one device in a temporary directory and always stops it by
its pid at the end. It skips only where the device cannot run at all: not root, or qemu cannot
be installed; any other failure is an error, so CI really runs on the device.

A test module uses it with::

    pytest_plugins = ["emulated_device"]

    @pytest.mark.slow
    @pytest.mark.device
    def test_something(emulated_pi):
        out = emulated_pi.run(f"{emulated_pi.python} -c 'import tvm.runtime'")
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "emulated-pi"
EXIT_NOT_RUNNING = 3  # scripts/emulated-pi status
EXIT_HOST_TOOLS = 4  # scripts/emulated-pi: qemu & co. cannot be installed
BUILD_TIMEOUT = 3600  # s: ~8 min from scratch, seconds from the cached tarball
START_TIMEOUT = 900  # s: unpack + sshd + first `import tvm.runtime` under emulation
STOP_TIMEOUT = 120


class DeviceUnavailable(RuntimeError):
    """This host cannot run the emulated device at all (not root, or qemu cannot be installed)."""


class DeviceError(RuntimeError):
    """The emulated device failed to build, start or stop."""


def parse_env(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of ``device.env`` (no quoting: the script refuses paths with spaces)."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    return env


def unavailable_reason() -> str | None:
    """Why the device cannot run here, or None. Only root can mount and register binfmt_misc."""
    if os.geteuid() != 0:
        return "the emulated Raspberry Pi needs root (binfmt_misc, mounts, chroot, namespaces)"
    if not SCRIPT.is_file():
        return f"{SCRIPT} is missing"
    return None


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run scripts/emulated-pi; its progress (stderr) goes to the test output as it comes."""
    try:
        return subprocess.run(["bash", str(SCRIPT), *args], stdout=subprocess.PIPE, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise DeviceError(f"scripts/emulated-pi {' '.join(args)} took more than {timeout} s") from e


def build(force: bool = False) -> None:
    """Build the rootfs tarball, or reuse the cached one (``--force`` rebuilds it)."""
    reason = unavailable_reason()
    if reason:
        raise DeviceUnavailable(reason)
    r = _script("build", *(["--force"] if force else []), timeout=BUILD_TIMEOUT)
    if r.returncode == EXIT_HOST_TOOLS:
        raise DeviceUnavailable("qemu-user-static / debootstrap cannot be installed on this host")
    if r.returncode != 0:
        raise DeviceError(f"scripts/emulated-pi build failed (exit {r.returncode}); see its log")


def pids_in_pidns(pidns: int) -> list[int]:
    """Host pids of every process in the PID namespace with inode ``pidns``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry.name}/ns/pid").st_ino == pidns:
                    found.append(int(entry.name))
    return found


def pids_in_group(pgid: int) -> list[int]:
    """Host pids of every process in process group ``pgid``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'.
                if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                    found.append(int(entry.name))
    return found


class EmulatedPi:
    """One emulated device: ``start()``/``stop()`` call the script and read ``device.env``.

    Attributes once started: ``host``, ``port``, ``user``, ``key_path``, ``known_hosts_path``,
    ``pid`` (its session and process-group leader), ``pidns`` (inode of its PID namespace),
    ``root`` (the chroot directory on the host) and ``python`` (the device's venv python).
    """

    def __init__(self, device_dir: str | Path | None = None, port: int | None = None) -> None:
        self.device_dir = Path(device_dir).absolute() if device_dir else None
        self.requested_port = port
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.user = "pi"
        self.key_path: Path | None = None
        self.known_hosts_path: Path | None = None
        self.pid: int | None = None
        self.pidns: int | None = None
        self.root: Path | None = None
        self.python = "/home/pi/.lprnet-edge/venv/bin/python"

    def _dir_args(self) -> list[str]:
        return ["--dir", str(self.device_dir)] if self.device_dir else []

    def _load_env(self, text: str) -> None:
        env = parse_env(text)
        try:
            self.host = env["HOST"]
            self.port = int(env["PORT"])
            self.user = env["USER"]
            self.key_path = Path(env["KEY"])
            self.known_hosts_path = Path(env["KNOWN_HOSTS"])
            self.pid = int(env["PID"])
            self.pidns = int(env["PIDNS"]) if env.get("PIDNS") else None
            self.root = Path(env["ROOT"]) if env.get("ROOT") else None
            self.python = env.get("PYTHON", self.python)
        except (KeyError, ValueError) as e:
            raise DeviceError(f"unexpected device.env from scripts/emulated-pi: {text!r}") from e

    def start(self) -> EmulatedPi:
        args = ["start", *self._dir_args()]
        if self.requested_port:
            args += ["--port", str(self.requested_port)]
        r = _script(*args, timeout=START_TIMEOUT)
        if r.returncode != 0:
            raise DeviceError(f"scripts/emulated-pi start failed (exit {r.returncode})")
        self._load_env(r.stdout)
        return self

    def status(self) -> int:
        """The script's status exit code: 0 running, 3 not running."""
        return _script("status", *self._dir_args(), timeout=60).returncode

    def processes(self) -> list[int]:
        """Host pids still belonging to the device: its process group or its PID namespace."""
        pids: set[int] = set()
        if self.pid:
            pids.update(pids_in_group(self.pid))
        if self.pidns:
            pids.update(pids_in_pidns(self.pidns))
        return sorted(pids)

    def stop(self) -> None:
        """Stop through the script, then make sure by pid that nothing of the device is left."""
        error = None
        try:
            r = _script("stop", *self._dir_args(), timeout=STOP_TIMEOUT)
            if r.returncode != 0:
                error = f"scripts/emulated-pi stop failed (exit {r.returncode})"
        except DeviceError as e:
            error = str(e)
        left = self.processes()
        if left:  # the script could not do it: kill by pid, then report
            if self.pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
            for p in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
            error = (error or "") + f" processes {left} were left after stop and were killed"
        if error:
            raise DeviceError(error.strip())

    def clean(self) -> None:
        """Stop and delete the unpacked device directory."""
        r = _script("clean", *self._dir_args(), timeout=STOP_TIMEOUT)
        if r.returncode != 0:
            raise DeviceError(f"scripts/emulated-pi clean failed (exit {r.returncode})")

    def __enter__(self) -> EmulatedPi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- talking to it ------------------------------------------------------------------------

    def ssh_argv(self, command: str) -> list[str]:
        """OpenSSH client argv: this key only, host key checked against known_hosts."""
        options = ["BatchMode=yes", "IdentitiesOnly=yes", "StrictHostKeyChecking=yes",
                   f"UserKnownHostsFile={self.known_hosts_path}",
                   "GlobalKnownHostsFile=/dev/null", "ConnectTimeout=30"]
        return ["ssh", "-F", "/dev/null", "-i", str(self.key_path), "-p", str(self.port),
                *(arg for o in options for arg in ("-o", o)), f"{self.user}@{self.host}", command]

    def run(self, command: str | list[str], timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the device with the OpenSSH client (raises on non-zero exit)."""
        if not isinstance(command, str):
            command = shlex.join(command)
        return subprocess.run(self.ssh_argv(command), capture_output=True, text=True,
                              timeout=timeout, check=True)

    def connect(self, timeout: float = 60) -> Any:
        """A connected ``paramiko.SSHClient`` that rejects any host key not in known_hosts."""
        import paramiko

        client = paramiko.SSHClient()
        client.load_host_keys(str(self.known_hosts_path))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(self.host, port=self.port, username=self.user,
                       key_filename=str(self.key_path), look_for_keys=False, allow_agent=False,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
        return client


def build_or_skip() -> None:
    """:func:`build`, skipping the test only where the device cannot run at all."""
    try:
        build()
    except DeviceUnavailable as e:
        pytest.skip(f"emulated Raspberry Pi unavailable: {e}")


@pytest.fixture(scope="session")
def emulated_pi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedPi]:
    """A running emulated Raspberry Pi 4 for the whole session, stopped by pid at the end."""
    build_or_skip()
    device = EmulatedPi(tmp_path_factory.mktemp("emulated-pi"))
    try:
        device.start()
        yield device
    finally:
        try:
            device.stop()
        finally:
            device.clean()
