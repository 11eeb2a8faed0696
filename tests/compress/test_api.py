"""The compression API: one config class per technique, a handler registry, typed results."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

torch = pytest.importorskip("torch")

from lprnet_edge.compress.api import (  # noqa: E402
    PrunedModel,
    QuantizedModel,
    compress,
    register_handler,
)
from lprnet_edge.compress.configs import (  # noqa: E402
    ChannelPruneConfig,
    Fp16WeightsConfig,
    Int8Config,
    Int8WeightsConfig,
    PruneConfig,
    QuantizeConfig,
    UnstructuredPruneConfig,
)
from lprnet_edge.runtime.errors import LprnetEdgeError  # noqa: E402

ALL = [UnstructuredPruneConfig(sparsity=0.7), ChannelPruneConfig(ratio=0.25, round_to=16),
       Fp16WeightsConfig(), Int8WeightsConfig(per_channel=False),
       Int8Config(calibrator="mse", fallback_layers=("container.0",))]


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: type(c).__name__)
def test_configs_round_trip_through_the_manifest(cfg):
    family = PruneConfig if isinstance(cfg, PruneConfig) else QuantizeConfig
    d = json.loads(json.dumps(cfg.to_dict()))  # as the manifest stores it
    assert d[family.tag_key] == cfg.tag  # the "kind" / "mode" discriminator
    assert family.from_dict(d) == cfg and type(cfg).from_dict(d) == cfg
    # Calling the family with the discriminator builds the technique's class.
    assert family(**{family.tag_key: cfg.tag}) == type(cfg)()


@pytest.mark.parametrize(("family", "d", "key"), [
    (PruneConfig, {"kind": "channels", "sparsity": 0.8, "ratio": 0.5}, "sparsity"),
    (PruneConfig, {"kind": "unstructured", "sparsity": 0.8, "ratio": 0.5}, "ratio"),
    (PruneConfig, {"kind": "unstructured", "distill_epochs": 30}, "distill_epochs"),
    (QuantizeConfig, {"mode": "fp16", "calibrator": "percentile"}, "calibrator"),
    (QuantizeConfig, {"mode": "int8-weights", "calib_images": 256}, "calib_images"),
], ids=["channels-sparsity", "unstructured-ratio", "unstructured-distill", "fp16-calibrator",
        "int8-weights-calib"])
def test_options_of_another_technique_are_refused(family, d, key):
    """A config records only its own technique's options: another's is a mistake, not ignored."""
    tech = family.technique(d[family.tag_key])
    with pytest.raises(LprnetEdgeError, match=rf"{tech.__name__}: unknown options \['{key}'\]; "
                                              r"use one of \["):
        family.from_dict(d)


def test_config_errors_name_the_choices():
    with pytest.raises(LprnetEdgeError, match=r"kind 'magic': use one of \['channels', "):
        PruneConfig(kind="magic")
    with pytest.raises(LprnetEdgeError, match="unknown options"):
        ChannelPruneConfig.from_dict({"kind": "channels", "bogus": 1})
    with pytest.raises(LprnetEdgeError, match="is not 'int8'"):
        Int8Config.from_dict({"mode": "fp16"})
    with pytest.raises(LprnetEdgeError, match="channel groups"):
        ChannelPruneConfig(groups=("b9_mid",))
    with pytest.raises(LprnetEdgeError, match="calibrator"):
        Int8Config(calibrator="magic")


def test_a_new_technique_is_a_class_and_a_handler(tiny_model):
    @dataclass(frozen=True)
    class HalfBiasConfig(QuantizeConfig):
        mode: ClassVar[str] = "test-half-bias"
        fallback_layers: tuple[str, ...] = ()

    @register_handler(HalfBiasConfig)
    def _half_bias(model, cfg, calib=None, **_):  # noqa: ANN001, ANN202
        import copy

        m = copy.deepcopy(model)
        with torch.no_grad():
            m.container[0].bias.mul_(0.5)
        return QuantizedModel(m, cfg, {"halved": 1})

    res = compress(tiny_model, QuantizeConfig(mode="test-half-bias"))
    assert isinstance(res, QuantizedModel) and res.report == {"halved": 1}
    assert torch.equal(res.module.container[0].bias, tiny_model.container[0].bias * 0.5)
    assert QuantizeConfig.from_dict({"mode": "test-half-bias"}) == HalfBiasConfig()

    @dataclass(frozen=True)
    class Unhandled(PruneConfig):
        kind: ClassVar[str] = "test-unhandled"

    with pytest.raises(LprnetEdgeError, match="no compression handler for Unhandled"):
        compress(tiny_model, Unhandled())


def test_builtin_handlers_return_typed_results(tiny_model):
    res = compress(tiny_model, UnstructuredPruneConfig(sparsity=0.5))
    assert isinstance(res, PrunedModel) and res.report["kind"] == "unstructured"
    assert "sparse" in res.param_encodings.values()  # the pruned convs, as folded
    q = compress(res.module, Int8WeightsConfig())
    assert isinstance(q, QuantizedModel) and q.param_encodings["backbone.0.weight"] == "int8"


def test_compress_does_not_import_the_compiler():
    """compress/ sits below compiler/: the int8 Relax rewrite lives in compiler.frontend."""
    pkg = Path(__file__).resolve().parents[2] / "lprnet_edge" / "compress"
    for f in sorted(pkg.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert not n.startswith(("lprnet_edge.compiler", "lprnet_edge.pipeline",
                                         "tvm")), (f.name, n)
