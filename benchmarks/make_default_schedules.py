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
go to ``--out`` (the package's directory holds host-measured ones).
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
    res = schedules.export_defaults(src, out)
    print(f"{res['records']} default schedules written to {res['dir']} "
          f"(from {', '.join(res['sources'])})")


if __name__ == "__main__":
    main()
