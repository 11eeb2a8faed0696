"""SSH mechanics against a real sshd on 127.0.0.1: host keys, auth, timeouts, errors, tunnels."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from lprnet_edge.device.ssh import HostSpec, SshConnection
from lprnet_edge.runtime.errors import DeviceError

pytest_plugins = ["sshd_fixture"]
paramiko = pytest.importorskip("paramiko")


def keygen(path: Path) -> Path:
    from sshd_fixture import keygen as _keygen

    return _keygen(path)


def free_port() -> int:
    from sshd_fixture import free_port as _free_port

    return _free_port()


def conn(sshd, **kw) -> SshConnection:
    kw.setdefault("key", sshd.key_path)
    kw.setdefault("known_hosts", sshd.known_hosts_path)
    kw.setdefault("timeout", 10)
    return SshConnection(sshd.target, **kw)


@pytest.mark.parametrize("text,host,port,user", [
    ("pi@raspberrypi.local", "raspberrypi.local", 22, "pi"),
    ("pi@10.0.0.7:2222", "10.0.0.7", 2222, "pi"),
    ("root@[::1]:2200", "::1", 2200, "root"),
    ("board", "board", 22, "me"),
])
def test_host_spec(text, host, port, user):
    spec = HostSpec.parse(text, default_user="me")
    assert (spec.host, spec.port, spec.user) == (host, port, user)
    assert HostSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["pi@", "pi@host:99999", "a b@c", "pi@host:port"])
def test_host_spec_rejects(bad):
    with pytest.raises(DeviceError, match="bad --host"):
        HostSpec.parse(bad)


def test_run_and_exit_codes(host_sshd):
    with conn(host_sshd) as c:
        assert c.run("echo hello; echo oops >&2").stdout == "hello\n"
        r = c.run("exit 3", check=False)
        assert r.exit_code == 3
        with pytest.raises(DeviceError, match=r"failed on .*exit 4.*boom"):
            c.run("echo boom >&2; exit 4")
        lines: list[str] = []
        c.run("printf 'PROGRESS 1 2\\nPROGRESS 2 2\\n' >&2", on_stderr_line=lines.append)
        assert lines == ["PROGRESS 1 2", "PROGRESS 2 2"]
        assert c.home() == str(Path.home())


def test_command_timeout_kills_the_command(host_sshd, tmp_path):
    marker = tmp_path / "still-running"
    with conn(host_sshd) as c:
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match="did not finish in 2s"):
            c.run(f"sleep 30; touch {marker}", timeout=2)
        assert time.monotonic() - t0 < 15
        time.sleep(1)
        assert not marker.exists()
        assert c.run("echo alive").stdout == "alive\n"  # the connection survives


def test_connection_refused():
    port = free_port()  # nothing listens there
    c = SshConnection(f"root@127.0.0.1:{port}", timeout=5, accept_new_host=True,
                      known_hosts="/dev/null")
    with pytest.raises(DeviceError, match="connection refused by 127.0.0.1:.*sshd running"):
        c.connect()


def test_silent_server_times_out():
    """A port that accepts TCP but never speaks SSH: bounded by the timeout, clear message."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        c = SshConnection(f"root@127.0.0.1:{srv.getsockname()[1]}", timeout=2,
                          known_hosts="/dev/null", accept_new_host=True)
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match="timed out after 2s"):
            c.connect()
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        t.join(2)
        for s in held:
            s.close()
        srv.close()


def test_auth_failure_never_shows_the_password(host_sshd, tmp_path, caplog):
    other = keygen(tmp_path / "other_key")
    secret = "s3cret-Pa55word"
    caplog.set_level(logging.DEBUG)
    c = conn(host_sshd, key=other, password=secret)
    with pytest.raises(DeviceError, match="authentication failed for .*other_key") as e:
        c.connect()
    assert secret not in str(e.value)
    assert secret not in caplog.text


def test_unknown_host_refused_then_accepted(host_sshd, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(DeviceError, match="is not in .*known_hosts.*--accept-new-host") as e:
        conn(host_sshd, known_hosts=known).connect()
    assert "SHA256:" in str(e.value)
    assert known.read_text() == ""  # nothing recorded without the flag

    c = conn(host_sshd, known_hosts=known, accept_new_host=True).connect()
    assert c.accepted_host_key and c.accepted_host_key.split()[1].startswith("SHA256:")
    c.close()
    line = known.read_text().split()
    assert line[0] == f"[127.0.0.1]:{host_sshd.port}"
    assert line[2] == host_sshd.host_key_pub.read_text().split()[1]
    with conn(host_sshd, known_hosts=known) as c:  # now known: no flag needed
        assert c.accepted_host_key is None
        assert c.run("true").ok


def test_missing_known_hosts_file(host_sshd, tmp_path):
    with pytest.raises(DeviceError, match="does not exist.*--accept-new-host"):
        conn(host_sshd, known_hosts=tmp_path / "nope").connect()


def test_host_key_mismatch_is_refused_even_with_accept_new(host_sshd, tmp_path):
    impostor = keygen(tmp_path / "impostor").with_suffix(".pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{host_sshd.port} {impostor[0]} {impostor[1]}\n")
    for accept in (False, True):
        with pytest.raises(DeviceError, match="HOST KEY MISMATCH.*ssh-keygen -R"):
            conn(host_sshd, known_hosts=known, accept_new_host=accept).connect()


def test_missing_key_file(host_sshd, tmp_path):
    with pytest.raises(DeviceError, match="not found"):
        conn(host_sshd, key=tmp_path / "nokey").connect()


def test_sftp_put_with_progress(host_sshd, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    seen: list[tuple[int, int]] = []
    with conn(host_sshd) as c:
        c.put(src, str(tmp_path / "copy.bin"), progress=lambda d, t: seen.append((d, t)))
        c.put_bytes(b"abc", str(tmp_path / "small.txt"))
        with pytest.raises(DeviceError, match="upload of blob.bin .* failed"):
            c.put(src, str(tmp_path / "no-such-dir" / "x"))
    assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
    assert (tmp_path / "small.txt").read_text() == "abc"
    assert seen[-1] == (src.stat().st_size, src.stat().st_size)


def test_forward_tunnels_to_device_localhost(host_sshd):
    """direct-tcpip: a local port reaching a server bound to the device's 127.0.0.1."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)

    def echo() -> None:
        s, _ = srv.accept()
        with s:
            while data := s.recv(1024):
                s.sendall(data.upper())

    threading.Thread(target=echo, daemon=True).start()
    with conn(host_sshd) as c, c.forward(srv.getsockname()[1]) as lport:
        with socket.create_connection(("127.0.0.1", lport), timeout=10) as s:
            s.sendall(b"through the tunnel")
            got = b""
            while len(got) < 18:
                got += s.recv(1024)
        assert got == b"THROUGH THE TUNNEL"
    srv.close()


def test_connection_lost_while_running(fresh_sshd):
    c = conn(fresh_sshd).connect()
    threading.Timer(1.0, fresh_sshd.stop).start()
    with pytest.raises(DeviceError, match="connection to .* was lost"):
        c.run("sleep 20", timeout=30)
    c.close()


def test_peer_that_closes_at_once_gives_one_error_line_and_no_traceback(tmp_path):
    """A port that accepts TCP and closes it at once (issue 12 defect 6): the CLI prints the
    `Error:` line only; paramiko's transport thread logs a traceback unless it is silenced."""
    import subprocess
    import sys

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()
    accepted: list[int] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                s, _ = srv.accept()
            except OSError:
                continue
            accepted.append(1)
            s.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "lprnet_edge.cli.main", "remote", "info", "--host",
             f"pi@127.0.0.1:{srv.getsockname()[1]}", "--known-hosts", str(tmp_path / "kh"),
             "--accept-new-host", "--ssh-timeout", "10"],
            capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        t.join(2)
        srv.close()
    assert accepted
    assert r.returncode == 7, r.stderr
    assert r.stderr.startswith("Error: ") and "closed the connection" in r.stderr
    assert "Traceback" not in r.stderr and "paramiko" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
