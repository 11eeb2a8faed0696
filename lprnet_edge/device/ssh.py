"""SSH to a device (paramiko): verified host keys, key auth, timeouts, clear errors.

Host side only (``lprnet-edge[host]`` pulls paramiko in). Every failure a user can meet --
connection refused, no route, silent server, authentication refused, unknown or changed host
key, connection lost half way -- becomes a :class:`DeviceError` that says what happened and
what to do. Host keys are checked against ``known_hosts`` (``~/.ssh/known_hosts`` or an explicit
file); a host that is not there is refused unless ``accept_new_host=True`` (``--accept-new-host``),
which records it. A password, when one is used (``$LPRNET_EDGE_SSH_PASSWORD``), is never put in
a message or a log line.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import logging
import os
import re
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lprnet_edge.runtime.errors import DeviceError

DEFAULT_PORT = 22
CONNECT_TIMEOUT = 15.0
PASSWORD_ENV = "LPRNET_EDGE_SSH_PASSWORD"

_HOST_RE = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<h6>[^\]]+)\]|(?P<host>[^:@\s\[\]]+))"
                      r"(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class HostSpec:
    """``user@host[:port]`` (``user@[::1]:2222`` for IPv6)."""

    host: str
    port: int = DEFAULT_PORT
    user: str = ""

    @classmethod
    def parse(cls, text: str, default_user: str | None = None) -> HostSpec:
        m = _HOST_RE.match(text.strip())
        if not m:
            raise DeviceError(f"bad --host {text!r}: expected user@host or user@host:port")
        port = int(m["port"]) if m["port"] else DEFAULT_PORT
        if not 0 < port < 65536:
            raise DeviceError(f"bad --host {text!r}: port {port} out of range")
        user = m["user"] or default_user or getpass.getuser()
        return cls(host=m["h6"] or m["host"], port=port, user=user)

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH names this host in known_hosts."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + ("" if self.port == DEFAULT_PORT else f":{self.port}")


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def fingerprint(key: Any) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint of a paramiko key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def default_known_hosts() -> Path:
    return Path.home() / ".ssh" / "known_hosts"


def quiet_paramiko_logging() -> None:
    """Keep paramiko's own log lines (a full traceback when a peer drops the connection) off
    stderr: every failure they describe becomes one :class:`DeviceError` here.

    paramiko logs from its transport thread through :mod:`logging`; with no handler anywhere,
    Python's last-resort handler prints WARNING and above to stderr. A NullHandler on the
    ``paramiko`` logger stops that, and an application that configures logging still gets
    the records through propagation."""
    logger = logging.getLogger("paramiko")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


class _UnknownHost(Exception):
    def __init__(self, key: Any) -> None:
        super().__init__("unknown host key")
        self.key = key


def _policy(accept_new: bool, known_hosts: Path, spec: HostSpec, accepted: list[str]) -> Any:
    import paramiko  # optional (lprnet-edge[host]): the CLI must start without it

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            if not accept_new:
                raise _UnknownHost(key)
            known_hosts.parent.mkdir(parents=True, exist_ok=True)
            line = f"{spec.known_hosts_name} {key.get_name()} {key.get_base64()}\n"
            with open(known_hosts, "a", encoding="utf-8") as f:
                f.write(line)
            accepted.append(f"{key.get_name()} {fingerprint(key)}")

    return Policy()


class SshConnection:
    """One SSH connection to a device: run commands, copy files over SFTP, forward a port."""

    def __init__(self, spec: HostSpec | str, key: str | Path | None = None,
                 known_hosts: str | Path | None = None, accept_new_host: bool = False,
                 timeout: float = CONNECT_TIMEOUT, password: str | None = None) -> None:
        self.spec = spec if isinstance(spec, HostSpec) else HostSpec.parse(spec)
        self.key = Path(key).expanduser() if key else None
        self.known_hosts = Path(known_hosts).expanduser() if known_hosts else default_known_hosts()
        self.accept_new_host = accept_new_host
        self.timeout = timeout
        self._password = password if password is not None else os.environ.get(PASSWORD_ENV)
        self.accepted_host_key: str | None = None
        self._client: Any = None
        self._sftp: Any = None

    # ------------------------------------------------------------ connection

    def connect(self) -> SshConnection:
        try:
            import paramiko  # optional (lprnet-edge[host]): the CLI must start without it
        except ImportError as e:
            raise DeviceError("paramiko is needed for SSH: pip install 'lprnet-edge[host]'") from e
        quiet_paramiko_logging()
        if self.key is not None and not self.key.is_file():
            raise DeviceError(f"SSH key {self.key} not found")
        client = paramiko.SSHClient()
        if self.known_hosts.is_file():
            try:
                client.load_host_keys(str(self.known_hosts))
            except (OSError, paramiko.SSHException) as e:
                raise DeviceError(f"cannot read known_hosts file {self.known_hosts}: {e}") from e
        elif not self.accept_new_host:
            raise DeviceError(
                f"known_hosts file {self.known_hosts} does not exist, so the identity of "
                f"{self.spec.host}:{self.spec.port} cannot be checked; give --known-hosts FILE "
                "or re-run with --accept-new-host to trust and record the device's key")
        accepted: list[str] = []
        client.set_missing_host_key_policy(
            _policy(self.accept_new_host, self.known_hosts, self.spec, accepted))
        t0 = time.monotonic()
        try:
            client.connect(**self._connect_kwargs())
        except (_UnknownHost, paramiko.SSHException, OSError, EOFError) as e:
            client.close()
            raise self._connect_error(e, time.monotonic() - t0) from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)
        self._client = client
        self.accepted_host_key = accepted[0] if accepted else None
        return self

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            hostname=self.spec.host, port=self.spec.port, username=self.spec.user,
            timeout=self.timeout, banner_timeout=self.timeout, auth_timeout=self.timeout,
            channel_timeout=self.timeout)
        if self.key is not None:
            kwargs.update(key_filename=str(self.key), look_for_keys=False, allow_agent=False)
        if self._password:
            kwargs["password"] = self._password
        return kwargs

    def _connect_error(self, e: BaseException, waited: float) -> DeviceError:
        """What a failed connection means for the user, and what to do about it."""
        import paramiko  # already imported by connect(); optional, see there

        where = f"{self.spec.host}:{self.spec.port}"
        if isinstance(e, _UnknownHost):
            return DeviceError(
                f"host key of {where} ({e.key.get_name()} {fingerprint(e.key)}) is not in "
                f"{self.known_hosts}. Check that fingerprint on the device "
                "(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), then re-run with "
                "--accept-new-host to trust and record it")
        if isinstance(e, paramiko.BadHostKeyException):
            return DeviceError(
                f"HOST KEY MISMATCH for {where}: the device presented {e.key.get_name()} "
                f"{fingerprint(e.key)} but {self.known_hosts} expects "
                f"{fingerprint(e.expected_key)}. The device was reinstalled, or someone is "
                "intercepting the connection. Nothing was sent. If the change is expected, "
                f"remove the old entry: ssh-keygen -R '{self.spec.known_hosts_name}' -f "
                f"{self.known_hosts}")
        if isinstance(e, paramiko.AuthenticationException):
            how = f"key {self.key}" if self.key else "the default keys / ssh-agent"
            if self._password:
                how += " and a password"
            return DeviceError(
                f"authentication failed for {self.spec.user}@{where} with {how}: is the public "
                f"key in ~{self.spec.user}/.ssh/authorized_keys on the device, and the user "
                "right?")
        if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
            refused = all(getattr(err, "errno", None) in (111, 61, 10061)
                          for err in e.errors.values())
            return (self._refused(where) if refused
                    else DeviceError(f"cannot connect to {where}: {e}"))
        if isinstance(e, ConnectionRefusedError):
            return self._refused(where)
        if isinstance(e, TimeoutError):
            return DeviceError(
                f"timed out after {self.timeout:g}s connecting to {where}: is the device on "
                "and reachable?")
        if isinstance(e, socket.gaierror):
            return DeviceError(f"cannot resolve host {self.spec.host!r}: {e.strerror}")
        if isinstance(e, paramiko.SSHException):
            return self._ssh_error(str(e), where, waited)
        return DeviceError(f"cannot connect to {where}: {_redact(str(e), self._password)}")

    @staticmethod
    def _refused(where: str) -> DeviceError:
        return DeviceError(f"connection refused by {where}: is sshd running on the device and "
                           "the port right?")

    def _ssh_error(self, msg: str, where: str, waited: float) -> DeviceError:
        if "banner" in msg.lower() or "no existing session" in msg.lower():
            if waited >= self.timeout * 0.9:
                return DeviceError(
                    f"timed out after {self.timeout:g}s waiting for the SSH greeting from "
                    f"{where}: the port answers but is not a working sshd")
            return DeviceError(
                f"{where} closed the connection before SSH could start: is it an sshd "
                "(right port), and does it accept this client (MaxStartups, hosts.allow)?")
        return DeviceError(f"SSH to {where} failed: {_redact(msg, self._password)}")

    def close(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> SshConnection:
        if self._client is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def transport(self) -> Any:
        t = self._client.get_transport() if self._client else None
        if t is None or not t.is_active():
            raise DeviceError(f"the connection to {self.spec} was lost")
        return t

    def _lost(self, doing: str, e: BaseException | None = None) -> DeviceError:
        detail = f" ({_redact(str(e), self._password)})" if e and str(e) else ""
        return DeviceError(f"the connection to {self.spec} was lost while {doing}{detail}")

    # ------------------------------------------------------------ commands

    def run(self, command: str, timeout: float | None = None, check: bool = True,
            on_stderr_line: Callable[[str], None] | None = None,
            stdin: bytes | None = None) -> CommandResult:
        """Run a shell command on the device and collect its output.

        ``timeout`` bounds the whole command (it is also killed on the device with coreutils
        ``timeout``); ``check`` turns a non-zero exit into a :class:`DeviceError`.
        """
        remote = command
        if timeout:
            remote = f"timeout -k 5 {int(timeout) + 1} sh -c {shlex.quote(command)}"
        try:
            chan = self.transport.open_session(timeout=self.timeout)
            chan.settimeout(1.0)
            chan.exec_command(remote)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
        except DeviceError:
            raise
        except Exception as e:
            raise self._lost(f"starting `{_short(command)}`", e) from None
        try:
            code, out, err = self._collect(chan, command, timeout, on_stderr_line)
        except DeviceError:
            raise
        except Exception as e:
            raise self._lost(f"running `{_short(command)}`", e) from None
        finally:
            chan.close()
        res = CommandResult(command, code, out, err)
        if code == -1:
            raise self._lost(f"running `{_short(command)}` (no exit status)")
        if timeout and code in (124, 137):
            raise DeviceError(f"`{_short(command)}` on {self.spec} did not finish in "
                              f"{timeout:g}s")
        if check and not res.ok:
            tail = (res.stderr.strip() or res.stdout.strip())[-2000:]
            raise DeviceError(f"`{_short(command)}` failed on {self.spec} (exit {code}): {tail}")
        return res

    def _collect(self, chan: Any, command: str, timeout: float | None,
                 on_stderr_line: Callable[[str], None] | None) -> tuple[int, str, str]:
        """Read a running command's stdout and stderr until it exits: (exit code or -1,
        stdout, stderr); stderr is also handed out line by line as it comes."""
        out, err = bytearray(), bytearray()
        pending = b""
        deadline = time.monotonic() + timeout + 10 if timeout else None
        while True:
            got = False
            while chan.recv_ready():
                out += chan.recv(65536)
                got = True
            while chan.recv_stderr_ready():
                data = chan.recv_stderr(65536)
                err += data
                got = True
                if on_stderr_line:
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        on_stderr_line(line.decode("utf-8", "replace"))
            if chan.exit_status_ready() and not chan.recv_ready() \
                    and not chan.recv_stderr_ready():
                break
            if chan.closed and not got:
                break
            if not self.transport.is_active():
                raise self._lost(f"running `{_short(command)}`")
            if deadline and time.monotonic() > deadline:
                chan.close()
                raise DeviceError(f"`{_short(command)}` on {self.spec} did not finish in "
                                  f"{timeout:g}s")
            if not got:
                select.select([chan], [], [], 0.2)
        code = chan.recv_exit_status() if chan.exit_status_ready() else -1
        if on_stderr_line and pending:
            on_stderr_line(pending.decode("utf-8", "replace"))
        return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    # ------------------------------------------------------------ files

    @property
    def sftp(self) -> Any:
        if self._sftp is None:
            try:
                self._sftp = self._client.open_sftp() if self._client else None
            except Exception as e:
                raise self._lost("opening SFTP", e) from None
            if self._sftp is None:
                raise DeviceError("not connected")
            self._sftp.get_channel().settimeout(max(self.timeout, 30.0))
        return self._sftp

    def home(self) -> str:
        try:
            return self.sftp.normalize(".")
        except DeviceError:
            raise
        except Exception as e:
            raise self._lost("reading the home directory", e) from None

    def put(self, local: str | Path, remote: str,
            progress: Callable[[int, int], None] | None = None) -> None:
        """Copy one file; ``progress(bytes_done, bytes_total)`` is called as it goes."""
        try:
            self.sftp.put(str(local), remote, callback=progress, confirm=True)
        except DeviceError:
            raise
        except OSError as e:
            if not self._alive():
                raise self._lost(f"uploading {Path(local).name}", e) from None
            raise DeviceError(f"upload of {Path(local).name} to {self.spec}:{remote} failed: "
                              f"{e}") from None
        except Exception as e:
            raise self._lost(f"uploading {Path(local).name}", e) from None

    def put_bytes(self, data: bytes, remote: str) -> None:
        try:
            with self.sftp.open(remote, "wb") as f:
                f.write(data)
        except DeviceError:
            raise
        except Exception as e:
            if not self._alive():
                raise self._lost(f"writing {remote}", e) from None
            raise DeviceError(f"cannot write {remote} on {self.spec}: {e}") from None

    def _alive(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return bool(t and t.is_active())

    # ------------------------------------------------------------ port forwarding

    @contextlib.contextmanager
    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> Iterator[int]:
        """Listen on a free 127.0.0.1 port here; each connection is tunnelled (``direct-tcpip``)
        to ``remote_host:remote_port`` as seen from the device. Yields the local port."""
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        srv.settimeout(0.5)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        transport = self.transport

        def copy(src: Any, dst: Any, send: str) -> None:
            # One thread per direction with blocking calls: no lost wake-ups, no deadlock.
            try:
                while not stop.is_set():
                    data = src.recv(65536)
                    if not data:
                        break
                    getattr(dst, send)(data)
            except (OSError, EOFError):
                pass
            finally:
                for end in (src, dst):
                    with contextlib.suppress(Exception):
                        end.close()

        def accept() -> None:
            while not stop.is_set():
                try:
                    sock, peer = srv.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break
                try:
                    chan = transport.open_channel("direct-tcpip", (remote_host, remote_port),
                                                  peer, timeout=self.timeout)
                except Exception:
                    sock.close()
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(None)
                for src, dst in ((sock, chan), (chan, sock)):
                    t = threading.Thread(target=copy, args=(src, dst, "sendall"), daemon=True)
                    t.start()
                    threads.append(t)

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        try:
            yield srv.getsockname()[1]
        finally:
            stop.set()
            srv.close()
            acceptor.join(timeout=2)
            for t in threads:
                t.join(timeout=2)


def _short(command: str, n: int = 120) -> str:
    return command if len(command) <= n else command[: n - 3] + "..."


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text
