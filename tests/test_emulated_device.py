"""The emulated Raspberry Pi 4 itself: SSH with host key checking, aarch64, the device venv,
and that stopping it leaves no process behind. Runs against the real device (scripts/emulated-pi).
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from emulated_device import (
    EXIT_NOT_RUNNING,
    EmulatedPi,
    build_or_skip,
    pids_in_group,
    pids_in_pidns,
)

paramiko = pytest.importorskip("paramiko")

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


def test_wrong_host_key_is_rejected(emulated_pi, tmp_path):
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


def test_stop_leaves_no_process(tmp_path: Path):
    """A second device: a detached process started over ssh must die with it on stop."""
    build_or_skip()
    device = EmulatedPi(tmp_path / "dev")
    device.start()
    try:
        assert device.status() == 0
        again = EmulatedPi(tmp_path / "dev").start()  # idempotent: same device
        assert (again.pid, again.port) == (device.pid, device.port)
        # Like a TVM RPC server's popen worker: own session, survives its parent.
        device.run("setsid nohup sleep 600 >/dev/null 2>&1 </dev/null & echo started")
        ns_pids = pids_in_pidns(device.pidns)
        comms = {Path(f"/proc/{p}/comm").read_text().strip() for p in ns_pids}
        assert {"sshd", "sleep"} <= comms, comms
        assert pids_in_group(device.pid)
    finally:
        device.stop()
    assert device.processes() == []
    assert pids_in_pidns(device.pidns) == []
    assert pids_in_group(device.pid) == []
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(device.root) not in mounts
    assert device.status() == EXIT_NOT_RUNNING
    assert not (tmp_path / "dev" / "device.env").exists()
    # stop is idempotent
    device.stop()
    device.clean()
    assert not (tmp_path / "dev").exists()


def test_script_usage_errors_are_loud():
    script = Path(__file__).resolve().parents[1] / "scripts" / "emulated-pi"
    r = subprocess.run(["bash", str(script), "frobnicate"], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 2
    assert "unknown command" in r.stderr
