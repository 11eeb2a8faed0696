"""One tiny host TVM artifact per test session, built by the real pipeline (``build_artifact``).

A randomly initialised LPRNet (the ``tiny_model`` of tests/conftest.py, same seeds) compiled
untuned for this machine: small to build, and a real ``model.so`` + ``params.npz`` + manifest.
Test modules use :func:`tiny_tvm_artifact`; the cache below makes it one build per session
even when several modules ask for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_BUILT: dict[str, Path] = {}


def build_tiny_artifact(root: Path) -> Path:
    import torch
    from conftest import randomize_batchnorm

    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.model.checkpoint import save_checkpoint
    from lprnet_edge.model.lprnet import LPRNet
    from lprnet_edge.pipeline.build import BuildOptions, build_artifact

    torch.manual_seed(0)
    model = LPRNet(class_num=68)
    randomize_batchnorm(model)
    save_checkpoint(model.eval(), root / "tiny.pth")
    res = build_artifact(BuildOptions(target=load_target("host"), out=root / "lprnet-tiny",
                                      weights=root / "tiny.pth", verify_images=0),
                         log=lambda _m: None)
    return Path(res.path)


@pytest.fixture(scope="session")
def tiny_tvm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("tvm")
    if "path" not in _BUILT:
        _BUILT["path"] = build_tiny_artifact(tmp_path_factory.mktemp("tiny-tvm"))
    return _BUILT["path"]
