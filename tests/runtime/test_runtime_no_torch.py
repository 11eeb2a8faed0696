"""The on-device runtime installs and works without torch: a clean venv, the package, numpy,
OpenCV and click only (``install_requires``), then imports, preprocessing, decoding and the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO, copy_images

RUNTIME_REQUIREMENTS = ("numpy", "opencv-python-headless", "click")

# Run by the venv's python and by this one: both must give the same reads, without torch.
SCRIPT = textwrap.dedent('''
    import importlib.util
    import json
    import sys

    import lprnet_edge
    from lprnet_edge import LprnetEdgeError, PlateResult, Recognizer

    assert "torch" not in sys.modules, "importing lprnet_edge imported torch"

    import lprnet_edge.runtime.backends
    import lprnet_edge.cli.main
    import lprnet_edge.runtime.artifact
    import lprnet_edge.runtime.params_codec
    import lprnet_edge.model.weights
    import numpy as np
    from lprnet_edge.runtime.charset import load_charset
    from lprnet_edge.runtime.decode import decode_text
    from lprnet_edge.runtime.errors import ToolchainError
    from lprnet_edge.runtime.evaluate import evaluate
    from lprnet_edge.runtime.preprocess import Preprocess, read_image

    class NumpyBackend:
        """A fixed random linear read-out in numpy: the runtime path without any model."""

        name = "numpy"

        def __init__(self):
            self.w = np.random.default_rng(0).normal(size=(68, 72)).astype(np.float32)

        def __call__(self, x):
            cols = x[0].reshape(72, 94)[:, :90].reshape(72, 18, 5).mean(axis=2)
            return (self.w @ cols)[None]

    folder, weights = sys.argv[1], sys.argv[2]
    cs = load_charset()
    paths = sorted(str(p) for p in __import__("pathlib").Path(folder).iterdir())
    x = Preprocess()(read_image(paths[0]))
    assert x.shape == (1, 3, 24, 94) and x.dtype == np.float32

    # Decoding a known best path.
    logits = np.full((68, 18), -5.0, dtype=np.float32)
    path = [cs.index[c] for c in "皖A12345" for _ in range(2)] + [cs.blank] * 4
    logits[path, np.arange(18)] = 5.0
    text, conf = decode_text(logits, cs.chars, cs.blank)
    assert text == "皖A12345" and 0 < conf <= 1, (text, conf)

    rec = Recognizer(NumpyBackend(), cs)
    results = rec.recognize(paths)
    assert all(isinstance(r, PlateResult) for r in results)
    res = evaluate(rec, folder)
    stats = rec.benchmark(paths[0], runs=5, warmup=1)

    assert "torch" not in sys.modules, "the runtime path imported torch"

    print(json.dumps({
        "version": lprnet_edge.__version__,
        "reads": [[r.text, r.confidence] for r in results],
        "count": res.count,
        "correct": res.correct,
        "runs": stats["runs"],
        "file": lprnet_edge.__file__,
    }, ensure_ascii=False))
''')


def run(cmd: list, timeout: float, env: dict | None = None, cwd: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       env=env, cwd=cwd)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", **extra)
    return env


def requirement(name: str) -> str:
    """``name==<the host's version>`` when installed here (found in the pip cache), else name."""
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


def test_imports_do_not_load_torch():
    """Quick check on this machine (torch installed): the runtime modules and the CLI with every
    command registered (as ``main()`` does) leave torch unimported."""
    code = textwrap.dedent("""
        import sys
        import lprnet_edge
        from lprnet_edge import Recognizer
        from lprnet_edge.cli.main import cli
        import lprnet_edge.runtime.evaluate, lprnet_edge.model.weights, lprnet_edge.runtime.backends
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
    """)
    p = run([sys.executable, "-c", code], timeout=300, env=clean_env(), cwd=REPO, check=False)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="session")
def runtime_venv(tmp_path_factory) -> Path:
    """A venv without system site packages, with the runtime requirements and this package."""
    root = tmp_path_factory.mktemp("no-torch")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=300, env=clean_env())
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", *map(requirement, RUNTIME_REQUIREMENTS)],
        timeout=900, env=clean_env())
    # Install a copy of the project (a build writes build/ and *.egg-info into its source).
    src = root / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("lprnet_edge", "targets", "cross_compile"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
    run([py, "-m", "pip", "install", "-q", "--no-deps", src], timeout=900, env=clean_env())
    return venv


@pytest.mark.slow
def test_venv_has_no_torch(runtime_venv):
    py = runtime_venv / "bin" / "python"
    p = run([py, "-c", "import importlib.util as u, sys; "
                       "sys.exit(0 if u.find_spec('torch') is None else 1)"],
            timeout=120, env=clean_env(), check=False)
    assert p.returncode == 0, "the venv can import torch: the test would prove nothing"


@pytest.mark.slow
def test_runtime_works_without_torch(runtime_venv, test_images, weights_path, tmp_path):
    folder = copy_images(test_images[:5], tmp_path / "plates")
    script = tmp_path / "runtime_check.py"
    script.write_text(SCRIPT, encoding="utf-8")
    args = [script, folder, weights_path]
    venv_run = run([runtime_venv / "bin" / "python", *args], timeout=300, env=clean_env(),
                   cwd=tmp_path)
    got = json.loads(venv_run.stdout)
    assert Path(got["file"]).is_relative_to(runtime_venv)  # the installed copy, not the tree
    assert got["count"] == 5 and got["runs"] == 5
    # The same script on the development install (torch present, but not imported) agrees.
    host = json.loads(run([sys.executable, *args], timeout=300, env=clean_env(),
                          cwd=tmp_path).stdout)
    assert got["version"] == host["version"]
    assert [t for t, _ in got["reads"]] == [t for t, _ in host["reads"]]
    assert [c for _, c in got["reads"]] == pytest.approx([c for _, c in host["reads"]],
                                                         abs=1e-6)
    assert got["correct"] == host["correct"]


@pytest.mark.slow
def test_cli_without_torch(runtime_venv, test_images, weights_path, tmp_path):
    exe = runtime_venv / "bin" / "lprnet-edge"
    env = clean_env(LPRNET_EDGE_CACHE=str(tmp_path / "cache"))
    env.pop("LPRNET_EDGE_DATA", None)
    env.pop("LPRNET_EDGE_WEIGHTS", None)
    p = run([exe, "--help"], timeout=300, env=env)
    assert "Usage: lprnet-edge" in p.stdout
    for cmd in (["eval"], ["recognize"], ["weights", "download"]):
        assert run([exe, *cmd, "--help"], timeout=300, env=env).returncode == 0
    # Getting the weights needs no torch.
    p = run([exe, "weights", "download", "--url", weights_path.as_uri()], timeout=300, env=env)
    assert "verified" in p.stdout
    p = run([exe, "weights", "path"], timeout=300, env=env)
    assert p.stdout.strip().startswith(str(tmp_path / "cache"))
    # Running PyTorch weights does: a clear error, not an ImportError traceback.
    p = run([exe, "recognize", test_images[0], "--weights", weights_path], timeout=300,
            env=env, check=False)
    assert p.returncode != 0
    assert p.stderr.startswith("Error:") and "PyTorch" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr + p.stdout


@pytest.mark.slow
def test_loading_an_artifact_keeps_torch_out(tiny_tvm_artifact):
    """On a host with PyTorch, loading and running a compiled artifact does not import torch
    (tvm_ffi would, for seconds, to exchange tensors with it), and torch still imports, and
    exchanges tensors with TVM, afterwards."""
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from lprnet_edge import Recognizer

        rec = Recognizer.from_artifact(sys.argv[1])
        y = rec.backend(np.zeros((1, 3, 24, 94), np.float32))
        assert "torch" not in sys.modules, "loading the artifact imported torch"
        import torch
        import tvm_ffi

        t = tvm_ffi.from_dlpack(torch.arange(4, dtype=torch.float32))
        print(list(y.shape), list(t.shape))
    """)
    p = run([sys.executable, "-c", code, tiny_tvm_artifact], timeout=600, env=clean_env(),
            cwd=REPO)
    assert p.stdout.split() == ["[1,", "68,", "18]", "[4]"], p.stdout
