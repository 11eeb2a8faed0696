"""Build an artifact: typed stages, each a function from one value to the next (tvmc-style).

::

    load_stage(weights)                      -> ModelArtifact   (PyTorch model + provenance)
    prune_stage / quantize_stage (optional)  -> ModelArtifact   (compress.prune / .quantize)
    import_stage(art, frontend, layout, target) -> RelaxModel      (Relax IRModule + named weights)
    tune_stage (optional)                    -> MetaSchedule database (lprnet_edge.compiler.tune)
    compile_stage(relax, target, ...)        -> CompiledModule  (model.so + params.npz in a dir)
    verify_stage(art, compiled, ...)         -> verification dict (host: run and compare)
    package_stage(art, compiled, ...)        -> manifest.json, then the directory moves in place

:func:`build_artifact` runs them in order, printing ``[i/n] stage ... 1.2s`` lines. The output
directory is staged beside its final place and only renamed there once everything (including
verification) succeeded: a failed build leaves no artifact and keeps a previous one intact.
Host side (torch, TVM compiler), all imported lazily.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.compiler.target import TargetSpec
from lprnet_edge.compiler.toolchain import Compiler, find_compiler
from lprnet_edge.compress.configs import CompileConfig, PruneConfig, QuantizeConfig, TuneConfig
from lprnet_edge.paths import data_subdir
from lprnet_edge.pipeline.interrupt import InterruptGuard, pause_for_tests
from lprnet_edge.runtime import __version__
from lprnet_edge.runtime.artifact import (
    MANIFEST,
    Artifact,
    FileEntry,
    InputSpec,
    Manifest,
    RuntimeSpec,
    TargetInfo,
    machine_arch,
    sha256_file,
    staging_dir,
    write_json_atomic,
)
from lprnet_edge.runtime.charset import Charset, load_charset
from lprnet_edge.runtime.errors import ArtifactError, DataError, LprnetEdgeError
from lprnet_edge.runtime.preprocess import Preprocess

MODEL_FILE = "model.so"
PARAMS_FILE = "params.npz"
LOSSLESS = ("dense", "sparse")
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- values passed between stages


@dataclass
class ModelArtifact:
    """A model on its way to an artifact, with where it came from and what was done to it.

    ``model`` is what gets compiled: an ``nn.Module``, or a
    :class:`lprnet_edge.compress.api.CompressedModel` (``compiler.frontend.to_relax``
    dispatches on its type: a quantized one compiles its int8 convolutions as int8).
    ``reference`` is the PyTorch module verification compares against (None: no logit
    comparison); ``original`` is the model as loaded (for the accuracy guard and
    ``--max-accuracy-drop``). ``param_encodings`` and ``verify_tolerance`` come from the
    compression result's typed fields.
    """

    model: Any
    reference: Any
    original: Any
    weights: Path
    weights_sha256: str
    charset: Charset
    stages: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)
    param_encodings: dict[str, str] | None = None  # state-dict or compiled names -> encoding
    verify_tolerance: float | None = None  # overrides CompileConfig.verify_tolerance
    calib: Any = None  # a fine-tuning's data, its validation split fixed in it


@dataclass
class RelaxModel:
    mod: Any  # tvm.IRModule, main(x, *params)
    params: dict[str, np.ndarray]  # in main's order
    frontend: str
    import_s: float = 0.0


@dataclass
class CompiledModule:
    """``model.so`` and ``params.npz`` written in ``root`` (the staging directory)."""

    root: Path
    target: TargetSpec
    compiler: Compiler
    param_order: list[str]
    encodings: dict[str, str]
    info: dict[str, Any]
    extra_files: list[str] = field(default_factory=list)  # e.g. verify.npz for the device

    @property
    def files(self) -> list[str]:
        """Every file of the artifact but the manifest, as listed (and checksummed) in it."""
        return [MODEL_FILE, PARAMS_FILE, *self.extra_files]

    @property
    def lib_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def params_path(self) -> Path:
        return self.root / PARAMS_FILE

    def runtime_entry(self, num_threads: int | None = None) -> RuntimeSpec:
        from lprnet_edge.compiler.frontend import ENTRY

        return RuntimeSpec(entry=ENTRY, params=PARAMS_FILE, param_order=tuple(self.param_order),
                           num_threads=num_threads or None)

    def artifact(self, charset: Charset, num_threads: int | None = None,
                 records: dict[str, Any] | None = None) -> Artifact:
        """The staged directory as an :class:`Artifact` (checksums of the files as written),
        verified; ``records`` are the manifest's build records (empty while verifying)."""
        target = self.target
        manifest = Manifest(
            backend="tvm", model_file=MODEL_FILE,
            target=TargetInfo(
                name=target.name, arch=target.arch, description=target.description,
                tvm=_jsonable(dict(target.tvm)),
                toolchain=_jsonable({**{k: v for k, v in target.toolchain.items()
                                        if k != "compiler"}, **self.compiler.to_dict()}),
                device=_jsonable(dict(target.device))),
            input=InputSpec(name="x", shape=(1, 3, 24, 94), layout="NCHW", dtype="float32",
                            color="BGR"),
            preprocess=Preprocess(), charset=charset,
            files={n: FileEntry.of(self.root / n) for n in self.files},
            runtime=self.runtime_entry(num_threads), records=records or {})
        return Artifact(self.root, manifest).verify(check_arch=False)


@dataclass
class BuildOptions:
    target: TargetSpec
    out: Path
    weights: str | Path | None = None
    cc: str | None = None
    force: bool = False
    bundle: bool = False
    charset: str = "chinese68"
    compile: CompileConfig = field(default_factory=CompileConfig)
    prune: PruneConfig | None = None
    quantize: QuantizeConfig | None = None
    tune: TuneConfig | None = None
    calib_dir: Path | None = None  # default: $LPRNET_EDGE_DATA/calib
    verify_images: int | None = None  # None: every calib image; 0: skip verification
    eval_test: bool = False
    test_dir: Path | None = None  # default: $LPRNET_EDGE_DATA/test
    max_accuracy_drop: float | None = None  # points of calib/ plate accuracy
    search_channels: tuple[float, ...] = ()  # channel-pruning ratios the search also tries
    optimize: str = "size"  # the search's winner: "size" (smallest) or "latency" (fastest)
    latency_rpc: str | None = None  # "HOST:PORT": time the search's candidates there
    name: str | None = None  # artifact name (default: the output directory's name)
    finetune: Any = None  # a model.finetune.FinetuneConfig: fine-tune first


@dataclass
class BuildResult:
    path: Path
    manifest: dict[str, Any]
    bundle: Path | None
    timings: list[tuple[str, float]]

    @property
    def total_s(self) -> float:
        return sum(t for _, t in self.timings)


# ---------------------------------------------------------------- progress


class Stages:
    """``[i/n] name ... 1.2s`` lines on the log (stderr in the CLI)."""

    def __init__(self, names: list[str], log: Log, guard: InterruptGuard | None = None) -> None:
        self.names = names
        self.log = log
        self.timings: list[tuple[str, float]] = []
        self.guard = guard or InterruptGuard()

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[dict[str, str]]:
        i = self.names.index(name) + 1
        n = len(self.names)
        head = f"[{i}/{n}] {name:<8}"
        self.guard.check()
        self.log(f"{head} {detail}".rstrip() + " ...")
        pause_for_tests(name)
        note: dict[str, str] = {}
        t0 = time.perf_counter()
        yield note
        self.guard.check()  # a signal a library swallowed still ends the build here
        dt = time.perf_counter() - t0
        self.timings.append((name, dt))
        result = f": {note['result']}" if note.get("result") else ""
        self.log(f"{head} done in {dt:.1f}s{result}")


# ---------------------------------------------------------------- stages


def load_stage(weights: str | Path | None = None, charset: str | Charset = "chinese68"
               ) -> ModelArtifact:
    """The PyTorch model of ``weights`` (resolved like every command: --weights, env, cache)."""
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.weights import resolve_weights

    cs = charset if isinstance(charset, Charset) else load_charset(charset)
    path = resolve_weights(weights)
    model = load_model(path, num_classes=len(cs))
    return ModelArtifact(model=model, reference=model, original=model, weights=Path(path),
                         weights_sha256=sha256_file(path), charset=cs)


def _calibration_set(calib_dir: Path | None, art: ModelArtifact) -> Any:
    """The fine-tuning's data when the model was fine-tuned (its split is the one every later
    stage uses), else calib/."""
    from lprnet_edge.model.calib import CalibrationSet

    if art.calib is not None:
        return art.calib
    return CalibrationSet.load(calib_dir, charset=art.charset)


def prune_stage(art: ModelArtifact, cfg: PruneConfig, calib_dir: Path | None = None
                ) -> ModelArtifact:
    """``compress(model, cfg, calib) -> PrunedModel`` (calib: the ``calib/`` images)."""
    from lprnet_edge.compress.api import PrunedModel, compress

    calib = _calibration_set(calib_dir, art)
    res = compress(art.model, cfg, calib)
    if not isinstance(res, PrunedModel):
        raise LprnetEdgeError(f"{type(cfg).__name__} is not a pruning config")
    return adopt_pruned(art, res)


def adopt_pruned(art: ModelArtifact, res: Any) -> ModelArtifact:
    """``art`` continuing with the :class:`PrunedModel` ``res`` (from the prune stage, or the
    model the selection distilled and measured)."""
    art.model = art.reference = res.module
    art.param_encodings = res.param_encodings
    art.stages["prune"] = res.config.to_dict()
    art.reports["prune"] = res.report
    return art


def quantize_stage(art: ModelArtifact, cfg: QuantizeConfig, calib_dir: Path | None = None
                   ) -> ModelArtifact:
    """``quantize(model, cfg, calib) -> QuantizedModel``, calibrated on the training part of
    the calib/ split (the accuracy guard measures on the other part). The result is what
    gets compiled; its ``module`` is the PyTorch reference."""
    from lprnet_edge.compress.quantize import quantize

    train, _val = guard_split(_calibration_set(calib_dir, art))
    res = quantize(art.model, cfg, train)
    art.model = res
    art.reference = res.module
    art.param_encodings = res.param_encodings
    art.verify_tolerance = res.verify_tolerance
    art.stages["quantize"] = res.config.to_dict()
    art.reports["quantize"] = res.report
    return art


# The accuracy guard of a build that changes the model: the split select.py decides on.
GUARD_VAL_FRACTION = 0.3
GUARD_SEED = 0
DEFAULT_MAX_ACCURACY_DROP = 1.0  # points, without an explicit --max-accuracy-drop


def guard_split(calib: Any) -> tuple[Any, Any]:
    """(train, validation) of calib/: compression fits on the first, the guard reads the
    second."""
    return calib.split(GUARD_VAL_FRACTION, GUARD_SEED)


def guard_stage(art: ModelArtifact, calib_dir: Path | None = None,
                max_drop_points: float | None = None) -> dict[str, Any]:
    """Plate accuracy of the compressed PyTorch model (``art.reference``: for int8 its exact
    simulation) against the original on the calib/ validation split; raises past
    ``max_drop_points`` (default :data:`DEFAULT_MAX_ACCURACY_DROP`). Runs before compiling,
    so a bad setting costs seconds, not a build."""
    from lprnet_edge.model.calib import decode_batch, predict_logits

    _train, val = guard_split(_calibration_set(calib_dir, art))
    explicit = max_drop_points is not None
    budget = float(max_drop_points) if explicit else DEFAULT_MAX_ACCURACY_DROP
    with torch_one_thread():
        ok_orig = [p == t for p, t in zip(decode_batch(predict_logits(art.original, val.x)),
                                          val.labels, strict=True)]
        ok_new = [p == t for p, t in zip(decode_batch(predict_logits(art.reference, val.x)),
                                         val.labels, strict=True)]
    n = len(val)
    pairs = list(zip(ok_orig, ok_new, strict=True))
    orig, new = sum(ok_orig) / n, sum(ok_new) / n
    drop = 100 * (orig - new)
    split = ({"fraction": GUARD_VAL_FRACTION, "seed": GUARD_SEED} if art.calib is None
             else {"source": "the fine-tuning's validation split"})
    res = {"split": {**split, "images": n},
           "original": orig, "compressed": new, "drop_points": drop, "budget_points": budget,
           "budget_source": "--max-accuracy-drop" if explicit else "default",
           "ok": drop <= budget + 1e-9,
           # Plates the original reads and the compressed model does not (and the converse):
           # a model distilled on calib/ gains plates there, which the drop nets out.
           "lost_points": 100 * sum(a and not b for a, b in pairs) / n,
           "gained_points": 100 * sum(b and not a for a, b in pairs) / n}
    art.reports["accuracy_guard"] = res
    if not res["ok"]:
        head = (f"accuracy drop {drop:.1f} points on the calib/ validation split ({len(val)} "
                f"plates: original {orig:.3f}, compressed {new:.3f})")
        if explicit:
            raise ArtifactError(f"{head} exceeds --max-accuracy-drop {budget:g}. "
                                "No artifact written")
        raise ArtifactError(f"{head} exceeds the default budget of "
                            f"{DEFAULT_MAX_ACCURACY_DROP:g} point: use a milder "
                            "--prune/--quantize setting, or accept the loss explicitly with "
                            f"--max-accuracy-drop {math.ceil(drop * 10) / 10:g}. "
                            "No artifact written")
    return res


def _is_torch_module(obj: Any) -> bool:
    try:
        from torch import nn
    except ImportError:
        return False
    return isinstance(obj, nn.Module)


def import_stage(art: ModelArtifact, frontend: str = "torch.export", layout: str = "NHWC",
                 target: TargetSpec | None = None) -> RelaxModel:
    """``to_relax(art.model)``: a torch module, or a compression result (typed dispatch);
    int8 convolutions use ``target``'s integer dot-product instructions when it has them."""
    from lprnet_edge.compiler.frontend import to_relax

    t0 = time.perf_counter()
    def record(fold: Any) -> None:  # what channel folding removed, for the manifest
        art.reports["channel_fold"] = {"summary": fold.summary(), "kept": fold.kept}

    dot = _int8_dot(art, target)
    mod, params = to_relax(art.model, frontend, on_fold=record, layout=layout,
                           int8_dot=dot.get("dot"))
    return RelaxModel(mod, params, frontend, time.perf_counter() - t0)


def _int8_dot(art: ModelArtifact, target: TargetSpec | None) -> dict[str, Any]:
    """For a model with int8 convolutions: the integer dot-product instructions ``target``
    gives them, recorded in ``art.reports["int8"]`` with what it means for speed."""
    from lprnet_edge.compress.api import QuantizedModel

    if target is None or not (isinstance(art.model, QuantizedModel) and art.model.int8_convs):
        return {}
    from lprnet_edge.compiler.dot import KINDS, int8_dot

    dot = int8_dot(target.tvm_target())
    if dot is not None:
        note = f"int8 convolutions tensorized with {KINDS[dot].description}"
    else:
        note = (f"no integer dot-product instructions on {target.name} (x86 needs "
                "AVX512-VNNI): the int8 convolutions multiply widened int32 lanes and may be "
                "slower than float32. Compare on the device with `--max-accuracy-drop P "
                "--optimize latency`, or build without --quantize int8")
    art.reports["int8"] = {"dot": dot, "note": note}
    return art.reports["int8"]


def tune_stage(relax_model: RelaxModel, target: TargetSpec, cfg: TuneConfig,
               log: Log = _stderr, compiler: Compiler | None = None
               ) -> tuple[Any, dict[str, Any]]:
    """``compiler.tune.tune(mod, target, cfg, log) -> (database, summary)``; ``compiler``
    links the candidates measured on a device (the one that links the artifact);
    ``cfg.tasks`` restricts tuning to those tasks (the others keep default schedules)."""
    from lprnet_edge.compiler import tune as mod

    database, summary = mod.tune(relax_model.mod, target, cfg, log=log, cc=compiler,
                                 tasks=list(cfg.tasks) or None)
    return database, summary


def compile_stage(relax_model: RelaxModel, target: TargetSpec, out_dir: Path,
                  compiler: Compiler, config: CompileConfig, art: ModelArtifact | None = None,
                  database: Any = None, log: Log | None = None) -> CompiledModule:
    """``model.so`` (compiled and linked for ``target``) and ``params.npz`` into ``out_dir``."""
    from lprnet_edge.compiler.build import build
    from lprnet_edge.runtime.params_codec import save_params

    out_dir = Path(out_dir)
    info = build(relax_model.mod, target, out_dir / MODEL_FILE, compiler, database=database,
                 opt_level=config.opt_level, log=log)
    encodings = choose_encodings(art, relax_model.params, config.layout) if art else {}
    save_params(out_dir / PARAMS_FILE, relax_model.params, encodings or "dense")
    info["import_s"] = round(relax_model.import_s, 3)
    info["frontend"] = relax_model.frontend
    return CompiledModule(out_dir, target, compiler, list(relax_model.params),
                          {n: encodings.get(n, "dense") for n in relax_model.params}, info)


def choose_encodings(art: ModelArtifact, params: dict[str, np.ndarray],
                     layout: str = "NCHW") -> dict[str, str]:
    """Storage encoding of each compiled parameter: the compression result's own choice
    (``param_encodings``: sparse for pruned convs, fp16/int8 per quantization technique, on
    the BatchNorm-folded model that is compiled), else dense. In NHWC the convolution
    weights are HWIO: their per-output-channel int8 scales run along the last axis.
    Weights that are not float32 (the int8 graph's, quantized at build time) are ``raw``."""
    enc = _map_names(art.param_encodings or {}, list(params))
    enc = {n: "raw" if params[n].dtype != np.float32 else e for n, e in enc.items()}
    if layout == "NHWC":
        enc = {n: "int8-last" if e == "int8" and params[n].ndim == 4 else e
               for n, e in enc.items()}
    return enc


def _norm_name(name: str) -> str:
    n = name.replace(".", "_")
    return n[2:] if n.startswith("p_") else n


def _map_names(encodings: dict[str, str], param_names: list[str]) -> dict[str, str]:
    """Encodings keyed by compiled names (``p_backbone_0_weight``), from state-dict names."""
    by_norm = {_norm_name(k): v for k, v in encodings.items()}
    return {p: encodings.get(p, by_norm.get(_norm_name(p), "dense")) for p in param_names}


# ---------------------------------------------------------------- verification


@dataclass
class _Images:
    xs: list[np.ndarray]
    labels: list[str | None]
    source: str


def verification_images(calib_dir: Path | None, charset: Charset, limit: int | None,
                        log: Log | None = None) -> _Images:
    """Preprocessed ``calib/`` images (never ``test/``); random inputs if there is none."""
    from lprnet_edge.runtime.dataset import PlateFolder

    folder = Path(calib_dir) if calib_dir else data_subdir("calib")
    if calib_dir:
        from lprnet_edge.model.calib import check_not_test

        check_not_test(folder)  # --calib decides pass/fail: never the test split
    if folder is not None and folder.is_dir():
        pre = Preprocess()
        pf = PlateFolder(folder, charset, skip_bad=True, limit=limit)
        xs, labels = [], []
        for s in pf:
            xs.append(pre(s.image))
            labels.append(s.label)
        if xs:
            return _Images(xs, labels, str(folder))
    n = limit or 32
    if log:
        log(f"  no calib/ images (set LPRNET_EDGE_DATA or --calib): verifying on {n} random "
            "inputs (logits only)")
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-1, 1, size=(1, 3, 24, 94)).astype(np.float32) for _ in range(n)]
    return _Images(xs, [None] * n, "random")




def _torch_logits(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


@contextmanager
def torch_one_thread() -> Iterator[None]:
    """PyTorch on one thread while the reference runs beside the TVM runtime: at batch 1 its
    worker threads only spin against TVM's (20x the CPU time per image on 2 cores)."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def verify_stage(art: ModelArtifact, compiled: CompiledModule, config: CompileConfig,
                 calib_dir: Path | None = None, limit: int | None = None,
                 max_accuracy_drop: float | None = None, log: Log | None = None
                 ) -> dict[str, Any]:
    """Run the staged ``model.so`` + ``params.npz`` through the runtime (``TvmBackend``, as on
    the device) on the calib images and compare with PyTorch; raise if past the tolerance."""
    with torch_one_thread():
        return _verify(art, compiled, config, calib_dir, limit, max_accuracy_drop, log)


def _verify(art: ModelArtifact, compiled: CompiledModule, config: CompileConfig,
            calib_dir: Path | None, limit: int | None, max_accuracy_drop: float | None,
            log: Log | None) -> dict[str, Any]:
    target = compiled.target
    if not target.is_native:
        result: dict[str, Any] = {
            "status": "skipped",
            "reason": f"cross-compiled for {target.arch}; verify on the device with "
                      "`lprnet-edge deploy`",
        }
        if max_accuracy_drop is not None:
            result["accuracy_drop"] = _torch_accuracy_drop(art, calib_dir, limit,
                                                           max_accuracy_drop)
        return result
    from lprnet_edge.runtime.backends import TvmBackend
    from lprnet_edge.runtime.decode import decode_text

    t0 = time.perf_counter()
    images = verification_images(calib_dir, art.charset, limit, log)
    if max_accuracy_drop is not None and not any(y is not None for y in images.labels):
        raise DataError("--max-accuracy-drop needs labelled calib/ images (--calib DIR)")
    backend = TvmBackend(compiled.artifact(art.charset))
    lossy = any(e not in LOSSLESS for e in compiled.encodings.values())
    reference = art.reference
    if reference is not None and lossy:
        reference = _decoded_reference(reference, compiled)
    tol = art.verify_tolerance if art.verify_tolerance is not None else config.verify_tolerance
    chars, blank = art.charset.chars, art.charset.blank
    max_diff = 0.0
    sum_diff = 0.0
    worst = -1
    agree = tvm_ok = ref_ok = orig_ok = labelled = 0
    for i, (x, label) in enumerate(zip(images.xs, images.labels, strict=True)):
        out = backend(x)
        if not np.all(np.isfinite(out)):
            raise ArtifactError("verification failed: the compiled model produced NaN/inf "
                                "logits; no artifact written")
        text = decode_text(out[0], chars, blank)[0]
        if reference is not None:
            ref = _torch_logits(reference, x)
            d = np.abs(out - ref)
            if float(d.max()) > max_diff:
                max_diff, worst = float(d.max()), i
            sum_diff += float(d.mean())
            ref_text = decode_text(ref[0], chars, blank)[0]
            agree += text == ref_text
            ref_ok += label is not None and ref_text == label
        if label is not None:
            labelled += 1
            tvm_ok += text == label
            if max_accuracy_drop is not None:
                orig_text = decode_text(_torch_logits(art.original, x)[0], chars, blank)[0]
                orig_ok += orig_text == label
    n = len(images.xs)
    result = {
        "status": "passed",
        "images": n,
        "data": images.source,
        "runtime": "tvm (model.so + params.npz, as deployed)",
        "encodings": sorted(set(compiled.encodings.values())),
        "tolerance": tol,
        "seconds": 0.0,
    }
    if reference is not None:
        result.update(max_abs_logit_diff=max_diff, mean_abs_logit_diff=sum_diff / max(n, 1),
                      plate_agreement=agree / max(n, 1),
                      reference="pytorch" + (" (weights decoded from params.npz)" if lossy
                                             else ""))
    else:
        result["reference"] = None
    if labelled:
        result["calib_accuracy"] = tvm_ok / labelled
        if reference is not None:
            result["calib_accuracy_reference"] = ref_ok / labelled
    if max_accuracy_drop is not None and labelled:
        drop = orig_ok / labelled - tvm_ok / labelled
        result["accuracy_drop"] = {"original": orig_ok / labelled, "compiled": tvm_ok / labelled,
                                   "drop": drop, "max": max_accuracy_drop,
                                   "ok": drop <= max_accuracy_drop}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if reference is not None and max_diff > tol:
        result["status"] = "failed"
        raise ArtifactError(
            f"verification failed: max |logit diff| vs PyTorch {max_diff:.3g} > tolerance "
            f"{tol:g} (image {worst} of {images.source}); plate agreement "
            f"{agree}/{n}. No artifact written")
    if "accuracy_drop" in result and not result["accuracy_drop"]["ok"]:
        a = result["accuracy_drop"]
        raise ArtifactError(
            f"accuracy drop {100 * a['drop']:.1f} points on {images.source} (original "
            f"{a['original']:.3f}, compiled {a['compiled']:.3f}) exceeds --max-accuracy-drop "
            f"{100 * max_accuracy_drop:g}. No artifact written")
    return result


def _decoded_reference(reference: Any, compiled: CompiledModule) -> Any:
    """``reference`` with BatchNorm folded and its weights replaced by what ``params.npz``
    decodes to, so a lossy storage encoding is not mistaken for a compiler error."""
    import torch

    from lprnet_edge.model.fold import fold_batchnorm
    from lprnet_edge.runtime.params_codec import load_params

    if not _is_torch_module(reference):
        return reference
    folded = fold_batchnorm(reference)
    decoded = {_norm_name(k): v for k, v in load_params(compiled.params_path).items()}
    with torch.no_grad():
        for name, t in folded.state_dict().items():
            v = decoded.get(_norm_name(name))
            if v is not None and tuple(v.shape) == tuple(t.shape):
                t.copy_(torch.from_numpy(v))
    return folded


def _torch_accuracy_drop(art: ModelArtifact, calib_dir: Path | None, limit: int | None,
                         max_drop: float) -> dict[str, Any]:
    """For a cross build: the accuracy drop of the optimized PyTorch model on calib/."""
    if art.reference is None:
        raise LprnetEdgeError("--max-accuracy-drop: this model has no PyTorch reference to "
                              "measure on the host; check it on the device instead")
    from lprnet_edge.runtime.decode import decode_text

    images = verification_images(calib_dir, art.charset, limit)
    pairs = [(x, y) for x, y in zip(images.xs, images.labels, strict=True) if y is not None]
    if not pairs:
        raise DataError("--max-accuracy-drop needs labelled calib/ images (--calib DIR)")
    cs = art.charset

    def acc(model: Any) -> float:
        return float(np.mean([decode_text(_torch_logits(model, x)[0], cs.chars, cs.blank)[0] == y
                              for x, y in pairs]))

    with torch_one_thread():
        orig, new = acc(art.original), acc(art.reference)
    res = {"original": orig, "compiled": new, "drop": orig - new, "max": max_drop,
           "ok": orig - new <= max_drop, "measured_on": "pytorch (cross build)"}
    if not res["ok"]:
        raise ArtifactError(f"accuracy drop {100 * (orig - new):.1f} points on calib/ exceeds "
                            f"--max-accuracy-drop {100 * max_drop:g}. No artifact written")
    return res


def eval_test_stage(art: ModelArtifact, compiled: CompiledModule, test_dir: Path | None
                    ) -> dict[str, Any]:
    """Accuracy of the staged artifact on ``test/`` (measuring only; nothing is tuned on it)."""
    if not compiled.target.is_native:
        raise LprnetEdgeError("--eval-test needs a build for this machine (--target host); "
                              "for a device run `lprnet-edge eval` there")
    from lprnet_edge.runtime.backends import TvmBackend
    from lprnet_edge.runtime.evaluate import evaluate
    from lprnet_edge.runtime.recognizer import Recognizer

    folder = Path(test_dir) if test_dir else data_subdir("test")
    if folder is None or not folder.is_dir():
        raise DataError("--eval-test: no test/ folder (set LPRNET_EDGE_DATA or --test-dir)")
    backend = TvmBackend(compiled.artifact(art.charset))
    res = evaluate(Recognizer(backend, art.charset, Preprocess()), folder)
    return {"data": str(folder), "split": "test", "images": res.count,
            "accuracy": res.accuracy, "char_accuracy": res.char_accuracy,
            "mean_edit_distance": res.mean_edit_distance, "batch": 1}


# ---------------------------------------------------------------- package


def _versions() -> dict[str, str | None]:
    v: dict[str, str | None] = {"lprnet_edge": __version__, "python": platform.python_version()}
    for mod, key in (("tvm", "tvm"), ("tvm_ffi", "tvm_ffi"), ("torch", "torch"),
                     ("numpy", "numpy")):
        m = sys.modules.get(mod)
        v[key] = getattr(m, "__version__", None) if m else None
    return v


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))


DEVICE_CHECK_IMAGES = 8


def device_check_stage(art: ModelArtifact, compiled: CompiledModule, config: CompileConfig,
                       calib_dir: Path | None = None, n: int = DEVICE_CHECK_IMAGES
                       ) -> dict[str, Any]:
    """Store ``n`` calib/ inputs with the host PyTorch logits in the artifact (``verify.npz``):
    ``deploy`` runs them on the board and refuses to switch past the tolerance, so a cross
    build is compared with PyTorch too, where it runs."""
    from lprnet_edge.runtime.selfcheck import write_verify_set

    reference = art.reference
    if reference is None:
        return {"status": "absent", "reason": "no PyTorch reference for this model"}
    if any(e not in LOSSLESS for e in compiled.encodings.values()):
        reference = _decoded_reference(reference, compiled)
    tol = art.verify_tolerance if art.verify_tolerance is not None else config.verify_tolerance
    images = verification_images(calib_dir, art.charset, n)
    with torch_one_thread():
        logits = [_torch_logits(reference, x) for x in images.xs]
    name = write_verify_set(compiled.root, images.xs, logits, tol)
    compiled.extra_files.append(name)
    return {"status": "stored", "file": name, "inputs": len(images.xs), "tolerance": tol,
            "data": images.source}


def make_manifest(name: str, art: ModelArtifact, compiled: CompiledModule,
                  config: CompileConfig, verification: dict[str, Any],
                  accuracy: dict[str, Any] | None = None,
                  tune_summary: dict[str, Any] | None = None) -> Manifest:
    """The typed manifest of the staged artifact (files checksummed as they are now)."""
    root = compiled.root
    sizes = {n: (root / n).stat().st_size for n in compiled.files}
    stages = {"finetune": art.stages.get("finetune"), "prune": art.stages.get("prune"),
              "quantize": art.stages.get("quantize"), "tune": art.stages.get("tune"),
              "compile": config.to_dict()}
    reports = dict(art.reports)
    if tune_summary is not None:
        reports["tune"] = tune_summary
    reports["compile"] = compiled.info
    records = _jsonable({
        "name": name,
        "output": {"shape": [1, len(art.charset), 18], "dtype": "float32", "layout": "NCT"},
        "source": {"weights": art.weights.name, "weights_sha256": art.weights_sha256},
        "stages": stages,
        "reports": reports,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "built_on": {"machine": machine_arch(), "platform": platform.platform()},
        "sizes": {**sizes, "total": sum(sizes.values())},
        "param_encodings": compiled.encodings,
        "verification": verification,
        "accuracy": accuracy,
    })
    num_threads = config.num_threads or compiled.target.num_threads
    return compiled.artifact(art.charset, num_threads, records).manifest


def package_stage(stage_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` last: a directory without one is not an artifact.

    (``manifest.staging_dir`` gives the finished directory its umask-based mode.)
    """
    path = Path(stage_dir) / MANIFEST
    write_json_atomic(path, manifest.to_dict())
    return path


# ---------------------------------------------------------------- the whole build


def searching(opts: BuildOptions) -> bool:
    """``--max-accuracy-drop`` without ``--prune``/``--quantize``: choose them (select.py)."""
    return opts.max_accuracy_drop is not None and not (opts.prune or opts.quantize)


def guarded(opts: BuildOptions) -> bool:
    """``--prune``/``--quantize`` given: the model changes, so the accuracy guard runs (the
    search guards its own candidates)."""
    return not searching(opts) and bool(opts.prune or opts.quantize)


def plan(opts: BuildOptions, prune: Any = None, quantize: Any = None) -> list[str]:
    names = ["load"] + (["finetune"] if opts.finetune else [])
    if searching(opts):
        names.append("select")
    if opts.prune or prune:
        names.append("prune")
    if opts.quantize or quantize:
        names.append("quantize")
    if guarded(opts):
        names.append("guard")
    if searching(opts):
        names.append("test")
    names.append("import")
    if opts.tune:
        names.append("tune")
    names += ["compile", "verify"]
    if opts.eval_test:
        names.append("eval")
    names.append("package")
    return names


def build_artifact(opts: BuildOptions, log: Log = _stderr) -> BuildResult:
    """Every stage for ``opts``; the artifact appears at ``opts.out`` only if all succeed
    (and no SIGINT/SIGTERM came, even one a library swallowed: :mod:`.interrupt`)."""
    guard = InterruptGuard()
    with guard.installed():
        return _build_artifact(opts, log, guard)


def _build_artifact(opts: BuildOptions, log: Log, guard: InterruptGuard) -> BuildResult:
    from lprnet_edge.runtime.artifact import bundle as make_bundle

    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise ArtifactError(f"{out} exists (use --force to replace it)")
    if opts.eval_test and not opts.target.is_native:
        raise LprnetEdgeError(f"--eval-test needs a build for this machine, not "
                              f"{opts.target.name} ({opts.target.arch})")
    # Fail fast on a missing toolchain or a target TVM rejects, before minutes of work.
    compiler = find_compiler(opts.target, opts.cc)
    opts.target.tvm_target()
    if opts.calib_dir:
        from lprnet_edge.model.calib import check_not_test

        check_not_test(opts.calib_dir)  # calib/ shapes the model and decides pass/fail
    stages = Stages(plan(opts), log, guard)

    with stages.stage("load") as note:
        art = load_stage(opts.weights, opts.charset)
        note["result"] = f"{art.weights.name} (sha256 {art.weights_sha256[:12]}...)"
    if opts.finetune:
        with stages.stage("finetune", f"on {opts.finetune.data}") as note:
            from lprnet_edge.pipeline.finetune import finetune_stage

            note["result"] = finetune_stage(art, opts.finetune, log)
    prune_cfg, quant_cfg, chosen_model = opts.prune, opts.quantize, None
    if searching(opts):
        with stages.stage("select", f"within {opts.max_accuracy_drop:g} pt on a calib/ "
                                    "validation split") as note:
            prune_cfg, quant_cfg, chosen_model = select_stage(art, opts, log)
            note["result"] = art.reports["selection"]["selected"]
        stages.names = plan(opts, prune_cfg, quant_cfg)
    if chosen_model is not None:
        with stages.stage("prune", f"{prune_cfg.kind}, as selected") as note:
            art = adopt_pruned(art, chosen_model)
            note["result"] = "the model distilled and measured during selection"
    elif prune_cfg:
        with stages.stage("prune", prune_cfg.kind) as note:
            art = prune_stage(art, prune_cfg, opts.calib_dir)
    if quant_cfg:
        with stages.stage("quantize", quant_cfg.mode) as note:
            art = quantize_stage(art, quant_cfg, opts.calib_dir)
    if guarded(opts):
        with stages.stage("guard", "accuracy on the calib/ validation split") as note:
            g = guard_stage(art, opts.calib_dir, opts.max_accuracy_drop)
            note["result"] = (f"{g['compressed']:.3f} vs original {g['original']:.3f} on "
                              f"{g['split']['images']} plates ({-g['drop_points']:+.1f} pt, "
                              f"budget {g['budget_points']:g} pt)")
    if searching(opts):
        with stages.stage("test", "test/ accuracy of the selected model (PyTorch)") as note:
            from lprnet_edge.compress.select import test_comparison

            t = test_comparison(art.original, art.reference, opts.test_dir)
            art.reports["selection"]["test"] = t
            note["result"] = (f"{t['selected']:.3f} vs original {t['original']:.3f}"
                              if "selected" in t else f"skipped: {t['skipped']}")
    with stages.stage("import", f"frontend {opts.compile.frontend}, "
                      f"{opts.compile.layout}") as note:
        relax_model = import_stage(art, opts.compile.frontend, opts.compile.layout,
                                   opts.target)
        folded = art.reports.get("channel_fold")
        note["result"] = f"{len(relax_model.params)} weight tensors" + (
            f"; {folded['summary']}" if folded else "")
        if "int8" in art.reports:
            note["result"] += "; " + art.reports["int8"]["note"]
    database, tune_summary = None, None
    if opts.tune:
        with stages.stage("tune", f"{opts.tune.trials} trials") as note:
            database, tune_summary = tune_stage(relax_model, opts.target, opts.tune, log,
                                                compiler)
            art.stages["tune"] = opts.tune.to_dict()
    name = opts.name or out.name
    with staging_dir(out, overwrite=opts.force) as tmp:
        with stages.stage("compile", f"{opts.target.name} ({compiler.path})") as note:
            compiled = compile_stage(relax_model, opts.target, tmp, compiler, opts.compile, art,
                                     database=database)
            note["result"] = (f"{MODEL_FILE} {_mb(compiled.lib_path.stat().st_size)}, "
                              f"{PARAMS_FILE} {_mb(compiled.params_path.stat().st_size)}")
        with stages.stage("verify") as note:
            if opts.verify_images == 0 and compiled.target.is_native:
                verification: dict[str, Any] = {"status": "skipped",
                                                "reason": "--verify-images 0"}
            else:
                verification = verify_stage(art, compiled, opts.compile, opts.calib_dir,
                                            opts.verify_images, _fraction(opts.max_accuracy_drop),
                                            log)
            verification["device_check"] = device_check_stage(art, compiled, opts.compile,
                                                              opts.calib_dir)
            note["result"] = verification_summary(verification)
        accuracy = None
        if opts.eval_test:
            with stages.stage("eval", "test/ accuracy at batch 1") as note:
                accuracy = eval_test_stage(art, compiled, opts.test_dir)
                note["result"] = (f"accuracy {accuracy['accuracy']:.3f} on "
                                  f"{accuracy['images']} images")
        with stages.stage("package", str(out)):
            manifest = make_manifest(name, art, compiled, opts.compile, verification, accuracy,
                                     tune_summary)
            package_stage(tmp, manifest)
        guard.check()  # the last point before the new directory replaces the old one
    bundle_path = None
    if opts.bundle:
        bundle_path = make_bundle(out)
    return BuildResult(out, manifest.to_dict(), bundle_path, stages.timings)


def _fraction(points: float | None) -> float | None:
    return None if points is None else points / 100


def select_stage(art: ModelArtifact, opts: BuildOptions, log: Log
                 ) -> tuple[PruneConfig | None, QuantizeConfig | None, Any]:
    """Choose pruning x quantization within ``opts.max_accuracy_drop`` points on a validation
    split of calib/ (:func:`lprnet_edge.compress.select.search`); the search goes in the
    manifest. The third value is the winner's :class:`PrunedModel` when it must be reused as
    measured (channel-pruned: distilled during the search), else None."""
    from lprnet_edge.compress import select as mod
    from lprnet_edge.compress.api import PrunedModel
    from lprnet_edge.compress.prune import folded_encodings

    calib = _calibration_set(opts.calib_dir, art)
    latency = None
    if opts.optimize == "latency":
        def latency(cands: list[Any]) -> dict[str, Any]:
            return candidate_latencies(cands, opts, log)
    best, model, report = mod.search(art.original, calib, opts.max_accuracy_drop,
                                     channels=opts.search_channels, log=log,
                                     optimize=opts.optimize, latency=latency)
    art.reports["selection"] = report
    pruned = None
    if model is not None and best.prune is not None:
        pruned = PrunedModel(model, best.prune, dict(best.extra.get("prune_report") or {}),
                             folded_encodings(model))
    return best.prune, best.quant, pruned


# Timing of the search's candidates: enough runs for a stable median, few enough for a board.
CANDIDATE_RUNS = 30


def graph_key(cand: Any) -> tuple[Any, ...]:
    """Candidates with equal keys compile to the same graph: unstructured sparsity, fp16 and
    int8 weights are storage encodings decoded to dense float32 at load; only the
    architecture (a channel-pruned model) and int8 activations change what runs."""
    arch = id(cand.pruned_model) if cand.pruned_model is not None else None
    q = cand.quant
    int8 = json.dumps(q.to_dict(), sort_keys=True) if q is not None and q.mode == "int8" else None
    return (arch, int8)


def candidate_latencies(cands: list[Any], opts: BuildOptions, log: Log = _stderr,
                        runs: int = CANDIDATE_RUNS) -> dict[str, Any]:
    """Latency of each candidate on the build's target: one artifact per distinct graph
    (:func:`graph_key`) built by this module's stages (untuned, or with ``opts.tune``'s
    budget into a database of its own, the same for every candidate), timed by
    :func:`lprnet_edge.compiler.session.time_artifact` (median of ``runs``), here or on
    ``opts.latency_rpc``."""
    import tempfile

    from lprnet_edge.compiler.session import in_child_process
    from lprnet_edge.compress.select import LatencyFigure

    if not opts.target.is_native and not opts.latency_rpc:
        raise LprnetEdgeError(f"--optimize latency for {opts.target.name} measures on the "
                              "board: give --rpc HOST:PORT (a TVM RPC server on it) or "
                              "--host USER@HOST")
    where = opts.latency_rpc or "local"
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for c in cands:
        groups.setdefault(graph_key(c), []).append(c)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lprnet-candidates-") as tmp:
        tune = (replace(opts.tune, db_dir=str(Path(tmp) / "tuning"))
                if opts.tune is not None else None)
        for members in groups.values():
            rep = members[0]
            log(f"  latency of {rep.name} on {where}"
                + (f" (+ {len(members) - 1} same-graph)" if len(members) > 1 else ""))
            path = candidate_artifact(rep, opts, Path(tmp) / rep.name, tune, log)
            timing = (_time_candidate(str(path), None, runs) if opts.latency_rpc is None
                      else in_child_process(
                          _time_candidate, str(path), opts.latency_rpc, runs,
                          timeout=CANDIDATE_TIMEOUT_S, on_timeout=_candidate_timeout))
            fig = LatencyFigure(timing["median_ms"], rep.name, where, timing)
            log(f"  {rep.name}: {fig.latency_ms:.2f} ms")
            out.update({c.name: fig for c in members})
    return out


def _time_candidate(path: str, rpc: str | None, runs: int) -> dict[str, Any]:
    """``time_artifact`` on a session of its own (one candidate's crash on the device cannot
    take the next candidates' session down)."""
    from lprnet_edge.compiler.session import open_session, time_artifact

    res = time_artifact(path, open_session(rpc=rpc), repeat=runs, warmup=min(5, runs))
    return res.timing.to_dict()


CANDIDATE_TIMEOUT_S = 1800.0


def _candidate_timeout() -> LprnetEdgeError:
    return LprnetEdgeError(f"timing a candidate on the device took over "
                           f"{CANDIDATE_TIMEOUT_S:g}s")


def candidate_artifact(cand: Any, opts: BuildOptions, out_dir: Path,
                       tune: TuneConfig | None, log: Log) -> Path:
    """``cand`` built for ``opts.target`` into ``out_dir`` by the stages (no verification:
    only timed)."""
    from lprnet_edge.compress.api import PrunedModel
    from lprnet_edge.compress.prune import folded_encodings

    quiet: Log = lambda _m: None  # noqa: E731
    art = load_stage(opts.weights, opts.charset)
    if cand.pruned_model is not None:
        art = adopt_pruned(art, PrunedModel(cand.pruned_model, cand.prune, {},
                                            folded_encodings(cand.pruned_model)))
    elif cand.prune is not None:
        art = prune_stage(art, cand.prune, opts.calib_dir)
    if cand.quant is not None:
        art = quantize_stage(art, cand.quant, opts.calib_dir)
    relax_model = import_stage(art, opts.compile.frontend, opts.compile.layout, opts.target)
    compiler = find_compiler(opts.target, opts.cc)
    database, summary = None, None
    if tune is not None:
        database, summary = tune_stage(relax_model, opts.target, tune, quiet, compiler)
    out_dir.mkdir(parents=True)
    compiled = compile_stage(relax_model, opts.target, out_dir, compiler, opts.compile, art,
                             database=database, log=quiet)
    manifest = make_manifest(cand.name, art, compiled, opts.compile,
                             {"status": "skipped", "reason": "timed only"}, None, summary)
    package_stage(out_dir, manifest)
    return out_dir


def verification_summary(v: dict[str, Any]) -> str:
    check = v.get("device_check") or {}
    on_device = (f"; {check['inputs']} inputs ({check['data']}) with PyTorch logits stored "
                 "for the check on the device at deploy" if check.get("status") == "stored"
                 else "")
    if v.get("status") == "skipped":
        return f"skipped here ({v.get('reason')}){on_device}"
    parts = [f"{v['status']} on {v['images']} images"]
    if v.get("max_abs_logit_diff") is not None:
        parts.append(f"max |logit diff| {v['max_abs_logit_diff']:.2e} (tol {v['tolerance']:g})")
        parts.append(f"plate agreement {v['plate_agreement']:.4f}")
    if v.get("calib_accuracy") is not None:
        parts.append(f"calib accuracy {v['calib_accuracy']:.3f}")
    return ", ".join(parts) + on_device


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
