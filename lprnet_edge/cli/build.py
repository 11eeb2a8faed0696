"""``lprnet-edge build`` and ``lprnet-edge targets``: compile an artifact for a device.

Added to the root group by :mod:`lprnet_edge.cli.main` (``COMMANDS``).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from lprnet_edge.cli.common import echo_json, table
from lprnet_edge.cli.device import deploy_with_progress, device_from, ssh_options_optional

DEFAULT_TARGET = "rpi4"


def _target(name: str | None, target_file: str | None) -> Any:
    from lprnet_edge.compiler.target import load_target

    return load_target(target_file or name or DEFAULT_TARGET)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ---------------------------------------------------------------- build


@click.command("build")
@click.option("--target", "target_name", default=DEFAULT_TARGET, show_default=True,
              help="Target name (`lprnet-edge targets list`).")
@click.option("--target-file", type=click.Path(exists=True, dir_okay=False),
              help="A target TOML file instead of a named target.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="PyTorch weights (default: $LPRNET_EDGE_WEIGHTS, $LPRNET_EDGE_DATA, cache).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Artifact directory  [default: build/lprnet-<target>]")
@click.option("--cc", help="C++ compiler that links the module (overrides the target's).")
@click.option("--force", is_flag=True, help="Replace an existing artifact directory.")
@click.option("--bundle", is_flag=True, help="Also write <artifact>.tar.gz for deployment.")
@click.option("--frontend", type=click.Choice(["torch.export", "onnx"]),
              default="torch.export", show_default=True, help="How the model enters TVM.")
@click.option("--threads", type=click.IntRange(min=1),
              help="Runtime threads recorded in the artifact (default: the target's cores).")
@click.option("--opt-level", type=click.IntRange(0, 3), default=3, show_default=True,
              help="TVM optimisation level.")
# compression (lprnet_edge.compress.prune / lprnet_edge.compress.quantize)
@click.option("--prune", "prune_kind", type=click.Choice(["unstructured", "channels"]),
              help="Prune before compiling.")
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True),
              help="Unstructured pruning: fraction of conv weights set to zero.  [default: 0.8]")
@click.option("--prune-ratio", type=click.FloatRange(0, 1, max_open=True),
              help="Channel pruning: fraction of filters removed.  [default: 0.5]")
@click.option("--quantize", "quantize_mode", type=click.Choice(["int8", "fp16", "int8-weights"]),
              help="Post-training quantization calibrated on calib/.")
@click.option("--calibrator", type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
              help="Activation range calibrator for --quantize int8.  [default: percentile]")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), metavar="POINTS",
              help="Accuracy budget in points of calib/ plate accuracy vs the original (0.5 "
                   "= half a point). Alone: search pruning x quantization for the smallest "
                   "variant within it (on a validation split of calib/), build it and report "
                   "its test/ accuracy. With --prune/--quantize: fail the build past it.")
@click.option("--search-channels", "search_channels", multiple=True,
              type=click.FloatRange(0, 1, max_open=True), metavar="RATIO",
              help="Also try channel pruning at RATIO (repeatable) in the search; each "
                   "distills on calib/ (minutes).")
# tuning (lprnet_edge.compiler.tune)
@click.option("--tune", is_flag=True, help="Tune with MetaSchedule before compiling.")
@click.option("--trials", type=click.IntRange(min=1), help="Tuning trials in total.  "
              "[default: 200]")
@click.option("--rpc", metavar="HOST:PORT", help="Measure on a device's TVM RPC server.")
@click.option("--rpc-tracker", metavar="HOST:PORT", help="Measure through a TVM RPC tracker.")
@click.option("--rpc-key", help="Device key registered with the tracker.")
@click.option("--tuning-db", type=click.Path(file_okay=False),
              help="Tuning records directory (reused across builds; default: the cache).")
# verification / data
@click.option("--calib", "calib_dir", type=click.Path(exists=True, file_okay=False),
              help="Calibration images (prune, quantize, verification).  "
                   "[default: $LPRNET_EDGE_DATA/calib]")
@click.option("--verify-images", type=click.IntRange(min=0),
              help="Verify on the first N calib images (0: skip).  [default: all]")
@click.option("--tolerance", type=click.FloatRange(min=0),
              help="Max |logit diff| vs PyTorch allowed by verification.  [default: 1e-3]")
@click.option("--eval-test", is_flag=True,
              help="Measure test/ accuracy (host builds) and record it in the manifest.")
@click.option("--test-dir", type=click.Path(exists=True, file_okay=False),
              help="Test images for --eval-test.  [default: $LPRNET_EDGE_DATA/test]")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
# the device (lprnet_edge.cli.device)
@ssh_options_optional
@click.pass_context
def build_cmd(ctx: click.Context, target_name: str, target_file: str | None,
              weights: str | None, out: str | None, cc: str | None, force: bool, bundle: bool,
              frontend: str, threads: int | None, opt_level: int, prune_kind: str | None,
              sparsity: float | None, prune_ratio: float | None, quantize_mode: str | None,
              calibrator: str | None, max_accuracy_drop: float | None,
              search_channels: tuple[float, ...], tune: bool,
              trials: int | None, rpc: str | None, rpc_tracker: str | None,
              rpc_key: str | None, tuning_db: str | None, calib_dir: str | None,
              verify_images: int | None, tolerance: float | None, eval_test: bool,
              test_dir: str | None, as_json: bool, **ssh: Any) -> None:
    """Compile LPRNet into a verified artifact for a target (cross-compiling for devices).

    \b
    Stages: load -> [prune] -> [quantize] -> import -> [tune] -> compile -> verify -> package.
    A host build is run on the calib/ images and compared with PyTorch; the artifact
    (model.so, params.npz, manifest.json) only appears if every stage succeeds.

    \b
    Examples:
      lprnet-edge build --target host --out build/lprnet-host
      lprnet-edge build --target rpi4 --bundle
      lprnet-edge build --target-file my-board.toml --cc /opt/x-tools/bin/aarch64-g++
      lprnet-edge build --target rpi4 --tune --trials 500 --host pi@raspberrypi.local

    With --host the device takes part: --tune measures there (a TVM RPC server started on
    it over SSH and reached through a tunnel, unless --rpc/--rpc-tracker is given), and the
    finished artifact is deployed to it and run there (`lprnet-edge deploy`).
    """
    from lprnet_edge.compress.configs import CompileConfig, PruneConfig, QuantizeConfig, TuneConfig
    from lprnet_edge.pipeline.build import BuildOptions, build_artifact, verification_summary

    if target_file and ctx.get_parameter_source("target_name") != ParameterSource.DEFAULT:
        raise click.UsageError("give either --target or --target-file, not both")
    if (sparsity is not None) and prune_kind != "unstructured":
        raise click.UsageError("--sparsity needs --prune unstructured")
    if (prune_ratio is not None) and prune_kind != "channels":
        raise click.UsageError("--prune-ratio needs --prune channels")
    if calibrator and not quantize_mode:
        raise click.UsageError("--calibrator needs --quantize")
    if search_channels and (max_accuracy_drop is None or prune_kind or quantize_mode):
        raise click.UsageError("--search-channels goes with --max-accuracy-drop alone (the "
                               "search), not with --prune/--quantize")
    tune_only = {"--trials": trials, "--rpc": rpc, "--rpc-tracker": rpc_tracker,
                 "--rpc-key": rpc_key, "--tuning-db": tuning_db}
    if not tune and (given := [k for k, v in tune_only.items() if v is not None]):
        raise click.UsageError(f"{', '.join(given)} "
                               f"{'needs' if len(given) == 1 else 'need'} --tune")
    if rpc and rpc_tracker:
        raise click.UsageError("give either --rpc or --rpc-tracker, not both")
    if rpc == "tunnel" and not ssh.get("host"):
        raise click.UsageError("--rpc tunnel needs --host (the device to start the server on)")

    spec = _target(target_name, target_file)
    if ssh.get("host") and spec.is_native:
        raise click.UsageError(f"--host deploys to a device; --target {spec.name} builds for "
                               "this machine (use a device target, e.g. --target rpi4)")
    prune_cfg = None
    if prune_kind:
        kw: dict[str, Any] = {"kind": prune_kind}
        if sparsity is not None:
            kw["sparsity"] = sparsity
        if prune_ratio is not None:
            kw["ratio"] = prune_ratio
        prune_cfg = PruneConfig(**kw)
    quant_cfg = None
    if quantize_mode:
        quant_cfg = QuantizeConfig(mode=quantize_mode, **({"calibrator": calibrator}
                                                          if calibrator else {}))
    tune_cfg = None
    if tune:
        tkw: dict[str, Any] = {"rpc": rpc, "rpc_tracker": rpc_tracker, "rpc_key": rpc_key,
                               "db_dir": tuning_db}
        if trials is not None:
            tkw["trials"] = trials
        tune_cfg = TuneConfig(**tkw)
    ckw: dict[str, Any] = {"frontend": frontend, "opt_level": opt_level, "num_threads": threads}
    if tolerance is not None:
        ckw["verify_tolerance"] = tolerance
    opts = BuildOptions(
        target=spec,
        out=Path(out) if out else Path("build") / f"lprnet-{spec.name}",
        weights=weights, cc=cc, force=force, bundle=bundle,
        compile=CompileConfig(**ckw), prune=prune_cfg, quantize=quant_cfg, tune=tune_cfg,
        calib_dir=Path(calib_dir) if calib_dir else None, verify_images=verify_images,
        eval_test=eval_test, test_dir=Path(test_dir) if test_dir else None,
        max_accuracy_drop=max_accuracy_drop, search_channels=tuple(search_channels),
    )
    with contextlib.ExitStack() as device_ctx:
        dev = device_ctx.enter_context(device_from(ssh)) if ssh.get("host") else None
        if dev is not None and tune_cfg is not None and (rpc in (None, "tunnel")
                                                         and not rpc_tracker):
            from lprnet_edge.device.deploy import device_rpc

            click.echo(f"starting a TVM RPC server on {dev.conn.spec} (SSH tunnel)", err=True)
            lport = device_ctx.enter_context(device_rpc(dev))
            opts.tune = replace(tune_cfg, rpc=f"127.0.0.1:{lport}")
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
        click.echo(f"selected      {sel['selected']} (smallest stored size within "
                   f"{sel['budget_points']:g} pt on {sel['val_split']['images']} calib/ "
                   "validation plates)")
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
    rows = [[("* " if r["name"] == sel["selected"] else "  ") + r["name"],
             f"{r['val_accuracy']:.3f}", f"{100 * r['val_lost']:.1f}",
             _size(r["stored_bytes"]), f"{r['flops'] / 1e6:.0f}",
             "yes" if r["within_budget"] else "no"] for r in sel["candidates"]]
    return table(rows, ["candidate", "val acc", "lost pt", "stored", "MFLOPs", "within"])


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
