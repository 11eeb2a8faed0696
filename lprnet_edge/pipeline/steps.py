"""The work of the model-changing and compiling stages, as plain functions of typed values.

The stage objects (:mod:`.stages`) and the search's candidate builds (:mod:`.candidates`)
both call these, so a candidate is built exactly as the final artifact would be.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.compiler.compile import build
from lprnet_edge.compiler.config import CompileConfig
from lprnet_edge.compiler.dot import KINDS, int8_dot
from lprnet_edge.compiler.frontend import to_relax
from lprnet_edge.compiler.target import TargetSpec
from lprnet_edge.compiler.threads import ThreadConfig
from lprnet_edge.compiler.toolchain import Compiler
from lprnet_edge.compiler.tuning import TuneConfig, TuneOptions, TuningSummary, tune
from lprnet_edge.compress.accuracy import VALIDATION
from lprnet_edge.compress.api import PrunedModel, QuantizedModel, compress
from lprnet_edge.compress.configs import PruneConfig, QuantizeConfig
from lprnet_edge.compress.quantize import quantize
from lprnet_edge.model.calib import CalibrationSet
from lprnet_edge.model.checkpoint import load_model
from lprnet_edge.model.weights import resolve_weights
from lprnet_edge.pipeline.values import (
    MODEL_FILE,
    PARAMS_FILE,
    CompiledModule,
    Log,
    RelaxModel,
    TorchModel,
)
from lprnet_edge.runtime.charset import Charset, load_charset
from lprnet_edge.runtime.errors import LprnetEdgeError
from lprnet_edge.runtime.files import sha256_file
from lprnet_edge.runtime.params_codec import save_params


def load_torch(weights: str | Path | None = None, charset: str | Charset = "chinese68"
               ) -> TorchModel:
    """The PyTorch model of ``weights`` (resolved like every command: --weights, env, cache)."""
    cs = charset if isinstance(charset, Charset) else load_charset(charset)
    path = resolve_weights(weights)
    model = load_model(path, num_classes=len(cs))
    return TorchModel(model=model, reference=model, original=model, weights=Path(path),
                      weights_sha256=sha256_file(path), charset=cs)


def calibration_set(calib_dir: Path | None, tm: TorchModel) -> CalibrationSet:
    """The fine-tuning's data when ``tm`` was fine-tuned (its held-out split must stay held
    out for every later stage), else calib/."""
    if tm.calib is not None:
        return tm.calib
    return CalibrationSet.load(calib_dir, charset=tm.charset)


def prune_model(tm: TorchModel, cfg: PruneConfig, calib_dir: Path | None = None) -> TorchModel:
    """``compress(model, cfg, calib) -> PrunedModel`` (calib: the ``calib/`` images)."""
    res = compress(tm.model, cfg, calibration_set(calib_dir, tm))
    if not isinstance(res, PrunedModel):
        raise LprnetEdgeError(f"{type(cfg).__name__} is not a pruning config")
    return adopt_pruned(tm, res)


def adopt_pruned(tm: TorchModel, res: PrunedModel) -> TorchModel:
    """``tm`` continuing with the :class:`PrunedModel` ``res`` (from pruning here, or the
    model the search distilled and measured)."""
    tm.model = tm.reference = res.module
    tm.param_encodings = res.param_encodings
    tm.stages["prune"] = res.config.to_dict()
    tm.reports["prune"] = res.report
    return tm


def quantize_model(tm: TorchModel, cfg: QuantizeConfig, calib_dir: Path | None = None
                   ) -> TorchModel:
    """``quantize(model, cfg, calib) -> QuantizedModel``, calibrated on the training part of
    the validation split (the accuracy check measures on the other part). The result is what
    gets compiled; its ``module`` is the PyTorch reference."""
    train, _val = VALIDATION.of(calibration_set(calib_dir, tm))
    res = quantize(tm.model, cfg, train)
    tm.model = res
    tm.reference = res.module
    tm.param_encodings = res.param_encodings
    tm.verify_tolerance = res.verify_tolerance
    tm.stages["quantize"] = res.config.to_dict()
    tm.reports["quantize"] = res.report
    return tm


def import_model(tm: TorchModel, frontend: str = "torch.export", layout: str = "NHWC",
                 target: TargetSpec | None = None) -> RelaxModel:
    """``to_relax(tm.model)``: a torch module, or a compression result (typed dispatch);
    int8 convolutions use ``target``'s integer dot-product instructions when it has them."""
    t0 = time.perf_counter()

    def record(fold: Any) -> None:  # what channel folding removed, for the manifest
        tm.reports["channel_fold"] = {"summary": fold.summary(), "kept": fold.kept}

    dot = _int8_dot(tm, target)
    mod, params = to_relax(tm.model, frontend, on_fold=record, layout=layout,
                           int8_dot=dot.get("dot"))
    return RelaxModel(mod, params, frontend, time.perf_counter() - t0)


def _int8_dot(tm: TorchModel, target: TargetSpec | None) -> dict[str, Any]:
    """For a model with int8 convolutions: the integer dot-product instructions ``target``
    gives them, recorded in ``tm.reports["int8"]`` with what it means for speed."""
    if target is None or not (isinstance(tm.model, QuantizedModel) and tm.model.int8_convs):
        return {}
    dot = int8_dot(target.tvm_target())
    if dot is not None:
        note = f"int8 convolutions tensorized with {KINDS[dot].description}"
    else:
        note = (f"no integer dot-product instructions on {target.name} (x86 needs "
                "AVX2): the int8 convolutions multiply widened int32 lanes and may be "
                "slower than float32. Compare on the device with `--max-accuracy-drop P "
                "--optimize latency`, or build without --quantize int8")
    tm.reports["int8"] = {"dot": dot, "note": note}
    return tm.reports["int8"]


def tune_model(relax_model: RelaxModel, target: TargetSpec, cfg: TuneConfig, log: Log,
               compiler: Compiler | None = None) -> tuple[Any, TuningSummary]:
    """``(database, summary)`` of MetaSchedule tuning; ``compiler`` links the candidates
    measured on a device (the one that links the artifact); ``cfg.tasks`` restricts tuning to
    those tasks (the others keep default schedules)."""
    return tune(relax_model.mod, target, cfg, log=log,
                options=TuneOptions(cc=compiler, tasks=list(cfg.tasks) or None))


def compile_model(relax_model: RelaxModel, target: TargetSpec, out_dir: Path,
                  compiler: Compiler, config: CompileConfig, tm: TorchModel | None = None,
                  database: Any = None, log: Log | None = None,
                  summary: TuningSummary | None = None) -> CompiledModule:
    """``model.so`` (compiled and linked for ``target``) and ``params.npz`` into ``out_dir``;
    ``summary``: the tuning that filled ``database``."""
    out_dir = Path(out_dir)
    estimated = summary is not None and summary.estimated is not None
    cores = config.num_threads or target.cores
    info = build(relax_model.mod, target, out_dir / MODEL_FILE, compiler, database=database,
                 opt_level=config.opt_level, log=log, estimated=estimated,
                 thread_config=ThreadConfig(cores))
    encodings = choose_encodings(tm, relax_model.params, config.layout) if tm else {}
    save_params(out_dir / PARAMS_FILE, relax_model.params, encodings or "dense")
    info["import_s"] = round(relax_model.import_s, 3)
    info["frontend"] = relax_model.frontend
    return CompiledModule(out_dir, target, compiler, list(relax_model.params),
                          {n: encodings.get(n, "dense") for n in relax_model.params}, info)


def choose_encodings(tm: TorchModel, params: dict[str, np.ndarray],
                     layout: str = "NCHW") -> dict[str, str]:
    """Storage encoding of each compiled parameter: the compression result's own choice
    (``param_encodings``: sparse for pruned convs, fp16/int8 per quantization technique, on
    the BatchNorm-folded model that is compiled), else dense. In NHWC the convolution
    weights are HWIO: their per-output-channel int8 scales run along the last axis.
    Weights that are not float32 (the int8 graph's, quantized at build time) are ``raw``."""
    enc = map_names(tm.param_encodings or {}, list(params))
    enc = {n: "raw" if params[n].dtype != np.float32 else e for n, e in enc.items()}
    if layout == "NHWC":
        enc = {n: "int8-last" if e == "int8" and params[n].ndim == 4 else e
               for n, e in enc.items()}
    return enc


def norm_name(name: str) -> str:
    """A parameter's name with the exporter's decorations removed, so state-dict names and
    compiled names (``backbone.0.weight``, ``p_backbone_0_weight``) compare equal."""
    n = name.replace(".", "_")
    return n[2:] if n.startswith("p_") else n


def map_names(encodings: dict[str, str], param_names: list[str]) -> dict[str, str]:
    """Encodings keyed by compiled names (``p_backbone_0_weight``), from state-dict names."""
    by_norm = {norm_name(k): v for k, v in encodings.items()}
    return {p: encodings.get(p, by_norm.get(norm_name(p), "dense")) for p in param_names}
