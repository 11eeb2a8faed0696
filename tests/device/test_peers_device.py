"""The aarch64 peers on the emulated Pi (``-cpu cortex-a72``, the Pi 4's /proc/cpuinfo):
``scripts/emulated-pi peers`` installs them (again: a no-op), the device's processes see the
A72 and not qemu's ``max``, and ONNX Runtime, ncnn and LiteRT (where its converter is
installed on the host), run by the guest program ``lprnet_edge.runtime.peers``, compute
PyTorch's logits on a few real plates."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
from emulated_device import SCRIPT

from lprnet_edge.runtime.recognizer import _load

pytest_plugins = ["emulated_device"]
pytestmark = [pytest.mark.slow, pytest.mark.device]
REPO = SCRIPT.parents[1]
HWCAP_ASIMDDP, HWCAP_SVE = 1 << 20, 1 << 22  # arm64 AT_HWCAP bits the A72 lacks


def _put(device, files: dict[str, bytes | str]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(REPO / "lprnet_edge" / "__init__.py", "lprnet_edge/__init__.py")
        tar.add(REPO / "lprnet_edge" / "runtime", "lprnet_edge/runtime",
                filter=lambda t: None if "__pycache__" in t.name else t)
        for name, src in files.items():
            tar.add(str(src), name)
    subprocess.run(device.ssh_argv("rm -rf peers && mkdir peers && tar -C peers -xf -"),
                   input=buf.getvalue(), check=True, timeout=300)


def test_peers_match_pytorch_on_the_emulated_pi(emulated_pi, weights_path, test_images,
                                                  tmp_path):
    torch = pytest.importorskip("torch")
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.litert import export_litert
    from lprnet_edge.model.ncnn import export_ncnn
    from lprnet_edge.model.onnx import export_onnx
    from lprnet_edge.runtime.errors import ToolchainError
    from lprnet_edge.runtime.preprocess import Preprocess

    for _ in range(2):  # the second run finds them installed
        r = subprocess.run(["bash", str(SCRIPT), "peers", "--dir", str(emulated_pi.device_dir)],
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-2000:]
    assert "already installed" in r.stderr
    probe = emulated_pi.run(
        "echo $QEMU_CPU; grep -m1 'CPU part' /proc/cpuinfo; python3 -c 'import ctypes; "
        "f = ctypes.CDLL(None).getauxval; f.restype = ctypes.c_ulong; print(f(16))'").stdout
    cpu, part, hwcap = probe.split("\n")[:3]
    assert cpu == "cortex-a72" and part.endswith("0xd08")
    assert not int(hwcap) & (HWCAP_ASIMDDP | HWCAP_SVE)

    pre = Preprocess()
    x = np.stack([pre(_load(p))[0] for p in test_images[:3]]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    nc = export_ncnn(weights_path, cache=tmp_path / "ncnn")
    files = {"x.npy": tmp_path / "x.npy", "m.onnx": export_onnx(weights_path).path,
             "m.param": nc.param, "m.bin": nc.bin}
    peers = [("onnxruntime", "m.onnx"), ("ncnn", "m.param")]
    try:
        files["m.tflite"] = export_litert(weights_path).path
        peers.append(("litert", "m.tflite"))
    except ToolchainError:
        pass  # the converter is optional on the host (see lprnet_edge.model.litert)
    _put(emulated_pi, files)
    with torch.no_grad():
        ref = np.concatenate([load_model(weights_path)(torch.from_numpy(x[i:i + 1])).numpy()
                              for i in range(len(x))])
    for runtime, model in peers:
        out = emulated_pi.run(f"cd peers && {emulated_pi.python} -m lprnet_edge.runtime.peers "
                              f"logits --runtime {runtime} --model {model} --input x.npy",
                              timeout=900).stdout
        got = np.asarray(json.loads(out.splitlines()[-1])["logits"], dtype=np.float32)
        assert got.shape == ref.shape, runtime
        np.testing.assert_allclose(got, ref, atol=1e-3 * float(np.abs(ref).max()),
                                   err_msg=runtime)
