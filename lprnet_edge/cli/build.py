"""``lprnet-edge build`` and ``lprnet-edge targets``: compile an artifact for a device.

Added to the root group by :mod:`lprnet_edge.cli.main` (``COMMANDS``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from lprnet_edge.cli.common import (
    check_rpc,
    echo_json,
    grouped,
    json_option,
    out_option,
    rpc_options,
    table,
    threads_option,
)
from lprnet_edge.cli.device import deploy_with_progress, device_from, ssh_options_optional

DEFAULT_TARGET = "rpi4"


def _target(name: str | None, target_file: str | None) -> Any:
    from lprnet_edge.compiler.target import load_target

    return load_target(target_file or name or DEFAULT_TARGET)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ---------------------------------------------------------------- option groups


@dataclass(frozen=True)
class CompressionArgs:
    """``--prune --sparsity --prune-ratio --quantize --calibrator --max-accuracy-drop
    --search-channels --optimize`` as given."""

    prune_kind: str | None
    sparsity: float | None
    prune_ratio: float | None
    quantize_mode: str | None
    calibrator: str | None
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
        if self.search_channels and (self.max_accuracy_drop is None or self.prune_kind
                                     or self.quantize_mode):
            raise click.UsageError("--search-channels goes with --max-accuracy-drop alone "
                                   "(the search), not with --prune/--quantize")
        if self.optimize and not self.searching:
            raise click.UsageError("--optimize goes with --max-accuracy-drop alone (the "
                                   "search), not with --prune/--quantize")

    def prune_config(self) -> Any:
        from lprnet_edge.compress.configs import PruneConfig

        if not self.prune_kind:
            return None
        kw: dict[str, Any] = {"kind": self.prune_kind}
        if self.sparsity is not None:
            kw["sparsity"] = self.sparsity
        if self.prune_ratio is not None:
            kw["ratio"] = self.prune_ratio
        return PruneConfig(**kw)

    def quantize_config(self) -> Any:
        from lprnet_edge.compress.configs import QuantizeConfig

        if not self.quantize_mode:
            return None
        extra = {"calibrator": self.calibrator} if self.calibrator else {}
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

    def config(self) -> Any:
        from lprnet_edge.compress.configs import TuneConfig

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
                 help="Activation range calibrator for --quantize int8.  [default: percentile]"),
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
)


# ---------------------------------------------------------------- build


def _finetune_config(data: str | None, test_dir: str | None) -> Any:
    if data is None:
        return None
    from lprnet_edge.model.finetune import FinetuneConfig

    return FinetuneConfig(data=Path(data), test_dir=Path(test_dir) if test_dir else None)


@click.command("build")
@click.option("--target", "target_name", default=DEFAULT_TARGET, show_default=True,
              help="Target name (`lprnet-edge targets list`).")
@click.option("--target-file", type=click.Path(exists=True, dir_okay=False),
              help="A target TOML file instead of a named target.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="PyTorch weights (default: $LPRNET_EDGE_WEIGHTS, $LPRNET_EDGE_DATA, cache).")
@out_option("Artifact directory  [default: build/lprnet-<target>]")
@click.option("--cc", help="C++ compiler that links the module (overrides the target's).")
@click.option("--force", is_flag=True, help="Replace an existing artifact directory.")
@click.option("--bundle", is_flag=True, help="Also write <artifact>.tar.gz for deployment.")
@click.option("--frontend", type=click.Choice(["torch.export", "onnx"]),
              default="torch.export", show_default=True, help="How the model enters TVM.")
@click.option("--layout", type=click.Choice(["NHWC", "NCHW"]), default="NHWC",
              show_default=True,
              help="Convolution data layout (NHWC vectorizes over channels; NCHW for "
                   "comparison).")
@threads_option("Runtime threads recorded in the artifact (default: the target's cores).")
@click.option("--opt-level", type=click.IntRange(0, 3), default=3, show_default=True,
              help="TVM optimisation level.")
@click.option("--finetune", "finetune_data", type=click.Path(exists=True),
              help="Fine-tune on these labelled plates first (folder or file,text CSV; 0.2 "
                   "held out): every later stage uses the fine-tuned model and that split.")
@compression_options
@tuning_options
@check_options
@json_option
@ssh_options_optional
@click.pass_context
def build_cmd(ctx: click.Context, target_name: str, target_file: str | None,
              weights: str | None, out: str | None, cc: str | None, force: bool, bundle: bool,
              frontend: str, layout: str, threads: int | None, opt_level: int,
              finetune_data: str | None, compression: CompressionArgs,
              tuning: TuningArgs, checks: CheckArgs, as_json: bool, **ssh: Any) -> None:
    """Compile LPRNet into a verified artifact for a target (cross-compiling for devices).

    \b
    Stages: load -> [prune] -> [quantize] -> import -> [tune] -> compile -> verify -> package.
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
    from lprnet_edge.compress.configs import CompileConfig
    from lprnet_edge.pipeline.build import BuildOptions, build_artifact, verification_summary

    if target_file and ctx.get_parameter_source("target_name") != ParameterSource.DEFAULT:
        raise click.UsageError("give either --target or --target-file, not both")
    compression.check()
    tuning.check(compression.latency_search)
    spec = _target(target_name, target_file)
    if ssh.get("host") and spec.is_native:
        raise click.UsageError(f"--host deploys to a device; --target {spec.name} builds for "
                               "this machine (use a device target, e.g. --target rpi4)")
    if (compression.latency_search and not spec.is_native and not tuning.rpc
            and not ssh.get("host")):
        raise click.UsageError(f"--optimize latency for {spec.name} times the candidates on "
                               "the board: give --rpc HOST:PORT (a TVM RPC server on it) or "
                               "--host USER@HOST")
    tune_cfg = tuning.config()
    ckw: dict[str, Any] = {"frontend": frontend, "layout": layout, "opt_level": opt_level,
                           "num_threads": threads}
    if checks.tolerance is not None:
        ckw["verify_tolerance"] = checks.tolerance
    opts = BuildOptions(
        target=spec,
        out=Path(out) if out else Path("build") / f"lprnet-{spec.name}",
        weights=weights, cc=cc, force=force, bundle=bundle,
        compile=CompileConfig(**ckw), prune=compression.prune_config(),
        quantize=compression.quantize_config(), tune=tune_cfg,
        calib_dir=Path(checks.calib_dir) if checks.calib_dir else None,
        verify_images=checks.verify_images, eval_test=checks.eval_test,
        test_dir=Path(checks.test_dir) if checks.test_dir else None,
        max_accuracy_drop=compression.max_accuracy_drop,
        search_channels=tuple(compression.search_channels),
        optimize=compression.optimize or "size",
        latency_rpc=tuning.rpc if compression.latency_search else None,
        finetune=_finetune_config(finetune_data, checks.test_dir),
    )
    with contextlib.ExitStack() as device_ctx:
        dev = device_ctx.enter_context(device_from(ssh)) if ssh.get("host") else None
        if dev is not None and tuning.measures_on_device_via_ssh:
            from lprnet_edge.device.deploy import device_rpc

            click.echo(f"starting a TVM RPC server on {dev.conn.spec} (SSH tunnel)", err=True)
            lport = device_ctx.enter_context(device_rpc(dev))
            opts.tune = replace(tune_cfg, rpc=f"127.0.0.1:{lport}")
            if compression.latency_search:
                opts.latency_rpc = opts.tune.rpc
        elif dev is not None and compression.latency_search and not tuning.rpc:
            from lprnet_edge.device.deploy import device_rpc

            click.echo(f"starting a TVM RPC server on {dev.conn.spec} (SSH tunnel) to time "
                       "the candidates", err=True)
            opts.latency_rpc = f"127.0.0.1:{device_ctx.enter_context(device_rpc(dev))}"
        res = build_artifact(opts, log=lambda msg: click.echo(msg, err=True))
        if dev is not None:
            deployed = deploy_with_progress(dev, res.path)
    m = res.manifest
    if as_json:
        echo_json({**m, "deployed": deployed.to_dict()} if dev is not None else m)
        return
    files = [[n, _size(e["size"]), e["sha256"][:16]] for n, e in m["files"].items()]
    mpath = res.path / "manifest.json"
    files.append(["manifest.json", _size(mpath.stat().st_size), ""])
    cpu = m["target"]["tvm"].get("mcpu", "generic")
    click.echo(f"artifact      {res.path}")
    click.echo(f"target        {spec.name} ({spec.arch}, {cpu})")
    click.echo(f"verification  {verification_summary(m['verification'])}")
    if (sel := m["reports"].get("selection")):
        click.echo("\n" + selection_table(sel) + "\n")
        click.echo(f"selected      {sel['selected']} ({sel.get('why') or 'smallest'}; "
                   f"within {sel['budget_points']:g} pt on {sel['val_split']['images']} "
                   "calib/ validation plates)")
        t = sel.get("test") or {}
        if "selected" in t:
            click.echo(f"test accuracy {t['selected']:.3f} vs original {t['original']:.3f} "
                       f"({t['change_points']:+.1f} pt, {t['images']} images, PyTorch)")
    if m.get("accuracy"):
        a = m["accuracy"]
        click.echo(f"test accuracy {a['accuracy']:.3f} ({a['images']} images, batch 1)")
    if res.bundle:
        click.echo(f"bundle        {res.bundle} ({_size(res.bundle.stat().st_size)})")
    click.echo(f"time          {res.total_s:.1f}s ("
               + ", ".join(f"{n} {t:.1f}s" for n, t in res.timings) + ")")
    click.echo("\n" + table(files, ["file", "size", "sha256"]))
    if dev is not None:
        click.echo(f"\ndeployed      {deployed.name} on {deployed.host} ({deployed.device_arch}), "
                   f"model loaded and run there in "
                   f"{deployed.checks.get('first_inference_s') or 0:.2f} s")
    elif not spec.is_native:
        user = spec.device.get("ssh_user", "user")
        click.echo(f"\nNext: lprnet-edge deploy {res.path} --host {user}@<{spec.name}-address>")


def selection_table(sel: dict[str, Any]) -> str:
    """The search's candidates, as the manifest records them."""
    timed = sel.get("optimize") == "latency"
    rows = [[("* " if r["name"] == sel["selected"] else "  ") + r["name"],
             f"{r['val_accuracy']:.3f}", f"{100 * r['val_lost']:.1f}",
             _size(r["stored_bytes"]), f"{r['flops'] / 1e6:.0f}",
             *([f"{r['latency_ms']:.2f}" if r.get("latency_ms") is not None else "-"]
               if timed else []),
             "yes" if r["within_budget"] else "no"] for r in sel["candidates"]]
    return table(rows, ["candidate", "val acc", "lost pt", "stored", "MFLOPs",
                        *(["latency ms"] if timed else []), "within"])


# ---------------------------------------------------------------- targets


@click.group("targets")
def targets_group() -> None:
    """Compilation targets: built-in, $LPRNET_EDGE_TARGETS, ~/.config/lprnet-edge/targets."""


@targets_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets_list(as_json: bool) -> None:
    """Every known target, with its CPU and whether its compiler is installed.

    \b
    Example:
      lprnet-edge targets list
    """
    from lprnet_edge.compiler.target import load_target, target_names
    from lprnet_edge.compiler.toolchain import candidates, find_compiler
    from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError

    rows, data = [], []
    for name in target_names():
        try:
            t = load_target(name)
        except LprnetEdgeError as e:  # a broken user file: show it, keep listing the others
            rows.append([name, "?", "?", "?", f"INVALID: {e}"])
            data.append({"name": name, "error": str(e)})
            continue
        try:
            cc = find_compiler(t).path
        except ToolchainError:
            pkg = candidates(t)[1]
            cc = f"missing (apt-get install {pkg})" if pkg else "missing"
        rows.append([t.name, t.arch, t.tvm.get("mcpu", "generic"), cc, t.description])
        data.append({**t.to_dict(), "compiler": cc})
    if as_json:
        echo_json(data)
        return
    click.echo(table(rows, ["target", "arch", "cpu", "compiler", "description"]))


@targets_group.command("show")
@click.argument("name", required=False)
@click.option("--target-file", type=click.Path(exists=True, dir_okay=False),
              help="Show a target TOML file instead of a named target.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def targets_show(name: str | None, target_file: str | None, as_json: bool) -> None:
    """The resolved target (host: with the detected CPU), as TOML or JSON.

    \b
    Examples:
      lprnet-edge targets show host
      lprnet-edge targets show rpi4 --json
    """
    if not name and not target_file:
        raise click.UsageError("give a target NAME or --target-file")
    spec = _target(name, target_file)
    if as_json:
        echo_json(spec.to_dict())
    else:
        click.echo(spec.to_toml(), nl=False)


COMMANDS = (build_cmd, targets_group)
