"""The emulated Raspberry Pi 4 itself: SSH with host key checking, aarch64, the device venv,
and that stopping it leaves no process behind. Runs against the real device (scripts/emulated-pi).
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import pytest

paramiko = pytest.importorskip("paramiko")

# The fixture module (tests/emulated_device.py); its helpers are imported inside the tests, once
# pytest has loaded it as a plugin.
pytest_plugins = ["emulated_device"]
pytestmark = [pytest.mark.slow, pytest.mark.device]


def _exec(client, command: str, timeout: float = 300) -> tuple[int, str, str]:
    """Run a command over a paramiko client: (exit status, stdout, stderr)."""
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode()
    err = stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


@pytest.fixture
def client(emulated_pi):
    c = emulated_pi.connect()
    yield c
    c.close()


def test_known_hosts_holds_the_device_host_key(emulated_pi):
    line = emulated_pi.known_hosts_path.read_text().split()
    assert line[0] == f"[127.0.0.1]:{emulated_pi.port}"
    assert line[1] == "ssh-ed25519"
    host_pub = (emulated_pi.root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    assert line[1:3] == host_pub[:2]


def test_uname_is_aarch64_over_paramiko(client):
    status, out, err = _exec(client, "uname -m; hostname; id -un")
    assert status == 0, err
    assert out.split() == ["aarch64", "raspberrypi", "pi"]


def test_unknown_host_key_is_rejected(emulated_pi):
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.RejectPolicy())  # empty known hosts
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        c.connect(emulated_pi.host, port=emulated_pi.port, username=emulated_pi.user,
                  key_filename=str(emulated_pi.key_path), look_for_keys=False,
                  allow_agent=False, timeout=60, banner_timeout=60, auth_timeout=60)
    c.close()


def test_wrong_host_key_is_rejected(emulated_pi):
    other = paramiko.Ed25519Key.from_private_key_file(str(emulated_pi.key_path))
    c = paramiko.SSHClient()
    c.get_host_keys().add(f"[{emulated_pi.host}]:{emulated_pi.port}", "ssh-ed25519", other)
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.BadHostKeyException):
        c.connect(emulated_pi.host, port=emulated_pi.port, username=emulated_pi.user,
                  key_filename=str(emulated_pi.key_path), look_for_keys=False,
                  allow_agent=False, timeout=60, banner_timeout=60, auth_timeout=60)
    c.close()


def test_password_and_unknown_keys_are_refused(emulated_pi):
    c = paramiko.SSHClient()
    c.load_host_keys(str(emulated_pi.known_hosts_path))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.AuthenticationException):
        c.connect(emulated_pi.host, port=emulated_pi.port, username=emulated_pi.user,
                  pkey=paramiko.RSAKey.generate(2048), password="raspberry",
                  look_for_keys=False, allow_agent=False,
                  timeout=60, banner_timeout=60, auth_timeout=60)
    c.close()


def test_venv_imports_the_device_runtime(client, emulated_pi):
    code = ("import platform, tvm.runtime, cv2, numpy; "
            "from tvm.runtime.vm import VirtualMachine; "
            "print(platform.machine(), tvm.__version__, numpy.__version__, cv2.__version__)")
    status, out, err = _exec(client, f"{emulated_pi.python} -c '{code}'")
    assert status == 0, err
    machine, tvm_version, *_ = out.split()
    assert machine == "aarch64"
    assert tvm_version.startswith("0.27")


def test_runtime_only_import_and_rpc_server_deps(client, emulated_pi):
    code = ("import tvm.runtime, tvm.base; from tvm.runtime.vm import VirtualMachine; "
            "import cloudpickle, tornado, psutil, tvm.exec.rpc_server; "
            "print(tvm.base._RUNTIME_ONLY)")
    status, out, err = _exec(client, f"TVM_USE_RUNTIME_LIB=1 {emulated_pi.python} -c '{code}'")
    assert status == 0, err
    assert out.strip() == "True"


def test_df_and_sftp_round_trip(client, emulated_pi):
    status, out, err = _exec(client, "df -P /home/pi | tail -n 1")
    assert status == 0, err
    assert int(out.split()[3]) > 0  # available 1K blocks
    payload = os.urandom(4096)
    with client.open_sftp() as sftp:
        sftp.putfo(io.BytesIO(payload), "/home/pi/sftp-check.bin")
        back = io.BytesIO()
        sftp.getfo("/home/pi/sftp-check.bin", back)
        sftp.remove("/home/pi/sftp-check.bin")
    assert back.getvalue() == payload
    status, out, _ = _exec(client, f"test -x {emulated_pi.python} && echo ok")
    assert out.strip() == "ok"


def test_openssh_client_works_with_the_device_env(emulated_pi):
    r = emulated_pi.run("uname -m")
    assert r.stdout.strip() == "aarch64"


def _comms(pids: list[int]) -> set[str]:
    names = set()
    for p in pids:
        try:
            names.add(Path(f"/proc/{p}/comm").read_text().strip())
        except OSError:
            pass
    return names


def test_script_usage_errors_are_loud():
    script = Path(__file__).resolve().parents[2] / "scripts" / "emulated-pi"
    r = subprocess.run(["bash", str(script), "frobnicate"], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 2
    assert "unknown command" in r.stderr


def test_stop_leaves_no_process_then_restart(emulated_pi):
    """Stop kills every process, even a detached one started over ssh; the device restarts."""
    from emulated_device import EXIT_NOT_RUNNING, EmulatedPi, pids_in_group, pids_in_pidns

    same = EmulatedPi(emulated_pi.device_dir).start()  # start is idempotent
    assert (same.pid, same.port) == (emulated_pi.pid, emulated_pi.port)
    assert emulated_pi.status() == 0
    # Like a TVM RPC server's popen worker: its own session, outliving its parent.
    emulated_pi.run("setsid nohup sleep 600 >/dev/null 2>&1 </dev/null & echo started")
    deadline = time.monotonic() + 60  # exec is slow under emulation
    while "sleep" not in _comms(pids_in_pidns(emulated_pi.pidns)):
        assert time.monotonic() < deadline, _comms(pids_in_pidns(emulated_pi.pidns))
        time.sleep(0.5)
    assert "sshd" in _comms(pids_in_pidns(emulated_pi.pidns))
    assert emulated_pi.pid in pids_in_group(emulated_pi.pid)
    pid, pidns = emulated_pi.pid, emulated_pi.pidns

    emulated_pi.stop()
    assert pids_in_pidns(pidns) == []
    assert pids_in_group(pid) == []
    assert emulated_pi.processes() == []
    assert str(emulated_pi.root) not in Path("/proc/self/mountinfo").read_text()
    assert emulated_pi.status() == EXIT_NOT_RUNNING
    assert not (emulated_pi.device_dir / "device.env").exists()
    emulated_pi.stop()  # idempotent

    emulated_pi.start()  # the unpacked device starts again, for the tests that follow
    assert emulated_pi.pid != pid
    assert emulated_pi.run("uname -m").stdout.strip() == "aarch64"
