#!/usr/bin/env python
"""The aarch64 peers (ONNX Runtime, ncnn, LiteRT) on the emulated Pi: logits against PyTorch, and
exact-plate accuracy on test/ at batch 1.

    sudo scripts/emulated-pi start --dir /tmp/pi && sudo scripts/emulated-pi peers --dir /tmp/pi
    python benchmarks/peers.py --device /tmp/pi [--limit N] [--out docs/peers-aarch64.md]

The host converts the models (``model/onnx.py``, ``model/ncnn.py``, ``model/litert.py``:
its converter is installed on first use into a folder of its own), copies them with
``lprnet_edge/runtime`` and the test plates to the device over SSH, and runs the guest program
``python -m lprnet_edge.runtime.peers`` there with the device's CPU (``-cpu cortex-a72`` unless
the device was started with another). Each runtime's evaluation is its own process, run side
by side. Emulated: slow (seconds per plate), and never a speed figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LPRNET_EDGE_DATA", str(REPO.parent / "shared" / "lprnet"))

import numpy as np  # noqa: E402

REMOTE = "lprnet-peers"  # in the device user's home
RUNTIMES = ("onnxruntime", "ncnn", "litert")


def device_env(device_dir: Path) -> dict[str, str]:
    text = (device_dir / "device.env").read_text()
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)


def ssh_argv(env: dict[str, str]) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-i", env["KEY"], "-p", env["PORT"], "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={env['KNOWN_HOSTS']}",
            "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR",
            f"{env['USER']}@{env['HOST']}"]


def upload(env: dict[str, str], files: dict[str, Path], test_dir: Path | None) -> None:
    """One tar stream: the runtime package, the models and (optionally) the test plates."""
    def writable(t: tarfile.TarInfo) -> tarfile.TarInfo | None:
        # The shared data is read-only: the next upload must be able to delete the copy.
        t.mode = 0o755 if t.isdir() else 0o644
        return None if "__pycache__" in t.name else t

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(REPO / "lprnet_edge" / "__init__.py", "lprnet_edge/__init__.py", filter=writable)
        tar.add(REPO / "lprnet_edge" / "runtime", "lprnet_edge/runtime", filter=writable)
        for name, path in files.items():
            tar.add(path, f"models/{name}", filter=writable)
        if test_dir is not None:
            tar.add(test_dir, "test", filter=writable)
    cmd = f"rm -rf {REMOTE} && mkdir -p {REMOTE} && tar -C {REMOTE} -xf -"
    subprocess.run([*ssh_argv(env), cmd], input=buf.getvalue(), check=True)


def guest(env: dict[str, str], args: list[str]) -> subprocess.Popen[str]:
    cmd = f"cd {REMOTE} && {env['PYTHON']} -m lprnet_edge.runtime.peers " + shlex.join(args)
    return subprocess.Popen([*ssh_argv(env), cmd], stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the guest program failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def torch_reference(x: np.ndarray, test_dir: Path, limit: int | None) -> tuple[Any, float]:
    """PyTorch's logits for ``x`` and its accuracy on the same plates (the reference)."""
    import torch

    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.reference import TorchBackend
    from lprnet_edge.model.weights import resolve_weights
    from lprnet_edge.runtime.charset import load_charset
    from lprnet_edge.runtime.evaluate import evaluate
    from lprnet_edge.runtime.recognizer import Recognizer

    model = load_model(resolve_weights(None))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    acc = evaluate(Recognizer(TorchBackend(model), load_charset()), test_dir, limit=limit)
    return ref, acc.accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", required=True, help="the emulated Pi's --dir (device.env)")
    ap.add_argument("--limit", type=int, default=None, help="first N plates of test/")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--test-dir", default=None)
    ap.add_argument("--out", default=str(REPO / "docs" / "peers-aarch64.md"))
    args = ap.parse_args()
    from lprnet_edge.model.litert import export_litert, install_converter
    from lprnet_edge.model.ncnn import export_ncnn
    from lprnet_edge.model.onnx import export_onnx
    from lprnet_edge.runtime.peers import fixed_input

    env = device_env(Path(args.device))
    test_dir = Path(args.test_dir or Path(os.environ["LPRNET_EDGE_DATA"]) / "test")
    nc = export_ncnn()
    files = {"lprnet.onnx": export_onnx().path, "lprnet.param": nc.param, "lprnet.bin": nc.bin}
    model_of = {"onnxruntime": "models/lprnet.onnx", "ncnn": "models/lprnet.param",
                "litert": "models/lprnet.tflite"}
    runtimes = [r for r in args.runtimes.split(",") if r]
    if "litert" in runtimes:
        install_converter()
        files["lprnet.tflite"] = export_litert().path
    t0 = time.time()
    upload(env, files, test_dir)
    limit = ["--limit", str(args.limit)] if args.limit else []
    logits = {r: result(guest(env, ["logits", "--runtime", r, "--model", model_of[r]]))
              for r in runtimes}
    evals = {r: guest(env, ["evaluate", "--runtime", r, "--model", model_of[r],
                            "--data", "test", *limit]) for r in runtimes}
    ref, torch_acc = torch_reference(fixed_input(), test_dir, args.limit)
    rows = []
    for r in runtimes:
        ev = result(evals[r])
        diff = float(np.abs(np.asarray(logits[r]["logits"], dtype=np.float32) - ref).max())
        rows.append((r, logits[r]["version"], diff, ev["count"], ev["accuracy"]))
    write(args, env, rows, torch_acc, float(np.abs(ref).max()), time.time() - t0)


def write(args: argparse.Namespace, env: dict[str, str], rows: list[tuple[Any, ...]],
          torch_acc: float, ref_max: float, wall: float) -> None:
    cmd = "python benchmarks/peers.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = ["# Peers on aarch64 (emulated Pi)", "",
             f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             "Do not edit by hand: run it again.", "",
             f"The emulated Raspberry Pi (`scripts/emulated-pi`, qemu-user `-cpu "
             f"{env.get('CPU', 'cortex-a72')}`, that board's /proc/cpuinfo), 1 thread, batch 1, "
             "the fp32 original (sirius-ai weights); ncnn with fp16 storage and arithmetic "
             "off, LiteRT with its default XNNPACK delegate. 'max |logit diff|': on the "
             "Recognizer's "
             f"synthetic plate, against PyTorch on the host (logits up to {ref_max:.0f} in "
             "magnitude). Accuracy: exact plates on test/ with the Recognizer's preprocessing "
             "and CTC decoding. No timings: the board is emulated.", "",
             "| runtime | version | max \\|logit diff\\| vs PyTorch | plates | accuracy |",
             "|---|---|---|---|---|"]
    lines += [f"| {r} | {v} | {d:.1e} | {n} | {a:.3f} |" for r, v, d, n, a in rows]
    lines += [f"| PyTorch eager (host, reference) | - | 0 | {rows[0][3] if rows else '-'} | "
              f"{torch_acc:.3f} |", "", f"Run took {wall / 60:.0f} min under emulation.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
