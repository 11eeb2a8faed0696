"""Build an artifact: run the planned stages (:mod:`.stages`) in order.

The output directory is staged beside its final place and only renamed there once every stage
(verification included) succeeded: a failed or interrupted build leaves no artifact and keeps
a previous one intact.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lprnet_edge.compiler.config import CompileConfig
from lprnet_edge.compiler.target import TargetSpec
from lprnet_edge.compiler.toolchain import Compiler, find_compiler
from lprnet_edge.compiler.tuning import TuneConfig
from lprnet_edge.compress.accuracy import AccuracyCheck
from lprnet_edge.compress.configs import PruneConfig, QuantizeConfig
from lprnet_edge.compress.select import Selection
from lprnet_edge.model.calib import check_not_test
from lprnet_edge.model.finetune import FinetuneConfig
from lprnet_edge.model.weights import resolve_weights
from lprnet_edge.pipeline.interrupt import InterruptGuard, pause_for_tests
from lprnet_edge.pipeline.stages import BuildState, Stage, plan
from lprnet_edge.pipeline.values import Log, jsonable
from lprnet_edge.pipeline.verify import TestAccuracy, Verification
from lprnet_edge.runtime.artifact import (
    MANIFEST,
    Artifact,
    Manifest,
    bundle,
)
from lprnet_edge.runtime.errors import ArtifactError, LprnetEdgeError
from lprnet_edge.runtime.files import sha256_file, staging_dir


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    max_accuracy_drop: float | None = None  # points on the calib/ validation split
    search_channels: tuple[float, ...] = ()  # channel-pruning ratios the search also tries
    optimize: str = "size"  # the search's winner: "size" (smallest) or "latency" (fastest)
    latency_rpc: str | None = None  # "HOST:PORT": time the search's candidates there
    name: str | None = None  # artifact name (default: the output directory's name)
    finetune: FinetuneConfig | None = None  # fine-tune on the user's plates first

    @property
    def searching(self) -> bool:
        """``--max-accuracy-drop`` without ``--prune``/``--quantize``: the search chooses."""
        return self.max_accuracy_drop is not None and not (self.prune or self.quantize)

    @property
    def changes_model(self) -> bool:
        """``--prune``/``--quantize`` given: the accuracy check runs before compiling (the
        search checks its own candidates)."""
        return not self.searching and bool(self.prune or self.quantize)


@dataclass(frozen=True)
class BuildResult:
    """The artifact, its manifest as written, and the typed results the manifest records."""

    path: Path
    manifest: Manifest
    bundle: Path | None
    timings: tuple[tuple[str, float], ...]
    verification: Verification
    selection: Selection | None = None
    accuracy_check: AccuracyCheck | None = None
    test_accuracy: TestAccuracy | None = None

    @property
    def total_s(self) -> float:
        return sum(t for _, t in self.timings)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "bundle": str(self.bundle) if self.bundle else None,
                "timings": dict(self.timings), "manifest": self.manifest.to_dict()}


def build_artifact(opts: BuildOptions, log: Log = _stderr) -> BuildResult:
    """Every stage of ``plan(opts)``; the artifact appears at ``opts.out`` only if all succeed
    (and no SIGINT/SIGTERM came, even one a library swallowed: :mod:`.interrupt`)."""
    interrupt = InterruptGuard()
    with interrupt.installed():
        state = BuildState(opts, log, preflight(opts), opts.prune, opts.quantize)
        stages = plan(opts)
        timings = []
        with ExitStack() as staging:
            for i, stage in enumerate(stages, 1):
                if stage.staged and state.root is None:
                    state.root = staging.enter_context(staging_dir(opts.out,
                                                                   overwrite=opts.force))
                dt = _run(stage, state, f"[{i}/{len(stages)}] {stage.name:<8}", interrupt)
                timings.append((stage.name, dt))
            interrupt.check()  # the last point before the new directory replaces the old one
        out = Path(opts.out)
        return BuildResult(out, state.manifest, bundle(out) if opts.bundle else None,
                           tuple(timings), state.verification, state.selection,
                           state.accuracy_check, state.test_accuracy)


def _run(stage: Stage, state: BuildState, head: str, interrupt: InterruptGuard) -> float:
    """``stage`` between ``head ... detail ...`` and ``head done in 1.2s: result`` lines."""
    interrupt.check()
    detail = stage.detail(state)
    state.log(f"{head} {detail}".rstrip() + " ...")
    pause_for_tests(stage.name)
    t0 = time.perf_counter()
    result = stage.run(state)
    interrupt.check()  # a signal a library swallowed still ends the build here
    dt = time.perf_counter() - t0
    state.log(f"{head} done in {dt:.1f}s" + (f": {result}" if result else ""))
    return dt


def rebundle(opts: BuildOptions) -> Path | None:
    """``--bundle`` without ``--force`` of an artifact already built at ``opts.out`` from the
    same weights, target and settings: its bundle, packed as it is. None when it must be
    rebuilt (a search's choice cannot be known without running it)."""
    out = Path(opts.out)
    if not opts.bundle or opts.force or opts.searching or not (out / MANIFEST).is_file():
        return None
    try:
        m = Artifact.open(out, check_arch=False).manifest
    except ArtifactError:
        return None
    want = {"prune": opts.prune.to_dict() if opts.prune else None,
            "quantize": opts.quantize.to_dict() if opts.quantize else None,
            "tune": opts.tune.to_dict() if opts.tune else None,
            "compile": opts.compile.to_dict()}
    same = (m.target.name == opts.target.name
            and m.target.tvm == jsonable(dict(opts.target.tvm))
            and m.records.get("stages") == jsonable(want)
            and m.records.get("source", {}).get("weights_sha256")
            == sha256_file(resolve_weights(opts.weights)))
    return bundle(out) if same else None


def preflight(opts: BuildOptions) -> Compiler:
    """Refuse what would fail late, before minutes of work: an existing output, a missing
    toolchain, a target TVM rejects, the test split given as calibration data."""
    out = Path(opts.out)
    if out.exists() and not opts.force:
        if opts.bundle:
            raise ArtifactError(f"{out} exists and is not a build of these settings (use "
                                f"--force to rebuild it; --bundle then packs the new build "
                                f"into {out.name}.tar.gz)")
        raise ArtifactError(f"{out} exists (use --force to replace it)")
    if opts.eval_test and not opts.target.is_native:
        raise LprnetEdgeError(f"--eval-test needs a build for this machine, not "
                              f"{opts.target.name} ({opts.target.arch})")
    compiler = find_compiler(opts.target, opts.cc)
    opts.target.tvm_target()
    if opts.calib_dir:
        check_not_test(opts.calib_dir)  # calib/ shapes the model and decides pass/fail
    return compiler
