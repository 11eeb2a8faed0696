"""A real OpenSSH server on 127.0.0.1 of this (x86) machine, for fast tests of the SSH mechanics.

Started as root (``PermitRootLogin prohibit-password``) with a throwaway host key, a throwaway
client key in its own authorized_keys, its own pid file and log; stopped by pid. Tests log in
as the current user: the "device" is this machine, its python the test's interpreter.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "lprnet-edge-test",
                    "-f", str(path)], check=True)
    return path


@dataclass
class Sshd:
    root: Path
    port: int
    user: str
    key_path: Path
    known_hosts_path: Path
    host_key_pub: Path
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "sshd.log"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def target(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        cfg = self.root / "sshd_config"
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(cfg), "-p", str(self.port),
             "-o", "ListenAddress=127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("sshd did not listen in time")

    def session_pids(self) -> list[int]:
        """Per-connection sshd processes (children of the listener, which setsid())."""
        if self.proc is None:
            return []
        found, frontier = [], [self.proc.pid]
        while frontier:
            parent = frontier.pop()
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == parent:
                    found.append(int(d.name))
                    frontier.append(int(d.name))
        return found

    def stop(self) -> None:
        """Kill the listener and every connection it spawned (by pid)."""
        pids = self.session_pids()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def make_sshd(root: Path) -> Sshd:
    root.mkdir(parents=True, exist_ok=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    host_key = keygen(root / "host_ed25519")
    client_key = keygen(root / "client_ed25519")
    auth = root / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), auth)
    port = free_port()
    pub = host_key.with_suffix(".pub").read_text().split()
    known = root / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    (root / "sshd_config").write_text(
        f"HostKey {host_key}\n"
        f"PidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {auth}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "AllowTcpForwarding yes\n"
        "LoginGraceTime 30\n"
        "MaxStartups 50\n"
        "Subsystem sftp internal-sftp\n"
        "LogLevel INFO\n")
    return Sshd(root, port, user, client_key, known, host_key.with_suffix(".pub"))


@pytest.fixture(scope="session")
def host_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server not installed (apt-get install openssh-server)")
    if os.geteuid() != 0:
        pytest.skip("the test sshd runs as root")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    sshd = make_sshd(tmp_path_factory.mktemp("sshd"))
    sshd.start()
    try:
        yield sshd
    finally:
        sshd.stop()


@pytest.fixture
def fresh_sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A private sshd for a test that stops or breaks it."""
    if not Path(SSHD).exists() or os.geteuid() != 0:
        pytest.skip("needs root and openssh-server")
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = make_sshd(tmp_path / "sshd")
    sshd.start()
    try:
        yield sshd
    finally:
        sshd.stop()
