"""Shared fixtures: the reference data, the pretrained weights, a small random model, the CLI.

The data (``test/``, ``calib/``, ``weights/``) is found through ``$LPRNET_EDGE_DATA``
(default ``<repo>/../shared/lprnet``); tests that need it are skipped when it is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A plugin that test modules also import their helpers from: rewrite its asserts on import.
pytest.register_assert_rewrite("host_device")


def _data_root() -> Path:
    return Path(os.environ.get("LPRNET_EDGE_DATA") or REPO.parent / "shared" / "lprnet").resolve()


# CI sets a relative LPRNET_EDGE_DATA; subprocesses that run in another directory (and
# file:// URLs) need it absolute.
if os.environ.get("LPRNET_EDGE_DATA"):
    os.environ["LPRNET_EDGE_DATA"] = str(_data_root())


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = _data_root()
    if not (root / "test").is_dir():
        pytest.skip(f"reference data not found at {root} (set LPRNET_EDGE_DATA)")
    return root


@pytest.fixture(scope="session")
def test_dir(data_dir: Path) -> Path:
    return data_dir / "test"


@pytest.fixture(scope="session")
def weights_path(data_dir: Path) -> Path:
    p = data_dir / "weights" / "Final_LPRNet_model.pth"
    if not p.is_file():
        pytest.skip(f"pretrained weights not found at {p}")
    return p


@pytest.fixture(scope="session")
def test_images(test_dir: Path) -> list[Path]:
    """The first test images in sorted order (a stable sample)."""
    return sorted(p for p in test_dir.iterdir() if p.suffix == ".jpg")[:12]


@pytest.fixture(scope="session")
def charset():
    from lprnet_edge.runtime.charset import load_charset

    return load_charset()


@pytest.fixture
def tiny_model():
    """A randomly initialised LPRNet (68 classes) with non-trivial BatchNorm statistics."""
    torch = pytest.importorskip("torch")
    from lprnet_edge.model.lprnet import LPRNet

    torch.manual_seed(0)
    model = LPRNet(class_num=68)
    randomize_batchnorm(model)
    return model.eval()


def randomize_batchnorm(model) -> None:
    """Give every BatchNorm random running statistics and affine parameters."""
    import torch

    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture
def one_torch_thread():
    """Run PyTorch on one thread: LPRNet at batch 1 gains little from more, and a busy
    machine (2 cores shared with compiles) makes spinning thread pools many times slower.
    Results are the same; only the time changes."""
    from lprnet_edge.compress.accuracy import torch_one_thread

    with torch_one_thread():
        yield


@pytest.fixture
def tiny_checkpoint(tiny_model, tmp_path: Path) -> Path:
    """``tiny_model`` saved in lprnet-edge's checkpoint format."""
    from lprnet_edge.model.checkpoint import save_checkpoint

    p = tmp_path / "tiny.pth"
    save_checkpoint(tiny_model, p)
    return p


@pytest.fixture
def fresh_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                ) -> Path:
    """An empty cache of this test's own (never the user's ``~/.cache/lprnet-edge``), and no
    inherited ``$LPRNET_EDGE_WEIGHTS`` override."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("LPRNET_EDGE_CACHE", str(cache))
    monkeypatch.delenv("LPRNET_EDGE_WEIGHTS", raising=False)
    return cache


def register_commands():
    """The root group with every command (``lprnet_edge.cli.main`` adds them on import)."""
    from lprnet_edge.cli.main import cli

    return cli


class CliRunner:
    """Runs ``lprnet-edge ARGS`` in-process; ``result.stdout``/``stderr``/``output``."""

    def __init__(self, root) -> None:
        from click.testing import CliRunner as _Runner

        self.root = root
        self._runner = _Runner()

    def __call__(self, *args: str, input: str | None = None, env: dict | None = None):
        return self._runner.invoke(self.root, [str(a) for a in args], input=input, env=env,
                                   prog_name="lprnet-edge", catch_exceptions=True)


@pytest.fixture(scope="session")
def cli_root():
    return register_commands()


@pytest.fixture
def cli_runner(cli_root) -> CliRunner:
    return CliRunner(cli_root)


def assert_user_error(result, *fragments: str) -> None:
    """A user mistake: ``Error: ...``, a non-zero exit code, and no traceback."""
    text = result.output  # stdout and stderr, as a user sees them
    assert result.exit_code != 0, text
    assert "Error:" in text, text
    assert "Traceback" not in text, text
    # An exception escaping click is a crash, not a handled user error.
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception))
    for f in fragments:
        assert f in text, (f, text)


def copy_images(paths: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy(p, dest / p.name)
    return dest


@pytest.fixture(scope="session")
def tiny_tvm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny host TVM artifact per test session (``tiny.pth`` beside it), built untuned by
    the real pipeline from a randomly initialised LPRNet: a real ``model.so`` + ``params.npz``
    + manifest, shared by every module that only reads it (a build takes ~30 s)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("tvm")
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.model.checkpoint import save_checkpoint
    from lprnet_edge.model.lprnet import LPRNet
    from lprnet_edge.pipeline.build import BuildOptions, build_artifact

    root = tmp_path_factory.mktemp("tiny-tvm")
    torch.manual_seed(0)
    model = LPRNet(class_num=68)
    randomize_batchnorm(model)
    save_checkpoint(model.eval(), root / "tiny.pth")
    res = build_artifact(BuildOptions(target=load_target("host"), out=root / "lprnet-tiny",
                                      weights=root / "tiny.pth", verify_images=0),
                         log=lambda _m: None)
    return Path(res.path)


# Source to put first in a ``python -c`` program: with argv[1] == "block", importing
# onnxruntime fails there as if it were not installed (a test that needs it absent cannot undo
# an import in its own process). The program's own arguments start at argv[2].
BLOCK_ONNXRUNTIME = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError(f"blocked for this test: {name}")
        return None

if sys.argv[1] == "block":
    sys.meta_path.insert(0, Block())
"""
