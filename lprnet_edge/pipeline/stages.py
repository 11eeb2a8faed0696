"""The stages of a build, one small object each, and :func:`plan`: the list a build runs.

A stage has a ``name`` (the ``[i/n] name`` progress line, ``LPRNET_EDGE_PAUSE_BEFORE_STAGE``),
``detail(state)`` (what the line says it is about to do) and ``run(state)``, which reads the
values earlier stages left in the :class:`BuildState`, sets its own, and returns a one-line
result for the progress line (or None). ``staged = True`` marks a stage that writes into the
staging directory; the orchestrator creates it before the first such stage.

The plan is decided once, from the options, before anything runs; a stage whose work depends
on an earlier stage (prune and quantize after the search) reads that from the state and says
when it has nothing to do. Adding a stage: a subclass of :class:`Stage`, and a line in
:func:`plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lprnet_edge.compiler.toolchain import Compiler
from lprnet_edge.compiler.tuning import TuningSummary
from lprnet_edge.compress.accuracy import VALIDATION, AccuracyCheck, Budget, check_model
from lprnet_edge.compress.api import PrunedModel
from lprnet_edge.compress.configs import PruneConfig, QuantizeConfig
from lprnet_edge.compress.select import Selection, test_comparison
from lprnet_edge.pipeline import steps, verify
from lprnet_edge.pipeline.candidates import run_search
from lprnet_edge.pipeline.finetune import FINETUNE_SPLIT, finetune_stage
from lprnet_edge.pipeline.package import make_manifest, write_manifest
from lprnet_edge.pipeline.values import (
    MODEL_FILE,
    PARAMS_FILE,
    CompiledModule,
    Log,
    RelaxModel,
    TorchModel,
)
from lprnet_edge.pipeline.verify import TestAccuracy, Verification
from lprnet_edge.runtime.artifact import Manifest
from lprnet_edge.runtime.errors import ArtifactError

if TYPE_CHECKING:  # the options are defined by the orchestrator, which imports this module
    from lprnet_edge.pipeline.build import BuildOptions


@dataclass
class BuildState:
    """What the stages of one build hand each other. ``prune``/``quantize`` start as the
    options' and are replaced by the search's choice; ``root`` is the staging directory."""

    opts: BuildOptions
    log: Log
    compiler: Compiler
    prune: PruneConfig | None = None
    quantize: QuantizeConfig | None = None
    torch: TorchModel | None = None
    selected_model: PrunedModel | None = None
    selection: Selection | None = None
    accuracy_check: AccuracyCheck | None = None
    relax: RelaxModel | None = None
    database: Any = None
    tune_summary: TuningSummary | None = None
    root: Path | None = None
    compiled: CompiledModule | None = None
    verification: Verification | None = None
    test_accuracy: TestAccuracy | None = None
    manifest: Manifest | None = None


class Stage:
    """One step of the build; subclasses set ``name`` and implement :meth:`run`."""

    name: ClassVar[str]
    staged: ClassVar[bool] = False

    def detail(self, state: BuildState) -> str:
        return ""

    def run(self, state: BuildState) -> str | None:
        raise NotImplementedError


class Load(Stage):
    name = "load"

    def run(self, state: BuildState) -> str | None:
        tm = state.torch = steps.load_torch(state.opts.weights, state.opts.charset)
        return f"{tm.weights.name} (sha256 {tm.weights_sha256[:12]}...)"


class Finetune(Stage):
    """``--finetune DIR``: the pretrained model adapted to the user's plates before any other
    stage looks at it; later stages measure on its held-out split."""

    name = "finetune"

    def detail(self, state: BuildState) -> str:
        return f"on {state.opts.finetune.data}"

    def run(self, state: BuildState) -> str | None:
        return finetune_stage(state.torch, state.opts.finetune, state.log)


class Select(Stage):
    """``--max-accuracy-drop`` alone: choose pruning x quantization within it."""

    name = "select"

    def detail(self, state: BuildState) -> str:
        return f"within {state.opts.max_accuracy_drop:g} pt on a calib/ validation split"

    def run(self, state: BuildState) -> str | None:
        state.prune, state.quantize, state.selected_model, state.selection = run_search(
            state.torch, state.opts, state.log)
        state.torch.reports["selection"] = state.selection.to_dict()
        return state.selection.selected


class Prune(Stage):
    name = "prune"

    def detail(self, state: BuildState) -> str:
        if state.prune is None:
            return "none selected"
        return state.prune.kind + (", as selected" if state.selected_model is not None else "")

    def run(self, state: BuildState) -> str | None:
        if state.selected_model is not None:
            state.torch = steps.adopt_pruned(state.torch, state.selected_model)
            return "the model distilled and measured during selection"
        if state.prune is not None:
            state.torch = steps.prune_model(state.torch, state.prune, state.opts.calib_dir)
        return None


class Quantize(Stage):
    name = "quantize"

    def detail(self, state: BuildState) -> str:
        return state.quantize.mode if state.quantize is not None else "none selected"

    def run(self, state: BuildState) -> str | None:
        if state.quantize is not None:
            state.torch = steps.quantize_model(state.torch, state.quantize, state.opts.calib_dir)
        return None


class Accuracy(Stage):
    """The accuracy check of a build that changes the model, before anything compiles: a bad
    setting costs seconds, not a build."""

    name = "accuracy"

    def detail(self, state: BuildState) -> str:
        return f"on the {VALIDATION.name}"

    def run(self, state: BuildState) -> str | None:
        tm = state.torch
        check = check_model(tm.original, tm.reference,
                            steps.calibration_set(state.opts.calib_dir, tm),
                            Budget.of(state.opts.max_accuracy_drop))
        state.accuracy_check = check
        tm.reports["accuracy_check"] = check.to_dict()
        if tm.calib is not None:  # measured on the fine-tuning's held-out plates instead
            tm.reports["accuracy_check"]["split"] = {"source": FINETUNE_SPLIT,
                                                     "images": check.images}
        enforce(check)
        return check.summary()


def enforce(check: AccuracyCheck) -> None:
    """Refuse a model past its budget, saying which setting accepts the loss."""
    if check.ok:
        return
    head = (f"accuracy drop {check.drop_points:.1f} points on the {VALIDATION.name} "
            f"({check.images} plates: original {check.original:.3f}, compressed "
            f"{check.changed:.3f})")
    if check.budget.source != "default":
        raise ArtifactError(f"{head} exceeds --max-accuracy-drop {check.budget.points:g}. "
                            "No artifact written")
    raise ArtifactError(f"{head} exceeds the default budget of {check.budget.points:g} "
                        "point: use a milder --prune/--quantize setting, or accept the loss "
                        "explicitly with --max-accuracy-drop "
                        f"{math.ceil(check.drop_points * 10) / 10:g}. No artifact written")


class TestSplit(Stage):
    """The selected model's accuracy on test/, beside the original's: reported, never used
    for the choice."""

    __test__ = False  # a "Test*" name, not a test class (pytest would try to collect it)
    name = "test"

    def detail(self, state: BuildState) -> str:
        return "test/ accuracy of the selected model (PyTorch)"

    def run(self, state: BuildState) -> str | None:
        tm = state.torch
        t = test_comparison(tm.original, tm.reference, state.opts.test_dir)
        state.selection = replace(state.selection, test=t)
        tm.reports["selection"] = state.selection.to_dict()
        if t.skipped is not None:
            return f"skipped: {t.skipped}"
        return f"{t.selected:.3f} vs original {t.original:.3f}"


class Import(Stage):
    name = "import"

    def detail(self, state: BuildState) -> str:
        return f"frontend {state.opts.compile.frontend}, {state.opts.compile.layout}"

    def run(self, state: BuildState) -> str | None:
        c, tm = state.opts.compile, state.torch
        state.relax = steps.import_model(tm, c.frontend, c.layout, state.opts.target)
        folded = tm.reports.get("channel_fold")
        result = f"{len(state.relax.params)} weight tensors" + (
            f"; {folded['summary']}" if folded else "")
        if "int8" in tm.reports:
            result += "; " + tm.reports["int8"]["note"]
        return result


class Tune(Stage):
    name = "tune"

    def detail(self, state: BuildState) -> str:
        return f"{state.opts.tune.trials} trials"

    def run(self, state: BuildState) -> str | None:
        opts = state.opts
        state.database, state.tune_summary = steps.tune_model(
            state.relax, opts.target, opts.tune, state.log, state.compiler)
        state.torch.stages["tune"] = opts.tune.to_dict()
        return None


class Compile(Stage):
    name = "compile"
    staged = True

    def detail(self, state: BuildState) -> str:
        return f"{state.opts.target.name} ({state.compiler.path})"

    def run(self, state: BuildState) -> str | None:
        opts = state.opts
        c = state.compiled = steps.compile_model(state.relax, opts.target, state.root,
                                                 state.compiler, opts.compile, state.torch,
                                                 database=state.database,
                                                 summary=state.tune_summary)
        return (f"{MODEL_FILE} {_size(c.lib_path.stat().st_size)}, "
                f"{PARAMS_FILE} {_size(c.params_path.stat().st_size)}")


class Verify(Stage):
    name = "verify"
    staged = True

    def run(self, state: BuildState) -> str | None:
        opts, tm, compiled = state.opts, state.torch, state.compiled
        if opts.verify_images == 0 and compiled.target.is_native:
            v = verify.skipped("--verify-images 0")
        else:
            budget = (Budget.of(opts.max_accuracy_drop,
                                measure="lost" if opts.searching else "drop")
                      if opts.max_accuracy_drop is not None else None)
            v = verify.verify_compiled(tm, compiled, opts.compile, opts.calib_dir,
                                       opts.verify_images, budget, state.log)
        check = verify.device_check(tm, compiled, opts.compile, opts.calib_dir)
        state.verification = replace(v, device_check=check)
        return state.verification.summary()


class EvalTest(Stage):
    name = "eval"
    staged = True

    def detail(self, state: BuildState) -> str:
        return "test/ accuracy at batch 1"

    def run(self, state: BuildState) -> str | None:
        a = state.test_accuracy = verify.eval_test(state.torch, state.compiled,
                                                   state.opts.test_dir)
        return f"accuracy {a.accuracy:.3f} on {a.images} images"


class Package(Stage):
    name = "package"
    staged = True

    def detail(self, state: BuildState) -> str:
        return str(state.opts.out)

    def run(self, state: BuildState) -> str | None:
        opts = state.opts
        state.manifest = make_manifest(opts.name or Path(opts.out).name, state.torch,
                                       state.compiled, opts.compile, state.verification,
                                       state.test_accuracy, state.tune_summary)
        write_manifest(state.root, state.manifest)
        return None


def plan(opts: BuildOptions) -> list[Stage]:
    """The stages ``opts`` asks for, in order."""
    stages: list[Stage] = [Load()]
    stages += [Finetune()] if opts.finetune else []
    if opts.searching:
        stages += [Select(), Prune(), Quantize(), TestSplit()]
    else:
        stages += [Prune()] if opts.prune else []
        stages += [Quantize()] if opts.quantize else []
        stages += [Accuracy()] if opts.prune or opts.quantize else []
    stages.append(Import())
    stages += [Tune()] if opts.tune else []
    stages += [Compile(), Verify()]
    stages += [EvalTest()] if opts.eval_test else []
    stages.append(Package())
    return stages


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
