"""`lprnet-edge device setup` on the emulated Raspberry Pi 4 (aarch64 under qemu-user, no
network): the offline path, with aarch64 wheels downloaded on this host, uploaded, checked by
sha256 on the device and installed by its pip into a new venv; then lprnet_edge's runtime in
that venv for the user's own scripts, without PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

pytest_plugins = ["emulated_device"]
pytestmark = [pytest.mark.slow, pytest.mark.device]


def pi_args(emulated_pi, remote_dir: str) -> list[str]:
    return ["--host", f"{emulated_pi.user}@{emulated_pi.host}:{emulated_pi.port}",
            "--key", str(emulated_pi.key_path), "--known-hosts",
            str(emulated_pi.known_hosts_path), "--remote-dir", remote_dir]


def test_device_setup_offline_then_user_script(emulated_pi):
    """A fresh venv in a new remote dir (the device's own venv is left alone)."""
    remote_dir = f"/home/pi/setup-{os.getpid()}"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lprnet_edge.cli.main", "device", "setup",
                        *pi_args(emulated_pi, remote_dir), "--offline", "--json"],
                       capture_output=True, text=True, timeout=3600)
    print(f"\ndevice setup --offline on the emulated Pi: {time.perf_counter() - t0:.0f} s")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    res = json.loads(r.stdout)
    assert res["machine"] == "aarch64" and res["mode"] == "offline"
    assert res["venv"] == f"{remote_dir}/venv"
    names = [w["name"] for w in res["wheels"]]
    assert any(n.startswith("apache_tvm-0.27") and "aarch64" in n for n in names), names
    assert any(n.startswith("apache_tvm_ffi-0.1.14.post1") for n in names), names
    assert res["bytes_uploaded"] == sum(w["size"] for w in res["wheels"])
    assert res["versions"]["lprnet_edge_path"] == f"{remote_dir}/runtime/lprnet_edge/__init__.py"
    assert res["versions"]["tvm"].startswith("0.27")
    assert not emulated_pi.run(f"ls {remote_dir}/tmp").stdout.strip()  # wheels removed

    # The user's own script, from another folder, in a login shell without PYTHONPATH: no
    # torch, the runtime found through the venv's .pth. The agent runs there too.
    py = f"{remote_dir}/venv/bin/python"
    script = ("import sys; sys.modules['torch'] = None\n"
              "from lprnet_edge import Recognizer\n"
              "import lprnet_edge; print(Recognizer.__module__, lprnet_edge.__file__)")
    out = emulated_pi.run(f"cd /tmp && env -u PYTHONPATH {py} -c {shlex.quote(script)}",
                          timeout=600).stdout.split()
    assert out == ["lprnet_edge.runtime.recognizer",
                   f"{remote_dir}/runtime/lprnet_edge/__init__.py"]
    info = emulated_pi.run(f"cd /tmp && env -u PYTHONPATH TVM_USE_RUNTIME_LIB=1 {py} -m "
                           "lprnet_edge.runtime.agent info", timeout=600).stdout
    doc = json.loads(info.strip().splitlines()[-1])
    assert doc["ok"] and doc["result"]["machine"] == "aarch64"
    assert doc["result"]["torch_imported"] is False

    # Running it again keeps the venv and reinstalls nothing new.
    r = subprocess.run([sys.executable, "-m", "lprnet_edge.cli.main", "device", "setup",
                        *pi_args(emulated_pi, remote_dir), "--offline"],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing the venv" in r.stderr and "lprnet_edge 0." in r.stdout
    emulated_pi.run(f"rm -rf {remote_dir}", timeout=300)


def test_device_setup_refuses_a_missing_python(emulated_pi, cli_runner):
    from conftest import assert_user_error

    r = cli_runner("device", "setup", *pi_args(emulated_pi, "/home/pi/setup-none"),
                   "--python", "/usr/bin/no-such-python", "--offline")
    assert_user_error(r, "cannot run /usr/bin/no-such-python", "python3-venv")
    assert emulated_pi.run("test -e /home/pi/setup-none || echo absent").stdout.strip() == \
        "absent"
