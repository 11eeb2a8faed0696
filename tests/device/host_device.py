"""The host as a device, for the deploy / remote / tunnel tests: a host-target artifact of the
pretrained model (with its verify set), and a :class:`Device` reached through the real sshd of
``sshd_fixture`` whose venv python is the test interpreter. A test module uses it with::

    pytest_plugins = ["sshd_fixture", "host_device"]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lprnet_edge.device.device import Device
from lprnet_edge.device.remote import remote_recognize
from lprnet_edge.device.ssh import SshConnection
from lprnet_edge.runtime.artifact import FileEntry

PLATE = "京PL3N67.jpg"


def build_rpi4(tmp_path_factory: pytest.TempPathFactory, weights_path: Path) -> Path:
    """A default ``build --target rpi4`` of ``weights_path``, in a temporary folder."""
    out = tmp_path_factory.mktemp("rpi4") / "lprnet-rpi4"
    env = {**os.environ, "LPRNET_EDGE_WEIGHTS": str(weights_path)}
    r = subprocess.run([sys.executable, "-m", "lprnet_edge.cli.main", "build", "--target", "rpi4",
                        "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


VERIFY_TOLERANCE = 1e-3  # the pipeline's default max |logit diff| vs PyTorch


def file_entries(root: Path, names: list[str]) -> dict[str, dict[str, object]]:
    """The ``files`` block of a manifest for ``names`` in ``root``: name -> {sha256, size}."""
    return {n: FileEntry.of(Path(root) / n).to_dict() for n in names}


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
    from lprnet_edge.runtime.artifact import SCHEMA_VERSION, machine_arch
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
    if expected:
        assert Path(dev.current()).name == expected
    res = remote_recognize(dev, [test_dir / PLATE])
    assert res[0]["text"] == "京PL3N67"


@pytest.fixture
def remote_dir(tmp_path) -> Path:
    return tmp_path / "device" / ".lprnet-edge"
