"""Deploy / rollback / remote recognize-eval-bench against a real sshd on 127.0.0.1 (x86).

The "device" is this machine reached over SSH as root, with a host-target artifact; its
python is the test interpreter (linked as ``REMOTE_DIR/venv/bin/python`` like on a board).
Faults are real: a full (tiny tmpfs) filesystem, sshd killed in the middle of an upload, a
python without the runtime, a damaged deployment. After each, the previous deployment must
still be current and still read plates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lprnet_edge.runtime.errors import ArtifactError, DeviceError

pytest_plugins = ["sshd_fixture"]
pytestmark = pytest.mark.slow  # builds a TVM artifact (~40 s) once per session

PLATE = "京PL3N67.jpg"


VERIFY_TOLERANCE = 1e-3  # the pipeline's default max |logit diff| vs PyTorch


def verify_set_inputs(n: int = 4):
    """The first ``n`` calib/ plates, preprocessed as the pipeline's verification does."""
    import cv2
    import numpy as np

    from lprnet_edge.paths import data_subdir
    from lprnet_edge.runtime.preprocess import Preprocess

    calib = data_subdir("calib")
    paths = sorted(p for p in calib.iterdir() if p.suffix == ".jpg")[:n]
    pre = Preprocess()
    return [pre(cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_COLOR)) for p in paths]


def add_verify_set(root: Path, model, tolerance: float = VERIFY_TOLERANCE,
                   shift: float = 0.0) -> None:
    """Write verify.npz (calib inputs + ``model``'s PyTorch logits, ``+ shift``) into the
    artifact and list it in the manifest, as the pipeline does at package time."""
    import torch

    from lprnet_edge.runtime.artifact import file_entries
    from lprnet_edge.runtime.selfcheck import write_verify_set

    xs = verify_set_inputs()
    with torch.inference_mode():
        logits = [model(torch.from_numpy(x)).numpy() + shift for x in xs]
    name = write_verify_set(root, xs, logits, tolerance)
    m = json.loads((root / "manifest.json").read_text())
    m["files"].update(file_entries(root, [name]))
    m["verification"] = {"status": "skipped", "tolerance": tolerance}
    (root / "manifest.json").write_text(json.dumps(m, ensure_ascii=False, indent=2))


def fp16_rounded(model):
    """``model`` with every float tensor rounded through fp16, as params.npz stores them:
    the reference the fp16 artifact must match."""
    import torch

    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


def build_host_artifact(out: Path, weights: Path) -> Path:
    """A host (x86_64) TVM artifact of the pretrained model: model.so + params.npz + manifest,
    and verify.npz (PyTorch logits of 4 calib plates) for the check on the device."""
    import torch
    import tvm
    import tvm.relax.frontend.torch  # noqa: F401
    from tvm import relax

    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.lprnet import example_input
    from lprnet_edge.runtime.artifact import SCHEMA_VERSION, file_entries, machine_arch
    from lprnet_edge.runtime.charset import load_charset
    from lprnet_edge.runtime.params_codec import save_params
    from lprnet_edge.runtime.preprocess import Preprocess

    out.mkdir(parents=True, exist_ok=True)
    model = load_model(weights, 68).eval()
    ep = torch.export.export(model, (example_input(),))
    mod = relax.frontend.torch.from_exported_program(ep, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    names = [f"p{i}" for i in range(len(mod["main"].params) - 1)]
    arrays = {n: p.numpy() for n, p in zip(names, params["main"], strict=True)}
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    ex.export_library(str(out / "model.so"))
    save_params(out / "params.npz", arrays, "fp16")
    manifest = {
        "schema_version": SCHEMA_VERSION, "backend": "tvm", "model_file": "model.so",
        "files": file_entries(out, ["model.so", "params.npz"]),
        "target": {"name": "host", "arch": machine_arch()},
        "charset": load_charset().to_dict(), "preprocess": Preprocess().to_dict(),
        "input": {"name": "x", "shape": [1, 3, 24, 94], "dtype": "float32"},
        "runtime": {"entry": "main", "params": "params.npz", "param_order": names},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2))
    add_verify_set(out, fp16_rounded(load_model(weights, 68).eval()))
    return out


@pytest.fixture(scope="session")
def host_artifact(tmp_path_factory, weights_path) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("tvm")
    return build_host_artifact(tmp_path_factory.mktemp("art") / "lprnet-host", weights_path)


def make_device(sshd, remote_dir: Path):
    """A connected Device whose venv python is this interpreter."""
    from lprnet_edge.device.deploy import Device
    from lprnet_edge.device.ssh import SshConnection

    (remote_dir / "venv" / "bin").mkdir(parents=True, exist_ok=True)
    py = remote_dir / "venv" / "bin" / "python"
    if not py.exists():
        py.symlink_to(sys.executable)
    conn = SshConnection(sshd.target, key=sshd.key_path, known_hosts=sshd.known_hosts_path,
                         timeout=10).connect()
    return Device(conn, str(remote_dir))


def ssh_args(sshd, remote_dir: Path) -> list[str]:
    return ["--host", sshd.target, "--key", str(sshd.key_path), "--known-hosts",
            str(sshd.known_hosts_path), "--remote-dir", str(remote_dir)]


def current_name(remote_dir: Path) -> str:
    return os.readlink(remote_dir / "current").split("/")[-1]


def assert_current_reads_plates(dev, test_dir: Path, expected: str | None = None) -> None:
    from lprnet_edge.device.deploy import remote_recognize

    if expected:
        assert Path(dev.current()).name == expected
    res = remote_recognize(dev, [test_dir / PLATE])
    assert res[0]["text"] == "京PL3N67"


@pytest.fixture
def remote_dir(tmp_path) -> Path:
    return tmp_path / "device" / ".lprnet-edge"


# ---------------------------------------------------------------- the happy path


def test_deploy_recognize_eval_bench_rollback(host_sshd, host_artifact, remote_dir, test_dir,
                                              test_images):
    from lprnet_edge.device.deploy import (
        deploy,
        remote_bench,
        remote_eval,
        remote_recognize,
        rollback,
        status,
    )
    from lprnet_edge.runtime.evaluate import evaluate
    from lprnet_edge.runtime.recognizer import Recognizer

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
    v = first.checks["verification"]
    assert v["status"] == "passed" and v["inputs"] == 4
    assert v["max_abs_logit_diff"] <= v["tolerance"] == VERIFY_TOLERANCE
    record = json.loads((dep / "deployment.json").read_text())
    assert record["verification"] == v
    assert not list((remote_dir / "deployments").glob(".staging-*"))

    # Same plates and confidences as the local Recognizer on the same artifact.
    local = Recognizer.from_artifact(host_artifact)
    res = remote_recognize(dev, test_images[:5])
    for r, p in zip(res, test_images[:5], strict=True):
        loc = local.recognize(p)
        assert r["source"] == str(p) and r["text"] == loc.text
        assert r["confidence"] == pytest.approx(loc.confidence, abs=1e-6)
    assert not list((remote_dir / "tmp").iterdir())  # uploads cleaned up

    # Same metrics as the local evaluation; sharded over 2 processes too.
    ref = evaluate(local, test_dir, limit=60).to_dict()
    for workers in (1, 2):
        got = remote_eval(dev, test_dir, limit=60, workers=workers)
        for k in ("count", "correct", "accuracy", "char_accuracy", "mean_edit_distance",
                  "per_region", "errors"):
            assert got[k] == ref[k], (k, workers)
        assert got["workers"] == workers and got["deployment"] == first.name

    stats = remote_bench(dev, runs=5, warmup=1)
    assert stats["runs"] == 5 and stats["include_preprocess"] and stats["p50_ms"] > 0
    assert stats["mode"] == "ssh" and stats["machine"] == "x86_64"

    second = deploy(dev, host_artifact, name="v2")
    assert second.previous == first.name and second.name.startswith("v2-")
    assert current_name(remote_dir) == second.name
    back = rollback(dev)
    assert back == {"host": str(dev.conn.spec), "current": first.name, "previous": second.name}
    assert_current_reads_plates(dev, test_dir, first.name)
    with pytest.raises(DeviceError, match="oldest deployment"):
        rollback(dev)
    rollback(dev, to=second.name)
    st = status(dev)
    assert st["current"] == second.name and st["deployments"] == [first.name, second.name]
    assert st["info"]["artifact"]["target"]["arch"] == "x86_64"
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
    from lprnet_edge.device.deploy import deploy

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
    from lprnet_edge.device.deploy import deploy

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
    import zipfile

    from lprnet_edge.device.deploy import SPACE_MARGIN, artifact_size, runtime_zip

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
    from lprnet_edge.device.deploy import deploy

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
    from lprnet_edge.device.deploy import deploy

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
    from lprnet_edge.device.deploy import Device, deploy

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
    from lprnet_edge.device.deploy import deploy, rollback

    dev = make_device(host_sshd, remote_dir)
    first = deploy(dev, host_artifact)
    second = deploy(dev, host_artifact)
    (remote_dir / "deployments" / first.name / "artifact" / "model.so").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="checksum mismatch for model.so"):
        rollback(dev)
    assert_current_reads_plates(dev, test_dir, second.name)
    dev.conn.close()


def test_keep_prunes_old_deployments(host_sshd, host_artifact, remote_dir):
    from lprnet_edge.device.deploy import deploy

    dev = make_device(host_sshd, remote_dir)
    names = [deploy(dev, host_artifact, keep=2).name for _ in range(3)]
    assert dev.deployments() == names[1:]
    dev.conn.close()


def test_bench_over_rpc_through_the_ssh_tunnel(host_sshd, host_artifact, remote_dir):
    """A TVM RPC server started over SSH on the device's 127.0.0.1, reached through a
    direct-tcpip tunnel, timed with time_evaluator, and stopped (process group) afterwards."""
    from lprnet_edge.device.deploy import rpc_bench

    dev = make_device(host_sshd, remote_dir)
    stats = rpc_bench(dev, host_artifact, number=1, repeat=3)
    assert stats["mode"] == "rpc" and stats["runs"] == 3 and stats["p50_ms"] > 0
    assert stats["output_shape"] == [1, 68, 18] and not stats["include_preprocess"]
    left = subprocess.run(["pgrep", "-f", f"rpc_server.*--port {stats.get('port', '')}"],
                          capture_output=True, text=True).stdout.split()
    assert not [p for p in left if Path(f"/proc/{p}/cwd").resolve() == remote_dir / "tmp"]
    assert not list((remote_dir / "tmp").glob("rpc-*.log"))
    dev.conn.close()


def test_cli_bench_host(host_sshd, host_artifact, remote_dir, cli_runner, tmp_path):
    """`lprnet-edge bench --host` (SSH, the deployed Recognizer) and `--host --tunnel`."""
    from conftest import assert_user_error

    make_device(host_sshd, remote_dir).conn.close()
    args = ssh_args(host_sshd, remote_dir)
    other = tmp_path / "other"
    shutil.copytree(host_artifact, other)
    assert cli_runner("deploy", host_artifact, *args).exit_code == 0
    r = cli_runner("bench", "--artifact", host_artifact, *args, "--runs", "3", "--warmup", "1",
                   "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mode"] == "ssh"
    # Without --artifact: the deployed model.
    r = cli_runner("bench", *args, "--runs", "2", "--warmup", "0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["runs"] == 2
    assert_user_error(cli_runner("bench"), "give --artifact")
    r = cli_runner("bench", "--artifact", host_artifact, *args, "--tunnel", "--runs", "3")
    assert r.exit_code == 0, r.output
    assert "time_evaluator over RPC + SSH tunnel" in r.stdout and "p50 ms" in r.stdout
    # A different artifact than the deployed one is not silently timed.
    (other / "params.npz").write_bytes((other / "params.npz").read_bytes())
    m = json.loads((other / "manifest.json").read_text())
    m["files"]["params.npz"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    assert_user_error(cli_runner("bench", "--artifact", other, *args), "deploy it first")


# ---------------------------------------------------------------- what ships, what is trusted


def test_runtime_zip_holds_the_runtime_only(tmp_path):
    """deploy uploads lprnet_edge/__init__.py + lprnet_edge/runtime/ and nothing else, and
    that alone is enough for `from lprnet_edge import Recognizer` (torch blocked)."""
    import zipfile

    from lprnet_edge.device.deploy import runtime_zip

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
    """Issue 12 defect 3: a `files` name with '/', '..' or absolute is refused before anything
    is written on the device (it would be uploaded outside the deployment folder)."""
    from lprnet_edge.device.deploy import deploy

    bad = _with_files_entry(host_artifact, tmp_path / "bad", name)
    dev = make_device(host_sshd, remote_dir)
    with pytest.raises(ArtifactError, match="not a plain file name inside the artifact"):
        deploy(dev, bad)
    assert not (remote_dir / "deployments").exists()
    assert not (remote_dir.parent / "escaped.bin").exists()
    dev.conn.close()


def test_refuses_a_model_file_missing_from_files(host_sshd, host_artifact, remote_dir, tmp_path):
    from lprnet_edge.device.deploy import deploy

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
    from lprnet_edge.device.deploy import deploy
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
    """Issue 12 defect 7: `deploy X.tar.gz` takes what `build --bundle` writes."""
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
