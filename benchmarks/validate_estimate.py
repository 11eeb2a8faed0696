"""Validate the cost instrument where wall time is real: x86 programs, estimated and timed.

    python benchmarks/validate_estimate.py [--work DIR] [--rounds N] [--out docs/arm-estimates.md]

Builds host artifacts for an AVX2 core (qemu 7.2's TCG runs up to AVX2, not AVX-512): naive
loops (no schedules), untuned (packaged default schedules), tuned (a small MetaSchedule run),
NCHW, int8, channel-pruned, channel-pruned int8, plus ONNX Runtime fp32 on the exported and on the
channel-folded graph. Each is estimated under ``qemu-x86_64``
with the counting plugin and llvm-mca for this CPU's family, and timed natively at 1 thread
in the same run (interleaved rounds, min and median). One global scale maps cycles to ms;
the table gives each program's estimate/measured ratio after it and the Spearman rank
correlation. Goal: rank correlation >= 0.9 and every ratio within +-30%.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lprnet_edge.compiler.cost.cpus import host_cpu  # noqa: E402
from lprnet_edge.compiler.cost.estimate import (  # noqa: E402
    CAVEATS,
    METHOD,
    CostEstimate,
    artifact_program,
    estimate_cycles,
    local_program,
)
from lprnet_edge.compiler.cost.plugin import LLVM_VERSION, MCA  # noqa: E402
from lprnet_edge.runtime.cost_runner import fixed_input  # noqa: E402

COMMAND = "python benchmarks/validate_estimate.py"
TARGET_TOML = """name = "host-avx2"
description = "This x86 machine limited to AVX2 (what qemu 7.2 TCG runs), LLVM model {mcpu}"
arch = "x86_64"

[tvm]
kind = "llvm"
mcpu = "{mcpu}"
num-cores = 1

[toolchain]
compiler = ["g++", "c++", "clang++", "cc"]
debian_package = "g++"
"""
# name -> extra build flags ("naive": the packaged default schedules switched off)
VARIANTS = {
    "naive": [],
    "untuned": [],
    "tuned": ["--tune", "--trials", "48"],
    "nchw": ["--layout", "NCHW"],
    "int8": ["--quantize", "int8"],
    "channels": ["--prune", "channels"],
    "channels-int8": ["--prune", "channels", "--quantize", "int8"],
}
GOAL_RHO, GOAL_BAND = 0.9, 0.30
TIMEOUT_S = 4 * 3600  # one qemu run on a loaded machine


@dataclass(frozen=True)
class Row:
    """One program: estimated cycles and instructions, measured ms (min, median), and why
    the code timed natively differs from the code estimated, if it does."""

    name: str
    cycles: float
    instructions: float
    min_ms: float  # thread CPU time
    median_ms: float
    wall_min_ms: float
    differs: str = ""

    @property
    def same_code(self) -> bool:
        return not self.differs

    @property
    def ipc(self) -> float:
        return self.instructions / self.cycles

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "estimated_cycles": self.cycles,
                "instructions": self.instructions, "min_ms": self.min_ms,
                "median_ms": self.median_ms, "wall_min_ms": self.wall_min_ms,
                "differs": self.differs}


def native_difference(name: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Why ``name`` runs other code natively than under qemu on this machine ("" if not).

    Our artifacts are compiled for AVX2 and run the same code in both places. ONNX Runtime
    chooses its kernels from CPUID at start-up (MLAS has no switch to cap it): on a CPU with
    AVX-512F it runs its AVX-512F kernels natively (NCHWc blocks of 16), while under qemu 7.2,
    which offers AVX2 at most, it runs its FMA3 kernels (blocks of 8): another program.
    """
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if name.startswith("onnxruntime") and "avx512f" in flags:
        return ("natively AVX-512F kernels (NCHWc16), under qemu FMA3 kernels (NCHWc8): "
                "ONNX Runtime picks by CPUID")
    return ""


def build(work: Path, name: str, flags: list[str]) -> Path:
    """The artifact ``work/name`` (built once; ``naive`` through :func:`build_naive`)."""
    out = work / name
    if (out / "manifest.json").is_file():
        return out
    target = work / "host-avx2.toml"
    args = ["build", "--target-file", str(target), "-o", str(out), "--force", *flags]
    if "--tune" in flags:
        args += ["--tuning-db", str(work / "tuning-db")]
    cmd = [sys.executable, __file__, "--build-naive", *args] if name == "naive" else \
        [sys.executable, "-m", "lprnet_edge.cli.main", *args]
    print(f"[build] {name}: {' '.join(args)}", file=sys.stderr, flush=True)
    log = work / f"{name}.log"
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        raise SystemExit(f"building {name} failed: see {log}")
    return out


def build_naive(args: list[str]) -> int:
    """``lprnet-edge build`` with the packaged default schedules switched off: every kernel
    is TVM's naive loops, the slowest program the validation needs."""
    from unittest import mock

    from lprnet_edge.cli.main import cli
    from lprnet_edge.compiler import schedules

    with mock.patch.object(schedules, "packaged_defaults", lambda *_a: None):
        try:
            cli.main(args, prog_name="lprnet-edge", standalone_mode=False)
        except SystemExit as e:
            return int(e.code or 0)
    return 0


def onnx_file() -> Path:
    from lprnet_edge.model.onnx import export_onnx

    return export_onnx(None, 68).path


def estimate_all(programs: dict[str, tuple[str, str]], jobs: int, work: Path
                 ) -> dict[str, dict[str, float]]:
    """Each program's estimated cycles and instructions, ``jobs`` qemu runs at a time
    (deterministic counts: load changes how long they take, not what they count). Kept in
    ``work/estimates.json`` per program and artifact manifest, so a re-run only times."""
    cpu = host_cpu()
    store = work / "estimates.json"
    known = json.loads(store.read_text()) if store.is_file() else {}

    def key(name: str) -> str:
        kind, path = programs[name]
        f = Path(path) / "manifest.json" if kind == "--artifact" else Path(path)
        return f"{name}:{cpu.mca_cpu}:m{METHOD}:{hashlib.sha256(f.read_bytes()).hexdigest()[:16]}"

    lock = threading.Lock()

    def one(name: str) -> dict[str, float]:
        if key(name) in known:
            return known[key(name)]
        kind, path = programs[name]
        t0 = time.time()
        prog = artifact_program(path, cpu) if kind == "--artifact" else \
            local_program(name, (kind, path), cpu)
        est: CostEstimate = estimate_cycles(prog, cpu, kernels=False, timeout=TIMEOUT_S)
        print(f"[estimate] {name}: {est.cycles / 1e6:.2f} M cycles, "
              f"{est.instructions / 1e6:.2f} M instructions ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        with lock:  # kept as each finishes: a failure later does not lose it
            fresh = json.loads(store.read_text()) if store.is_file() else {}
            fresh[key(name)] = {"cycles": est.cycles, "instructions": est.instructions}
            store.write_text(json.dumps(fresh, indent=1))
        return fresh[key(name)]

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip(programs, pool.map(one, programs), strict=True))


def _runners(programs: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """A zero-argument callable per program: one inference, 1 thread, the fixed input."""
    os.environ["TVM_NUM_THREADS"] = "1"
    from lprnet_edge.runtime.artifact import Artifact
    from lprnet_edge.runtime.backends import TvmBackend
    from lprnet_edge.runtime.baselines import OnnxRuntimeModel

    out = {}
    for name, (kind, path) in programs.items():
        if kind == "--artifact":
            art = Artifact.open(path)
            model = TvmBackend(art, num_threads=1)
            x = fixed_input(art.manifest.input.shape)
        else:
            model = OnnxRuntimeModel(path, threads=1)
            x = fixed_input((1, 3, 24, 94))
        out[name] = (lambda m=model, v=x: m(v))
    return out


def measure(programs: dict[str, tuple[str, str]], rounds: int, per_round: int
            ) -> dict[str, tuple[float, float, float]]:
    """Per inference, natively: (min thread CPU ms, median thread CPU ms, min wall ms), the
    programs interleaved round by round. At one thread the work runs on the calling thread,
    so its CPU time is its run time without the time slices other processes take: on a
    loaded machine a program longer than a slice is always preempted and its wall-time
    minimum inflates, a short one's does not; CPU time keeps them comparable."""
    runners = _runners(programs)
    cpu: dict[str, list[float]] = {n: [] for n in runners}
    wall: dict[str, list[float]] = {n: [] for n in runners}
    for fn in runners.values():
        fn()
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(per_round):
                t0, c0 = time.perf_counter(), time.thread_time()
                fn()
                cpu[name].append((time.thread_time() - c0) * 1e3)
                wall[name].append((time.perf_counter() - t0) * 1e3)
    return {n: (min(cpu[n]), float(np.median(cpu[n])), min(wall[n])) for n in runners}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among timings)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def global_scale(rows: list[Row]) -> float:
    """ms per estimated cycle: the geometric mean of measured/estimated over the programs
    that run the same code natively as under qemu (one number for all, so only the spread
    between programs is tested)."""
    same = [r for r in rows if r.same_code] or rows
    return math.exp(sum(math.log(r.min_ms / r.cycles) for r in same) / len(same))


def verdict(rows: list[Row], scale: float) -> tuple[float, float, bool]:
    """Spearman rank correlation, worst relative error after the scale, goal met."""
    rho = spearman([r.cycles for r in rows], [r.min_ms for r in rows])
    worst = max(abs(r.cycles * scale / r.min_ms - 1) for r in rows)
    return rho, worst, rho >= GOAL_RHO and worst <= GOAL_BAND


def machine_note() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) "
            "at the end of the run")


def _table(rows: list[Row], scale: float) -> list[str]:
    lines = ["| program | M instructions | estimated M cycles (IPC) | estimated ms (scaled) "
             "| measured CPU ms, min | median | wall ms, min | estimate / measured |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " (other code natively)" if r.differs else ""
        lines.append(f"| {r.name}{mark} | {r.instructions / 1e6:.1f} | {r.cycles / 1e6:.1f} "
                     f"({r.ipc:.2f}) | {r.cycles * scale:.2f} | {r.min_ms:.2f} | "
                     f"{r.median_ms:.2f} | {r.wall_min_ms:.2f} | "
                     f"{r.cycles * scale / r.min_ms:.2f} |")
    return lines


def _verdict_lines(rows: list[Row], scale: float) -> list[str]:
    same = [r for r in rows if r.same_code]
    rho, worst, ok = verdict(same, scale)
    lines = [f"Programs that run the same code natively as under qemu ({len(same)}): "
             f"Spearman rank correlation **{rho:.3f}** (goal >= {GOAL_RHO}); worst program "
             f"**{worst * 100:.0f}%** off after the global scale (goal <= "
             f"{GOAL_BAND * 100:.0f}%): **{'met' if ok else 'not met'}**."]
    if len(same) < len(rows):
        rho_a, worst_a, ok_a = verdict(rows, scale)
        lines += ["", f"All {len(rows)} programs, with the same scale: Spearman "
                  f"{rho_a:.3f}, worst {worst_a * 100:.0f}% off "
                  f"({'met' if ok_a else 'not met'}). Timed natively, these run other code "
                  "than was estimated:", ""]
        lines += [f"- {r.name}: {r.differs}." for r in rows if r.differs]
    return lines


def render(rows: list[Row], scale: float, rounds: int, per_round: int, cpu_name: str) -> str:
    lines = [
        "# The cost instrument, validated on x86 (estimated cycles vs measured time)",
        "",
        f"Generated by `{' '.join([COMMAND, *sys.argv[1:]])}` on {dt.date.today().isoformat()}"
        ". Do not edit by hand; the full set of programs is `" + COMMAND + "`.",
        "",
        "Each program runs under `qemu-x86_64 -cpu max` (AVX2; qemu 7.2 has no AVX-512) with "
        "the counting plugin; every executed block is weighed with "
        f"`{MCA} -mcpu={cpu_name}` (LLVM {LLVM_VERSION}'s model of this CPU's family); the same "
        "program is timed natively at 1 thread in the same run "
        f"({rounds} interleaved rounds of {per_round} inferences each): the figure compared "
        "is the minimum of the calling thread's CPU time per inference (at one thread the "
        "work runs there), which leaves out the time slices other processes take; the "
        "wall-time minimum is shown beside it.",
        f"Machine: {machine_note()}.",
        "",
        f"One global scale, from the programs that run the same code in both places: "
        f"{scale * 1e6:.3f} ms per million estimated cycles (an effective "
        f"{1 / (scale * 1e6):.2f} GHz).",
        "",
        *_table(rows, scale),
        "",
        *_verdict_lines(rows, scale),
        "",
        f"The model behind every estimate: {CAVEATS}.",
        "",
        "Known differences between what is estimated and what is timed here: glibc's string "
        "functions pick their code by CPUID too (a `rep stosb` runs one element per qemu "
        "block and is weighed per element); LLVM's AMD models are of Zen 3 and Zen 4, older "
        "than a Zen 5. On a loaded machine CPU time still includes the caches other processes "
        "evict. If the goal is missed on a quiet machine, do not tune against the estimate.",
    ]
    return "\n".join(lines) + "\n"


def programs_for(work: Path, only: list[str]) -> dict[str, tuple[str, str]]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "host-avx2.toml").write_text(TARGET_TOML.format(mcpu=host_cpu().mca_cpu))
    progs = {n: ("--artifact", str(build(work, n, f))) for n, f in VARIANTS.items()
             if not only or n in only}
    if not only or "onnxruntime-fp32" in only:
        progs["onnxruntime-fp32"] = ("--onnx", str(onnx_file()))
    if not only or "onnxruntime-fp32-folded" in only:
        from arm_table import folded_onnx  # the channel-folded graph (benchmarks/arm_table.py)

        progs["onnxruntime-fp32-folded"] = ("--onnx", str(folded_onnx(work)))
    return progs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/lprnet-validate-estimate"),
                    help="where the artifacts are built (reused when present)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=3, help="qemu runs at a time")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "arm-estimates.md")
    ap.add_argument("--only", default="", help="comma-separated programs (default: all)")
    ap.add_argument("--estimate-only", action="store_true",
                    help="estimate (and keep the estimates), do not time or write the doc")
    args = ap.parse_args(argv)
    progs = programs_for(args.work, [n for n in args.only.split(",") if n])
    estimates = estimate_all(progs, args.jobs, args.work)
    if args.estimate_only:
        return 0
    timed = measure(progs, args.rounds, args.per_round)
    rows = [Row(n, estimates[n]["cycles"], estimates[n]["instructions"], *timed[n],
                differs=native_difference(n)) for n in progs]
    text = render(rows, global_scale(rows), args.rounds, args.per_round, host_cpu().mca_cpu)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--build-naive":
        sys.exit(build_naive(sys.argv[2:]))
    sys.exit(main())
