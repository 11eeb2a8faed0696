"""``lprnet-edge build`` and ``lprnet-edge targets``: compile an artifact for a device.

Added to the root group by :mod:`lprnet_edge.cli.main` (``COMMANDS``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from lprnet_edge.cli.common import (
    check_rpc,
    echo_json,
    grouped,
    json_option,
    out_option,
    rpc_options,
    ssh_options_optional,
    table,
    threads_option,
)
from lprnet_edge.cli.device import deploy_with_progress, device_from
from lprnet_edge.compiler.config import CompileConfig
from lprnet_edge.compiler.target import TargetSpec, load_target
from lprnet_edge.compiler.tuning import TuneConfig
from lprnet_edge.compress.configs import FINETUNED_QUANT_DISTILL, PruneConfig, QuantizeConfig
from lprnet_edge.device.tunnel import device_rpc

if TYPE_CHECKING:  # the pipeline imports torch: loaded by the build command only (see there)
    from lprnet_edge.compress.select import Selection
    from lprnet_edge.model.finetune import FinetuneConfig
    from lprnet_edge.pipeline.build import BuildOptions, BuildResult

DEFAULT_TARGET = "rpi4"


def _target(name: str | None, target_file: str | None) -> TargetSpec:
    return load_target(target_file or name or DEFAULT_TARGET)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ---------------------------------------------------------------- option groups


@dataclass(frozen=True)
class TargetArgs:
    """``--target --target-file --cc`` as given."""

    target_name: str
    target_file: str | None
    cc: str | None

    def spec(self, ctx: click.Context) -> TargetSpec:
        if self.target_file and (ctx.get_parameter_source("target_name")
                                 != ParameterSource.DEFAULT):
            raise click.UsageError("give either --target or --target-file, not both")
        return _target(self.target_name, self.target_file)


@dataclass(frozen=True)
class OutputArgs:
    """``--out --force --bundle --json`` as given."""

    out: str | None
    force: bool
    bundle: bool
    as_json: bool

    def path(self, spec: TargetSpec) -> Path:
        return Path(self.out) if self.out else Path("build") / f"lprnet-{spec.name}"


@dataclass(frozen=True)
class CompileArgs:
    """``--frontend --layout --threads --opt-level`` as given."""

    frontend: str
    layout: str
    threads: int | None
    opt_level: int

    def config(self, tolerance: float | None) -> CompileConfig:
        kw: dict[str, Any] = {"frontend": self.frontend, "layout": self.layout,
                              "opt_level": self.opt_level, "num_threads": self.threads}
        if tolerance is not None:
            kw["verify_tolerance"] = tolerance
        return CompileConfig(**kw)


@dataclass(frozen=True)
class CompressionArgs:
    """``--prune --sparsity --prune-ratio --quantize --calibrator --quant-distill
    --max-accuracy-drop --search-channels --optimize`` as given."""

    prune_kind: str | None
    sparsity: float | None
    prune_ratio: float | None
    quantize_mode: str | None
    calibrator: str | None
    quant_distill: int | None
    max_accuracy_drop: float | None
    search_channels: tuple[float, ...]
    optimize: str | None

    @property
    def searching(self) -> bool:
        """--max-accuracy-drop alone: the search chooses the compression."""
        return self.max_accuracy_drop is not None and not (self.prune_kind or self.quantize_mode)

    @property
    def latency_search(self) -> bool:
        return self.searching and self.optimize == "latency"

    def check(self) -> None:
        if self.sparsity is not None and self.prune_kind != "unstructured":
            raise click.UsageError("--sparsity needs --prune unstructured")
        if self.prune_ratio is not None and self.prune_kind != "channels":
            raise click.UsageError("--prune-ratio needs --prune channels")
        if self.calibrator and not self.quantize_mode:
            raise click.UsageError("--calibrator needs --quantize")
        if self.quant_distill is not None and self.quantize_mode != "int8":
            raise click.UsageError("--quant-distill needs --quantize int8")
        if self.search_channels and (self.max_accuracy_drop is None or self.prune_kind
                                     or self.quantize_mode):
            raise click.UsageError("--search-channels goes with --max-accuracy-drop alone "
                                   "(the search), not with --prune/--quantize")
        if self.optimize and not self.searching:
            raise click.UsageError("--optimize goes with --max-accuracy-drop alone (the "
                                   "search), not with --prune/--quantize")

    def prune_config(self) -> PruneConfig | None:
        if not self.prune_kind:
            return None
        kw: dict[str, Any] = {"kind": self.prune_kind}
        if self.sparsity is not None:
            kw["sparsity"] = self.sparsity
        if self.prune_ratio is not None:
            kw["ratio"] = self.prune_ratio
        return PruneConfig(**kw)

    def quantize_config(self, finetuning: bool = False) -> QuantizeConfig | None:
        """With ``--finetune``, int8 is distilled from the fine-tuned float model unless
        ``--quant-distill`` says otherwise: its guard measures on the user's few hundred
        held-out plates, where post-training rounding alone moves a few readings."""
        if not self.quantize_mode:
            return None
        extra: dict[str, Any] = {"calibrator": self.calibrator} if self.calibrator else {}
        if self.quantize_mode == "int8":
            epochs = self.quant_distill
            if epochs is None:
                epochs = FINETUNED_QUANT_DISTILL if finetuning else 0
            extra["distill_epochs"] = epochs
        return QuantizeConfig(mode=self.quantize_mode, **extra)


@dataclass(frozen=True)
class TuningArgs:
    """``--tune --trials --rpc --rpc-tracker --rpc-key --tuning-db`` as given."""

    tune: bool
    trials: int | None
    rpc: str | None
    rpc_tracker: str | None
    rpc_key: str | None
    tuning_db: str | None

    def check(self, latency_search: bool = False) -> None:
        """``latency_search``: ``--optimize latency`` times the candidates on ``--rpc``, so
        the address is used without ``--tune`` too."""
        only = {"--trials": self.trials, "--rpc": self.rpc, "--rpc-tracker": self.rpc_tracker,
                "--rpc-key": self.rpc_key, "--tuning-db": self.tuning_db}
        if latency_search:
            del only["--rpc"]
        if not self.tune and (given := [k for k, v in only.items() if v is not None]):
            raise click.UsageError(f"{', '.join(given)} "
                                   f"{'needs' if len(given) == 1 else 'need'} --tune")
        check_rpc(self.rpc, self.rpc_tracker, self.rpc_key)

    def config(self) -> TuneConfig | None:
        if not self.tune:
            return None
        kw: dict[str, Any] = {"rpc": self.rpc, "rpc_tracker": self.rpc_tracker,
                              "rpc_key": self.rpc_key, "db_dir": self.tuning_db}
        if self.trials is not None:
            kw["trials"] = self.trials
        return TuneConfig(**kw)

    @property
    def measures_on_device_via_ssh(self) -> bool:
        """With --host and no RPC address, tuning measures through an SSH tunnel."""
        return self.tune and not (self.rpc or self.rpc_tracker)


@dataclass(frozen=True)
class CheckArgs:
    """``--calib --verify-images --tolerance --eval-test --test-dir`` as given."""

    calib_dir: str | None
    verify_images: int | None
    tolerance: float | None
    eval_test: bool
    test_dir: str | None
    finetune_data: str | None

    def finetune_config(self) -> FinetuneConfig | None:
        """``--finetune DIR``: fine-tuning on the user's plates, test/ evaluated only."""
        if self.finetune_data is None:
            return None
        from lprnet_edge.model.finetune import FinetuneConfig  # torch: see TYPE_CHECKING

        return FinetuneConfig(data=Path(self.finetune_data),
                              test_dir=Path(self.test_dir) if self.test_dir else None)


compression_options = grouped(
    "compression", CompressionArgs,
    click.option("--prune", "prune_kind", type=click.Choice(["unstructured", "channels"]),
                 help="Prune before compiling."),
    click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True),
                 help="Unstructured pruning: fraction of conv weights set to zero.  "
                      "[default: 0.8]"),
    click.option("--prune-ratio", type=click.FloatRange(0, 1, max_open=True),
                 help="Channel pruning: fraction of the block 2/3 inner filters removed (and "
                      "dead channels; widths rounded to 8; distilled on calib/).  "
                      "[default: 0.5]"),
    click.option("--quantize", "quantize_mode",
                 type=click.Choice(["int8", "fp16", "int8-weights"]),
                 help="Post-training quantization calibrated on calib/."),
    click.option("--calibrator", type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
                 help="Activation range calibrator for --quantize int8.  [default: mse]"),
    click.option("--quant-distill", "quant_distill", type=click.IntRange(0), metavar="EPOCHS",
                 help="Quantization-aware distillation of --quantize int8: train the int8 "
                      "model to read what the float model reads on the calibration plates "
                      "(no labels; about 12 s an epoch for 600 plates on 2 cores).  [default: "
                      f"{FINETUNED_QUANT_DISTILL} with --finetune, else 0]"),
    click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), metavar="POINTS",
                 help="Accuracy budget in points of calib/ plate accuracy vs the original (0.5 "
                      "= half a point). Alone: search pruning x quantization for the smallest "
                      "variant within it (on a validation split of calib/), build it and "
                      "report its test/ accuracy. With --prune/--quantize: fail the build past "
                      "it (without it: past 1 point on the calib/ validation split)."),
    click.option("--search-channels", "search_channels", multiple=True,
                 type=click.FloatRange(0, 1, max_open=True), metavar="RATIO",
                 help="Also try channel pruning at RATIO (repeatable) in the search; each "
                      "distills on calib/ (minutes)."),
    click.option("--optimize", type=click.Choice(["size", "latency"]),
                 help="What the search minimises within --max-accuracy-drop: stored size, or "
                      "latency measured on the target (each candidate built untuned, or "
                      "with --tune's budget, and timed here for --target host, on the board "
                      "with --rpc HOST:PORT or --host).  [default: size]"),
)
tuning_options = grouped(
    "tuning", TuningArgs,
    click.option("--tune", is_flag=True, help="Tune with MetaSchedule before compiling."),
    click.option("--trials", type=click.IntRange(min=1),
                 help="Tuning trials in total.  [default: 600: a first round for every "
                      "task, then the convolutions by cost; at most 25 min of tuning]"),
    rpc_options,
    click.option("--tuning-db", type=click.Path(file_okay=False),
                 help="Tuning records directory (reused across builds; default: the cache)."),
)
check_options = grouped(
    "checks", CheckArgs,
    click.option("--calib", "calib_dir", type=click.Path(exists=True, file_okay=False),
                 help="Calibration images (prune, quantize, verification).  "
                      "[default: $LPRNET_EDGE_DATA/calib]"),
    click.option("--verify-images", type=click.IntRange(min=0),
                 help="Verify on the first N calib images (0: skip).  [default: all]"),
    click.option("--tolerance", type=click.FloatRange(min=0),
                 help="Max |logit diff| vs PyTorch allowed by verification.  [default: 1e-3]"),
    click.option("--eval-test", is_flag=True,
                 help="Measure test/ accuracy (host builds) and record it in the manifest."),
    click.option("--test-dir", type=click.Path(exists=True, file_okay=False),
                 help="Test images for --eval-test.  [default: $LPRNET_EDGE_DATA/test]"),
    click.option("--finetune", "finetune_data", type=click.Path(exists=True),
                 help="Fine-tune on these labelled plates first (folder or file,text CSV; 0.2 "
                      "held out): every later stage uses the fine-tuned model and that split."),
)


target_options = grouped(
    "target", TargetArgs,
    click.option("--target", "target_name", default=DEFAULT_TARGET, show_default=True,
                 help="Target name (`lprnet-edge targets list`)."),
    click.option("--target-file", type=click.Path(exists=True, dir_okay=False),
                 help="A target TOML file instead of a named target."),
    click.option("--cc", help="C++ compiler that links the module (overrides the target's)."),
)
output_options = grouped(
    "output", OutputArgs,
    out_option("Artifact directory  [default: build/lprnet-<target>]"),
    click.option("--force", is_flag=True, help="Replace an existing artifact directory."),
    click.option("--bundle", is_flag=True,
                 help="Also write <artifact>.tar.gz for deployment."),
    json_option,
)
compile_options = grouped(
    "compiling", CompileArgs,
    click.option("--frontend", type=click.Choice(["torch.export", "onnx"]),
                 default="torch.export", show_default=True, help="How the model enters TVM."),
    click.option("--layout", type=click.Choice(["NHWC", "NCHW"]), default="NHWC",
                 show_default=True,
                 help="Convolution data layout (NHWC vectorizes over channels; NCHW for "
                      "comparison)."),
    threads_option("Runtime threads recorded in the artifact (default: the target's cores)."),
    click.option("--opt-level", type=click.IntRange(0, 3), default=3, show_default=True,
                 help="TVM optimisation level."),
)


# ---------------------------------------------------------------- build


@click.command("build")
@target_options
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="PyTorch weights (default: $LPRNET_EDGE_WEIGHTS, $LPRNET_EDGE_DATA, cache).")
@output_options
@compile_options
@compression_options
@tuning_options
@check_options
@ssh_options_optional
@click.pass_context
def build_cmd(ctx: click.Context, target: TargetArgs, weights: str | None, output: OutputArgs,
              compiling: CompileArgs, compression: CompressionArgs, tuning: TuningArgs,
              checks: CheckArgs, **ssh: Any) -> None:
    """Compile LPRNet into a verified artifact for a target (cross-compiling for devices).

    \b
    Stages: load -> [prune] -> [quantize] -> [accuracy] -> import -> [tune] -> compile ->
    verify -> [eval] -> package.
    A host build is run on the calib/ images and compared with PyTorch; the artifact
    (model.so, params.npz, manifest.json) only appears if every stage succeeds.

    \b
    Examples:
      lprnet-edge build --target host -o build/lprnet-host
      lprnet-edge build --target rpi4 --bundle
      lprnet-edge build --target-file my-board.toml --cc /opt/x-tools/bin/aarch64-g++
      lprnet-edge build --target rpi4 --tune --trials 500 --host pi@raspberrypi.local

    With --host the device takes part: --tune measures there (a TVM RPC server started on
    it over SSH and reached through a tunnel, unless --rpc/--rpc-tracker is given), and the
    finished artifact is deployed to it and run there (`lprnet-edge deploy`).
    """
    # The pipeline imports torch and the compiler: only this command pays for them, not
    # every `lprnet-edge` invocation (main loads all command modules).
    from lprnet_edge.pipeline.build import build_artifact, rebundle

    spec = target.spec(ctx)
    compression.check()
    tuning.check(compression.latency_search)
    _check_device(spec, compression, tuning, ssh)
    opts = build_options(spec, weights, target, output, compiling, compression, tuning, checks)
    if not ssh.get("host") and (packed := rebundle(opts)) is not None:
        click.echo(f"{opts.out} is already built from these settings: bundled as it is "
                   "(--force rebuilds it)", err=True)
        click.echo(f"bundle        {packed} ({_size(packed.stat().st_size)})")
        return
    deployed = None
    with contextlib.ExitStack() as device_ctx:
        dev = device_ctx.enter_context(device_from(ssh)) if ssh.get("host") else None
        if dev is not None:
            opts = _measure_on_device(dev, device_ctx, opts, compression, tuning)
        res = build_artifact(opts, log=lambda msg: click.echo(msg, err=True))
        if dev is not None:
            deployed = deploy_with_progress(dev, res.path)
    if output.as_json:
        m = res.manifest.to_dict()
        echo_json({**m, "deployed": deployed.to_dict()} if deployed is not None else m)
        return
    print_build(res, spec)
    if deployed is not None:
        click.echo(f"\ndeployed      {deployed.name} on {deployed.host} ({deployed.device_arch}), "
                   f"model loaded and run there in "
                   f"{deployed.checks.first_inference_s or 0:.2f} s")
    elif not spec.is_native:
        user = spec.device.get("ssh_user", "user")
        click.echo(f"\nNext: lprnet-edge deploy {res.path} --host {user}@<{spec.name}-address>")


def _check_device(spec: TargetSpec, compression: CompressionArgs, tuning: TuningArgs,
                  ssh: dict[str, Any]) -> None:
    """Refuse a device option that cannot apply to ``spec``."""
    if ssh.get("host") and spec.is_native:
        raise click.UsageError(f"--host deploys to a device; --target {spec.name} builds for "
                               "this machine (use a device target, e.g. --target rpi4)")
    if (compression.latency_search and not spec.is_native and not tuning.rpc
            and not ssh.get("host")):
        raise click.UsageError(f"--optimize latency for {spec.name} times the candidates on "
                               "the board: give --rpc HOST:PORT (a TVM RPC server on it) or "
                               "--host USER@HOST")


def build_options(spec: TargetSpec, weights: str | None, target: TargetArgs,
                  output: OutputArgs, compiling: CompileArgs, compression: CompressionArgs,
                  tuning: TuningArgs, checks: CheckArgs) -> BuildOptions:
    """The pipeline's options from the command's groups."""
    from lprnet_edge.pipeline.build import BuildOptions  # torch: see build_cmd

    return BuildOptions(
        target=spec, out=output.path(spec), weights=weights, cc=target.cc, force=output.force,
        bundle=output.bundle, compile=compiling.config(checks.tolerance),
        prune=compression.prune_config(),
        quantize=compression.quantize_config(finetuning=checks.finetune_data is not None),
        tune=tuning.config(),
        calib_dir=Path(checks.calib_dir) if checks.calib_dir else None,
        verify_images=checks.verify_images, eval_test=checks.eval_test,
        test_dir=Path(checks.test_dir) if checks.test_dir else None,
        max_accuracy_drop=compression.max_accuracy_drop,
        search_channels=tuple(compression.search_channels),
        optimize=compression.optimize or "size",
        latency_rpc=tuning.rpc if compression.latency_search else None,
        finetune=checks.finetune_config(),
    )


def _measure_on_device(dev: Any, device_ctx: contextlib.ExitStack, opts: BuildOptions,
                       compression: CompressionArgs, tuning: TuningArgs) -> BuildOptions:
    """``opts`` measuring on the device through an RPC server started there over SSH, when
    tuning or the latency search needs one and no RPC address was given."""
    if tuning.measures_on_device_via_ssh:
        click.echo(f"starting a TVM RPC server on {dev.conn.spec} (SSH tunnel)", err=True)
        rpc = f"127.0.0.1:{device_ctx.enter_context(device_rpc(dev))}"
        return replace(opts, tune=replace(opts.tune, rpc=rpc),
                       latency_rpc=rpc if compression.latency_search else opts.latency_rpc)
    if compression.latency_search and not tuning.rpc:
        click.echo(f"starting a TVM RPC server on {dev.conn.spec} (SSH tunnel) to time "
                   "the candidates", err=True)
        return replace(opts, latency_rpc=f"127.0.0.1:{device_ctx.enter_context(device_rpc(dev))}")
    return opts


def print_build(res: BuildResult, spec: TargetSpec) -> None:
    """The artifact, its checks and its files, from the build's typed results."""
    m = res.manifest
    files = [[n, _size(e.size), e.sha256[:16]] for n, e in m.files.items()]
    files.append(["manifest.json", _size((res.path / "manifest.json").stat().st_size), ""])
    click.echo(f"artifact      {res.path}")
    cpu = (m.target.tvm or {}).get("mcpu", "generic")
    click.echo(f"target        {spec.name} ({spec.arch}, {cpu})")
    click.echo(f"verification  {res.verification.summary()}")
    if res.selection is not None:
        print_selection(res.selection)
    if (tuned := m.reports.get("tune")) and tuned.get("est_ms_after") is not None:
        how = (f"{tuned['estimated']}, not measured on a board" if tuned.get("estimated")
               else f"measured, {tuned.get('runner', 'local')}")
        part = ("" if tuned.get("est_tasks_after") == tuned["tasks"]
                else f" over {tuned.get('est_tasks_after')}/{tuned['tasks']} tasks")
        click.echo(f"tuned         {tuned['tasks_tuned']}/{tuned['tasks']} tasks, model "
                   f"{tuned['est_ms_after']:.2f} ms{part} ({how})")
    if res.test_accuracy is not None:
        a = res.test_accuracy
        click.echo(f"test accuracy {a.accuracy:.3f} ({a.images} images, batch 1)")
    if res.bundle:
        click.echo(f"bundle        {res.bundle} ({_size(res.bundle.stat().st_size)})")
    click.echo(f"time          {res.total_s:.1f}s ("
               + ", ".join(f"{n} {t:.1f}s" for n, t in res.timings) + ")")
    click.echo("\n" + table(files, ["file", "size", "sha256"]))


def print_selection(sel: Selection) -> None:
    click.echo("\n" + selection_table(sel) + "\n")
    click.echo(f"selected      {sel.selected} ({sel.why or 'smallest'}; within "
               f"{sel.budget.points:g} pt on {sel.val_images} calib/ validation plates)")
    t = sel.test
    if t is not None and t.skipped is None:
        click.echo(f"test accuracy {t.selected:.3f} vs original {t.original:.3f} "
                   f"({t.change_points:+.1f} pt, {t.images} images, PyTorch)")


def selection_table(sel: Selection) -> str:
    """The search's candidates, as the manifest records them."""
    timed = sel.optimize == "latency"
    rows = []
    for r in sel.candidates:
        latency = ([f"{r.latency.latency_ms:.2f}" if r.latency is not None else "-"]
                   if timed else [])
        rows.append([("* " if r.name == sel.selected else "  ") + r.name,
                     f"{r.check.changed:.3f}", f"{r.check.lost_points:.1f}",
                     _size(r.stored_bytes), f"{r.flops / 1e6:.0f}", *latency,
                     "yes" if r.within_budget else "no"])
    return table(rows, ["candidate", "val acc", "lost pt", "stored", "MFLOPs",
                        *(["latency ms"] if timed else []), "within"])


COMMANDS = (build_cmd,)
