#!/usr/bin/env python
"""Regenerate the packaged default schedules (lprnet_edge/compiler/data/default_schedules).

Every build applies them to kernels its own tuning database does not cover (every untuned
build, every cross build without a board): the fastest MetaSchedule trace per LPRNet fp32
workload, tuned here on the host. Records are keyed by workload, so they replay for any LLVM
target (aarch64 included); see lprnet_edge/compiler/schedules.py.

    python benchmarks/make_default_schedules.py                    # tune (--trials) + export
    python benchmarks/make_default_schedules.py --from DB [--from DB2]   # export only
    python benchmarks/make_default_schedules.py --unfolded         # full-width LPRNet workloads
    python benchmarks/make_default_schedules.py --target rpi4      # a board's core, estimated

``--target rpi4|rpi5`` tunes for that board's core without the board (each candidate's cost
is the cost instrument's estimated cycles for the Cortex-A72/A76) and writes the set for that
core (``default_schedules/<mcpu>/``), which builds for the target apply before the x86 set.

Existing defaults are merged in (a faster record wins), so repeated runs only improve them.
The checkpoint's own workloads are those of its constant-channel-folded form
(lprnet_edge/model/channel_fold.py); ``--unfolded`` tunes the full-width LPRNet instead, what
a checkpoint without dead filters (a retrained or random model) compiles to.
Run it on an x86 host with AVX2 or better; it takes as long as the tuning budget says.
``--target rpi4`` (or ``rpi5``) tunes against the cost instrument's estimated Cortex-A72
(A76) cycles, no board needed (docs/tuning.md); its records' run times are estimates, so they
go to the core's own directory. The board's build is then estimated before and after the
export, and a kernel that got slower keeps its previous record (or falls back to the related
core's set): a record from a short search must not replace a better one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LPRNET_EDGE_DATA", str(REPO.parent / "shared" / "lprnet"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="src", action="append", default=[], metavar="DB_DIR",
                    help="Tuning database directories to export (skip tuning).")
    ap.add_argument("--trials", type=int, default=1500, help="Tuning budget when tuning here.")
    ap.add_argument("--tune-minutes", type=float, default=None,
                    help="Start no new tuning round after this many minutes.")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--unfolded", action="store_true",
                    help="Tune the full-width model (no constant-channel folding).")
    ap.add_argument("--target", default="host",
                    help="host (the x86 set) or a board (rpi4, rpi5): its core's own set.")
    ap.add_argument("--out", default=None, help="Output directory (default: the package's).")
    args = ap.parse_args()

    from lprnet_edge.compiler import schedules

    src = [Path(p) for p in args.src]
    if not src:
        from lprnet_edge.compiler.frontend import to_relax
        from lprnet_edge.compiler.target import load_target
        from lprnet_edge.compiler.tuning import TuneConfig, TuneOptions, tune
        from lprnet_edge.model.checkpoint import load_model
        from lprnet_edge.model.weights import resolve_weights

        mod, _params = to_relax(load_model(resolve_weights(args.weights)),
                                fold_channels=not args.unfolded)
        _db, summary = tune(mod, load_target(args.target), TuneConfig(trials=args.trials),
                            options=TuneOptions(time_budget_s=args.tune_minutes * 60
                                                if args.tune_minutes else None))
        src = [Path(summary.db_dir)]
    out = args.out
    if out is None and args.target != "host":
        from lprnet_edge.compiler.target import load_target

        out = schedules.defaults_dir(schedules.target_cpu(load_target(args.target).tvm_target()))
    board = args.target != "host"
    if board:  # the kernels as a build for the board compiles them now
        before, old = kernel_cycles(args.target), schedules.set_records(Path(out))
    res = schedules.export_defaults(src, out)
    print(f"{res['records']} default schedules written to {res['dir']} "
          f"(from {', '.join(res['sources'])})")
    if board:
        keep_the_faster(args, Path(out), before, old)


def keep_the_faster(args: argparse.Namespace, out: Path, before: dict[str, float],
                    old: dict[int, object]) -> None:
    """Per kernel, the board's set keeps the new record only if the estimate of the whole
    build says that kernel got faster; otherwise the record it had (or none: the related
    core's set applies again, as before). Records of the core's own set compare by their
    estimated times, but one of a related core's does not: the build is what is compared."""
    from lprnet_edge.compiler import schedules

    after = kernel_cycles(args.target)
    slower = {n for n, c in after.items() if n in before and c > before[n]}
    hashes = task_hashes(args.target, args.weights, args.unfolded)
    records = schedules.set_records(out)
    for name in sorted(slower & set(hashes)):
        h = hashes[name]
        print(f"  {name}: {before[name] / 1e6:.3f} -> {after[name] / 1e6:.3f} M cycles "
              "estimated: " + ("the previous record kept" if h in old else "left to the "
                               "related core's set"))
        if h in old:
            records[h] = old[h]
        else:
            records.pop(h, None)
    schedules.write_records(records.values(), out)
    print(f"{len(records)} default schedules kept in {out}")


def kernel_cycles(target: str) -> dict[str, float]:
    """Estimated cycles per kernel of ``lprnet-edge build --target T`` with the package's
    defaults as they are (built in a fresh process, which reads them from disk)."""
    import subprocess
    import tempfile

    from lprnet_edge.compiler.cost.cpus import TARGET_CPU, cpu_model
    from lprnet_edge.compiler.cost.estimate import artifact_program, estimate_cycles

    with tempfile.TemporaryDirectory(prefix="lprnet-defaults-") as tmp:
        art = Path(tmp) / f"{target}-fp32"
        subprocess.run([sys.executable, "-m", "lprnet_edge.cli.main", "build", "--target",
                        target, "-o", str(art), "--force"], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
        cpu = cpu_model(TARGET_CPU[target])
        est = estimate_cycles(artifact_program(art, cpu), cpu, kernels=True)
    return {k.name: k.cycles for k in est.kernels}


def task_hashes(target: str, weights: str | None, unfolded: bool) -> dict[str, int]:
    """Kernel name -> workload hash of the checkpoint's tasks for ``target``."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from lprnet_edge.compiler.compile import prepare_for_tuning
    from lprnet_edge.compiler.frontend import to_relax
    from lprnet_edge.compiler.target import load_target
    from lprnet_edge.model.checkpoint import load_model
    from lprnet_edge.model.weights import resolve_weights

    spec = load_target(target)
    mod, _ = to_relax(load_model(resolve_weights(weights)), fold_channels=not unfolded)
    tasks = ms.relax_integration.extract_tasks(prepare_for_tuning(mod, spec), spec.tvm_target())
    return {t.task_name: int(tvm_ffi.structural_hash(t.dispatched[0])) for t in tasks}


if __name__ == "__main__":
    main()
