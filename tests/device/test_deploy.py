"""Deploy / rollback / status against a real sshd on 127.0.0.1 (x86).

The "device" is this machine reached over SSH as root, with a host-target artifact; its
python is the test interpreter (linked as ``REMOTE_DIR/venv/bin/python`` like on a board).
Faults are real: a full (tiny tmpfs) filesystem, sshd killed in the middle of an upload, a
python without the runtime, a damaged deployment. After each, the previous deployment must
still be current and still read plates.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from host_device import (
    VERIFY_TOLERANCE,
    add_verify_set,
    assert_current_reads_plates,
    current_name,
    fp16_rounded,
    make_device,
    ssh_args,
)

from lprnet_edge.device.deploy import (
    SPACE_MARGIN,
    RollbackResult,
    artifact_size,
    deploy,
    rollback,
    runtime_zip,
    status,
)
from lprnet_edge.device.device import Device
from lprnet_edge.runtime.errors import ArtifactError, DeviceError

pytest_plugins = ["sshd_fixture", "host_device"]
pytestmark = pytest.mark.slow  # builds a TVM artifact (~40 s) once per session


# ---------------------------------------------------------------- the happy path


def test_deploy_rollback_status(host_sshd, host_artifact, remote_dir, test_dir):
    dev = make_device(host_sshd, remote_dir)
    seen: list[tuple[int, int]] = []
    steps: list[str] = []
    t0 = time.perf_counter()
    first = deploy(dev, host_artifact, progress=lambda d, t: seen.append((d, t)),
                   on_step=steps.append)
    print(f"\ndeploy: {time.perf_counter() - t0:.1f} s, upload {first.upload_seconds:.2f} s")
    assert first.previous is None and first.device_arch == "x86_64"
    assert seen[-1][0] == seen[-1][1] == first.bytes_uploaded  # progress reached the total
    assert any("checksums" in s for s in steps)
    dep = remote_dir / "deployments" / first.name
    assert (remote_dir / "current").is_symlink() and current_name(remote_dir) == first.name
    assert sorted(p.name for p in (dep / "artifact").iterdir()) == [
        "manifest.json", "model.so", "params.npz", "verify.npz"]
    assert (dep / "runtime" / "lprnet_edge" / "runtime" / "agent.py").is_file()
    assert sorted(p.name for p in (dep / "runtime" / "lprnet_edge").iterdir()) == [
        "__init__.py", "__pycache__", "runtime"]  # the runtime only, nothing of the host side
    # The model was compared with PyTorch on the device, and the result recorded there.
    v = first.checks.verification
    assert v["status"] == "passed" and v["inputs"] == 4
    assert v["max_abs_logit_diff"] <= v["tolerance"] == VERIFY_TOLERANCE
    assert first.checks.torch_imported is False and first.checks.load_s > 0
    record = json.loads((dep / "deployment.json").read_text())
    assert record["verification"] == v
    assert record["device"]["python"] == first.checks.versions["python"]
    assert first.to_dict()["checks"]["sha256"] == "ok"
    assert not list((remote_dir / "deployments").glob(".staging-*"))

    second = deploy(dev, host_artifact, name="v2")
    assert second.previous == first.name and second.name.startswith("v2-")
    assert current_name(remote_dir) == second.name
    back = rollback(dev)
    assert back == RollbackResult(host=dev.spec, current=first.name, previous=second.name)
    assert_current_reads_plates(dev, test_dir, first.name)
    with pytest.raises(DeviceError, match="oldest deployment"):
        rollback(dev)
    rollback(dev, to=second.name)
    st = status(dev)
    assert st.current == second.name and st.deployments == [first.name, second.name]
    assert st.info["artifact"]["target"]["arch"] == "x86_64"
    assert st.deployment["name"] == second.name and st.free_bytes > 0
    dev.conn.close()


def test_cli_commands(host_sshd, host_artifact, remote_dir, test_images, cli_runner):
    make_device(host_sshd, remote_dir).conn.close()  # the venv link
    args = ssh_args(host_sshd, remote_dir)
    r = cli_runner("deploy", host_artifact, *args, "--json")
    assert r.exit_code == 0, r.output
    dep = json.loads(r.stdout)
    assert dep["bytes_uploaded"] > 1_000_000 and "Uploading" in r.stderr

    r = cli_runner("remote", "recognize", *args, *test_images[:2])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["image", "plate", "confidence"] and len(lines) == 4
    assert str(test_images[0]) in lines[2]

    r = cli_runner("remote", "info", *args)
    assert r.exit_code == 0, r.output
    assert f"* {dep['name']}" in r.stdout and "x86_64" in r.stdout

    r = cli_runner("remote", "eval", *args, "--data", test_images[0].parent, "--limit", "20",
                   "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["count"] == 20

    r = cli_runner("remote", "bench", *args, "--runs", "3", "--warmup", "1")
    assert r.exit_code == 0, r.output
    assert "p50 ms" in r.stdout and "Recognizer over SSH" in r.stdout

    r = cli_runner("rollback", *args)
    assert r.exit_code == 7 and "nothing to roll back to" in r.output


def test_cli_errors_are_clean(host_sshd, remote_dir, host_artifact, tmp_path, cli_runner):
    from conftest import assert_user_error

    args = ssh_args(host_sshd, remote_dir)
    empty = tmp_path / "known"
    empty.write_text("")
    bad = [a if a != str(host_sshd.known_hosts_path) else str(empty) for a in args]
    assert_user_error(cli_runner("deploy", host_artifact, *bad), "--accept-new-host", "SHA256:")
    assert_user_error(cli_runner("remote", "recognize", *args, host_artifact / "manifest.json"),
                      "nothing is deployed")


# ---------------------------------------------------------------- refusals and faults


def test_refuses_other_architecture_before_uploading(host_sshd, host_artifact, remote_dir,
                                                     tmp_path):

    arm = tmp_path / "lprnet-rpi4"
    shutil.copytree(host_artifact, arm)
    m = json.loads((arm / "manifest.json").read_text())
    m["target"] = {"name": "rpi4", "arch": "aarch64"}
    (arm / "manifest.json").write_text(json.dumps(m, ensure_ascii=False))
    dev = make_device(host_sshd, remote_dir)
    with pytest.raises(ArtifactError, match=r"built for rpi4 \(aarch64\).*x86_64.*Nothing was"):
        deploy(dev, arm)
    assert not (remote_dir / "deployments").exists()
    dev.conn.close()


def test_refuses_tampered_artifact(host_sshd, host_artifact, remote_dir, tmp_path):

    bad = tmp_path / "bad"
    shutil.copytree(host_artifact, bad)
    with open(bad / "params.npz", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    dev = make_device(host_sshd, remote_dir)
    with pytest.raises(ArtifactError, match="checksum mismatch for params.npz"):
        deploy(dev, bad)
    dev.conn.close()


@pytest.fixture
def small_fs(remote_dir, host_artifact, tmp_path):
    """A real filesystem (tmpfs) as the device's lprnet-edge directory, just large enough for
    one deployment (what the pre-flight check asks for)."""

    rz = runtime_zip(tmp_path)
    need = (artifact_size(host_artifact) + rz.stat().st_size + SPACE_MARGIN
            + sum(i.file_size for i in zipfile.ZipFile(rz).infolist()))
    size_k = need // 1024 + 64
    remote_dir.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs",
                        str(remote_dir)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield remote_dir
    finally:
        subprocess.run(["umount", "-l", str(remote_dir)], check=False)


def test_disk_full(host_sshd, host_artifact, small_fs, test_dir):

    dev = make_device(host_sshd, small_fs)
    first = deploy(dev, host_artifact)
    # The pre-flight check refuses a second deployment that cannot fit...
    with pytest.raises(DeviceError, match=r"not enough disk space .* MB free, .* needs"):
        deploy(dev, host_artifact)
    assert_current_reads_plates(dev, test_dir, first.name)
    # ...and without it the real ENOSPC in the middle of the upload is a clear error too.
    with pytest.raises(DeviceError, match="upload of .* failed"):
        deploy(dev, host_artifact, check_space=False)
    assert not list((small_fs / "deployments").glob(".staging-*"))  # cleaned up
    assert_current_reads_plates(dev, test_dir, first.name)
    dev.conn.close()


def test_upload_cut_by_sshd_dying(fresh_sshd, host_artifact, remote_dir, test_dir):
    """sshd (listener and session) killed half way through the upload."""

    dev = make_device(fresh_sshd, remote_dir)
    first = deploy(dev, host_artifact)
    killed: list[int] = []

    def cut(done: int, total: int) -> None:
        if done > total // 3 and not killed:
            killed.append(done)
            fresh_sshd.stop()

    with pytest.raises(DeviceError, match="connection to .* was lost"):
        deploy(dev, host_artifact, progress=cut)
    assert killed
    dev.conn.close()
    assert current_name(remote_dir) == first.name
    fresh_sshd.start()
    dev = make_device(fresh_sshd, remote_dir)
    assert_current_reads_plates(dev, test_dir, first.name)
    # The next deploy works (the half-uploaded staging dir is not in the way).
    assert deploy(dev, host_artifact).previous == first.name
    dev.conn.close()


def test_broken_device_python_keeps_current(host_sshd, host_artifact, remote_dir, test_dir,
                                            tmp_path):

    dev = make_device(host_sshd, remote_dir)
    first = deploy(dev, host_artifact)
    # A python without numpy/tvm: the smoke test on the device fails before the switch.
    fake = tmp_path / "bare-python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    fake.chmod(0o755)
    bare = Device(dev.conn, str(remote_dir), python=str(fake))
    with pytest.raises(DeviceError, match="lacks a module|agent failed"):
        deploy(bare, host_artifact)
    assert current_name(remote_dir) == first.name
    assert not list((remote_dir / "deployments").glob(".staging-*"))
    assert_current_reads_plates(dev, test_dir, first.name)
    dev.conn.close()


def test_rollback_refuses_a_damaged_deployment(host_sshd, host_artifact, remote_dir, test_dir):

    dev = make_device(host_sshd, remote_dir)
    first = deploy(dev, host_artifact)
    second = deploy(dev, host_artifact)
    (remote_dir / "deployments" / first.name / "artifact" / "model.so").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="checksum mismatch for model.so"):
        rollback(dev)
    assert_current_reads_plates(dev, test_dir, second.name)
    dev.conn.close()


def test_keep_removes_old_deployments(host_sshd, host_artifact, remote_dir):

    dev = make_device(host_sshd, remote_dir)
    names = [deploy(dev, host_artifact, keep=2).name for _ in range(3)]
    assert dev.deployments() == names[1:]
    dev.conn.close()


# ---------------------------------------------------------------- what ships, what is trusted


def test_runtime_zip_holds_the_runtime_only(tmp_path):
    """deploy uploads lprnet_edge/__init__.py + lprnet_edge/runtime/ and nothing else, and
    that alone is enough for `from lprnet_edge import Recognizer` (torch blocked)."""

    names = zipfile.ZipFile(runtime_zip(tmp_path)).namelist()
    outside = [n for n in names
               if n != "lprnet_edge/__init__.py" and not n.startswith("lprnet_edge/runtime/")]
    assert outside == []
    for needed in ("agent.py", "selfcheck.py", "recognizer.py", "data/chinese68.json"):
        assert f"lprnet_edge/runtime/{needed}" in names
    zipfile.ZipFile(tmp_path / "runtime.zip").extractall(tmp_path / "rt")
    code = ("import sys; sys.modules['torch'] = None; "
            f"sys.path.insert(0, {str(tmp_path / 'rt')!r}); "
            "from lprnet_edge import Recognizer; import lprnet_edge.runtime.selfcheck; "
            "print(Recognizer.__module__, lprnet_edge.__file__)")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["lprnet_edge.runtime.recognizer",
                                str(tmp_path / "rt" / "lprnet_edge" / "__init__.py")]


def _with_files_entry(src: Path, dest: Path, name: str, real: str = "params.npz") -> Path:
    """A copy of ``src`` whose manifest also lists ``name`` (with the checksum of ``real``)."""
    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["files"][name] = dict(m["files"][real])
    (dest / "manifest.json").write_text(json.dumps(m, ensure_ascii=False))
    return dest


@pytest.mark.parametrize("name", ["../../escaped.bin", "/tmp/absolute.bin", "sub/dir.bin",
                                  "..", "a\\b.bin"])
def test_refuses_file_names_outside_the_artifact(host_sshd, host_artifact, remote_dir,
                                                 tmp_path, name):
    """A `files` name with '/', '..' or absolute is refused before anything is written on
    the device (it would be uploaded outside the deployment folder)."""

    bad = _with_files_entry(host_artifact, tmp_path / "bad", name)
    dev = make_device(host_sshd, remote_dir)
    with pytest.raises(ArtifactError, match="not a plain file name inside the artifact"):
        deploy(dev, bad)
    assert not (remote_dir / "deployments").exists()
    assert not (remote_dir.parent / "escaped.bin").exists()
    dev.conn.close()


def test_refuses_a_model_file_missing_from_files(host_sshd, host_artifact, remote_dir, tmp_path):

    bad = tmp_path / "bad"
    shutil.copytree(host_artifact, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["model_file"] = "other.so"
    (bad / "manifest.json").write_text(json.dumps(m, ensure_ascii=False))
    dev = make_device(host_sshd, remote_dir)
    with pytest.raises(ArtifactError, match="model_file 'other.so' is not listed in files"):
        deploy(dev, bad)
    assert not (remote_dir / "deployments").exists()
    dev.conn.close()


def test_device_check_refuses_wrong_logits_and_keeps_current(host_sshd, host_artifact,
                                                             remote_dir, test_dir, tmp_path,
                                                             weights_path):
    """The model runs on the device and is compared with the stored PyTorch logits: past the
    tolerance the deployment is refused and the previous one stays current."""
    from lprnet_edge.model.checkpoint import load_model

    dev = make_device(host_sshd, remote_dir)
    first = deploy(dev, host_artifact)
    wrong = tmp_path / "wrong"
    shutil.copytree(host_artifact, wrong)
    add_verify_set(wrong, fp16_rounded(load_model(weights_path, 68).eval()), shift=0.05)
    with pytest.raises(ArtifactError, match=r"verification on .* failed: max \|logit diff\| "
                                            r"vs the host's PyTorch 0\.05.* > tolerance 0\.001 "
                                            rf"on 4 calib inputs.*{first.name} stays current"):
        deploy(dev, wrong)
    assert current_name(remote_dir) == first.name
    assert not list((remote_dir / "deployments").glob(".staging-*"))
    assert_current_reads_plates(dev, test_dir, first.name)
    dev.conn.close()


def test_deploy_a_bundle(host_sshd, host_artifact, remote_dir, tmp_path, cli_runner):
    """`deploy X.tar.gz` takes what `build --bundle` writes."""
    from conftest import assert_user_error

    from lprnet_edge.runtime.artifact import bundle

    tarball = bundle(host_artifact, tmp_path / "lprnet-host.tar.gz")
    make_device(host_sshd, remote_dir).conn.close()
    args = ssh_args(host_sshd, remote_dir)
    r = cli_runner("deploy", tarball, *args, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["name"].startswith(f"{host_artifact.name}-")
    assert current_name(remote_dir) == res["name"]
    assert res["checks"]["verification"]["status"] == "passed"
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    assert_user_error(cli_runner("deploy", junk, *args), "not a readable bundle")
