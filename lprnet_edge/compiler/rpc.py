"""TVM RPC, client side: reach a device directly or through a tracker (running and timing a
module there is :mod:`lprnet_edge.compiler.session`, the same code as locally).

Also starts and stops a local RPC server or tracker (``python -m tvm.exec.rpc_server`` /
``rpc_tracker``) by process group, for tests and for users who want to tune against this
machine through RPC.

Everything that can hang (connecting, requesting a device from a tracker) runs with a
timeout and turns into a :class:`DeviceError` that says what was tried.
Only the TVM *runtime* is needed here (a device may have nothing else), except for
:func:`start_server` / :func:`start_tracker`, which run TVM's own scripts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lprnet_edge.compiler.worker_env import worker_env
from lprnet_edge.runtime.errors import DeviceError, LprnetEdgeError

DEFAULT_TIMEOUT_S = 10.0
KEY_GRACE_S = 8.0  # how long a tracker may show no free server with the requested key


def parse_hostport(value: str, what: str = "--rpc") -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; ``[::1]:9090`` works for IPv6."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LprnetEdgeError(f"{what} {value!r}: expected HOST:PORT (e.g. 192.168.1.20:9090)")
    return host, int(port)


def check_port(host: str, port: int, timeout: float = DEFAULT_TIMEOUT_S,
               what: str = "RPC server") -> None:
    """A plain TCP connect: fails fast (refused, no route, timeout) before TVM's own retries."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise DeviceError(f"cannot reach the {what} at {host}:{port}: {reason} (is it running, "
                          "and is the port open?)") from e


def with_timeout(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread; DeviceError if it does not finish in ``timeout`` s."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise DeviceError(f"{what}: no answer within {timeout:g}s")
    if "error" in box:
        e = box["error"]
        if isinstance(e, LprnetEdgeError):
            raise e
        raise DeviceError(f"{what}: {_last_line(e)}") from e
    return box.get("value")


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def connect(rpc: str | None = None, tracker: str | None = None, key: str | None = None,
            timeout: float = DEFAULT_TIMEOUT_S, session_timeout: float = 0) -> Any:
    """An RPC session: ``rpc="HOST:PORT"`` of a server, or ``tracker="HOST:PORT"`` + ``key``.

    ``session_timeout`` (s, 0 = none) lets the server end a session that runs too long.
    """
    from tvm import rpc as tvm_rpc

    if bool(rpc) == bool(tracker):
        raise LprnetEdgeError("give either --rpc HOST:PORT or --rpc-tracker HOST:PORT --rpc-key")
    if rpc:
        host, port = parse_hostport(rpc, "--rpc")
        check_port(host, port, timeout)
        return with_timeout(lambda: tvm_rpc.connect(host, port, session_timeout=session_timeout),
                             timeout, f"RPC server {host}:{port}")
    if not key:
        raise LprnetEdgeError("--rpc-tracker needs --rpc-key (the device key to request)")
    host, port = parse_hostport(tracker, "--rpc-tracker")  # type: ignore[arg-type]
    check_port(host, port, timeout, "RPC tracker")
    trk = with_timeout(lambda: tvm_rpc.connect_tracker(host, port), timeout,
                        f"RPC tracker {host}:{port}")
    # A server is absent from the tracker's list while it re-registers after each session
    # or idle timeout: look again for a few seconds before calling the key unknown.
    deadline = time.monotonic() + min(timeout, KEY_GRACE_S)
    keys = tracker_keys(trk, timeout)
    while key not in keys and time.monotonic() < deadline:
        time.sleep(0.5)
        keys = tracker_keys(trk, timeout)
    if key not in keys:
        raise DeviceError(f"RPC tracker {host}:{port} has no device with key {key!r} "
                          f"(registered: {sorted(keys) or 'none'}); start the device's server "
                          f"with --tracker {host}:{port} --key {key}")
    return with_timeout(lambda: trk.request(key, priority=1, session_timeout=session_timeout,
                                             max_retry=2),
                         timeout, f"request for device {key!r} from tracker {host}:{port}")


def tracker_keys(trk: Any, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, int]:
    """Device keys registered with a tracker session -> number of servers."""
    summary = with_timeout(trk.summary, timeout, "tracker summary")
    counts: dict[str, int] = {}
    for item in summary.get("server_info", []):
        k = str(item.get("key", "")).split(":", 1)[-1]
        counts[k] = counts.get(k, 0) + 1
    return counts


def check_reachable(rpc: str | None = None, tracker: str | None = None, key: str | None = None,
                    timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Open a session and ask the device something; DeviceError if anything fails."""
    sess = connect(rpc, tracker, key, timeout)
    exists = with_timeout(lambda: bool(sess.cpu(0).exist), timeout, "device query")
    if not exists:
        raise DeviceError("the RPC server answers but has no CPU device")
    return {"rpc": rpc, "tracker": tracker, "key": key}


def direct_session(rpc_config: Any) -> Any:
    """``f_create_session`` for MetaSchedule's RPCRunner: connect to the *server* at
    ``rpc_config.tracker_host:tracker_port`` directly (RPCRunner only knows trackers)."""
    from tvm import rpc as tvm_rpc

    return tvm_rpc.connect(rpc_config.tracker_host, int(rpc_config.tracker_port),
                           session_timeout=rpc_config.session_timeout_sec)


# ---------------------------------------------------------------- local server / tracker


@dataclass
class RPCProcess:
    """A server or tracker started by :func:`start_server` / :func:`start_tracker`."""

    kind: str
    pid: int
    host: str
    port: int
    log_path: str | None = None
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        stop_process(self.pid)

    def __enter__(self) -> RPCProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 60.0,
                  proc: subprocess.Popen | None = None, log_path: str | None = None) -> None:
    """Poll until something listens on ``host:port`` (TVM's server takes 6-9 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeviceError(f"the process listening on {host}:{port} exited with code "
                              f"{proc.returncode}{_log_tail(log_path)}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.25)
    raise DeviceError(f"nothing listens on {host}:{port} after {timeout:g}s{_log_tail(log_path)}")


def wait_for_key(tracker: str, key: str, timeout: float = 60.0) -> None:
    """Poll a tracker until a server with ``key`` has registered."""
    from tvm import rpc as tvm_rpc

    host, port = parse_hostport(tracker, "--rpc-tracker")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            trk = with_timeout(lambda: tvm_rpc.connect_tracker(host, port), 5.0, "tracker")
            if key in tracker_keys(trk, 5.0):
                return
        time.sleep(0.5)
    raise DeviceError(f"no server with key {key!r} registered with tracker {tracker} "
                      f"after {timeout:g}s")


def _log_tail(log_path: str | None, n: int = 8) -> str:
    if not log_path or not Path(log_path).is_file():
        return ""
    lines = Path(log_path).read_text(errors="replace").strip().splitlines()[-n:]
    return (" (log " + log_path + ": " + " | ".join(lines) + ")") if lines else ""


def _spawn(kind: str, args: list[str], host: str, port: int, log_path: str | None,
           wait: float | None, env: dict[str, str] | None) -> RPCProcess:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=worker_env(env))
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]
    handle = RPCProcess(kind, proc.pid, host, port, log_path, proc)
    if wait:
        try:
            wait_for_port(host, port, wait, proc, log_path)
        except BaseException:
            handle.stop()
            raise
    return handle


def start_tracker(host: str = "127.0.0.1", port: int | None = None,
                  log_path: str | None = None, wait: float | None = 60.0) -> RPCProcess:
    """``python -m tvm.exec.rpc_tracker`` in a new session (stop it with ``.stop()``)."""
    port = port or free_port(host)
    return _spawn("tracker", ["tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
                              "--port-end", str(port + 1)], host, port, log_path, wait, None)


def start_server(host: str = "127.0.0.1", port: int | None = None,
                 tracker: str | None = None, key: str | None = None,
                 load_library: Sequence[str] = (), log_path: str | None = None,
                 wait: float | None = 60.0, env: dict[str, str] | None = None) -> RPCProcess:
    """``python -m tvm.exec.rpc_server`` in a new session, polled until it listens.

    With ``tracker`` and ``key`` it registers with that tracker (wait for it with
    :func:`wait_for_key`). Its real loop runs in a child that survives SIGTERM to the parent,
    which is why it runs in its own process group and is stopped as a group.
    """
    port = port or free_port(host)
    args = ["tvm.exec.rpc_server", "--host", host, "--port", str(port),
            "--port-end", str(port + 1)]
    if tracker:
        args += ["--tracker", tracker, "--key", key or "lprnet-edge"]
    for lib in load_library:
        args += ["--load-library", lib]
    return _spawn("server", args, host, port, log_path, wait, env)


def stop_process(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the process group ``pid`` leads, then SIGKILL what is left after ``grace`` s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
