"""Tuning for a board without the board: MetaSchedule measures candidates by estimated cycles.

For an ARM target with no device given (no ``--rpc``, ``--rpc-tracker`` or ``--host``), each
candidate (cross-compiled by the builder) runs under ``qemu-aarch64 -cpu cortex-a72`` (or
``cortex-a76``) with the cost instrument's counting plugin, and its executed blocks are
weighed with llvm-mca (:mod:`lprnet_edge.compiler.cost.batch`). The run time MetaSchedule
records is the estimated cycles of one call at the board's first clock (Pi 4: 1.5 GHz): an
estimate, not a measurement, and every figure of such a run says so. It is deterministic, so
tuning ranks candidates without the noise of wall time; what the model leaves out (caches,
memory bandwidth, branch misses, other cores) it cannot rank.

With a board the board's wall time is measured instead: its figures are the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lprnet_edge.compiler.cost.batch import Candidate, CandidateEstimator
from lprnet_edge.compiler.cost.cpus import CPUS, TARGET_CPU, CpuModel
from lprnet_edge.compiler.cost.plugin import find_tools
from lprnet_edge.compiler.cost.rootfs import aarch64_rootfs
from lprnet_edge.compiler.target import TargetSpec
from lprnet_edge.compiler.tuning.config import TuneConfig
from lprnet_edge.runtime.errors import LprnetEdgeError


@dataclass(frozen=True)
class EstimateSpec:
    """Which core the candidates are estimated for, and how many qemu processes at once."""

    cpu: str
    jobs: int | None = None

    @property
    def model(self) -> CpuModel:
        return CPUS[self.cpu]

    @property
    def clock_ghz(self) -> float:
        return self.model.clocks_ghz[0]

    def label(self) -> str:
        """What the figures of such a run are, in words (progress, summary, build output)."""
        core = self.cpu.replace("cortex-", "Cortex-").replace("-a7", "-A7")
        return f"estimated ({core} model, {self.clock_ghz:g} GHz)"

    def check(self) -> None:
        """Fail now, not in the worker, when qemu, the plugin, llvm-mca or the aarch64
        rootfs is missing (the error says how to install it)."""
        find_tools(self.model.arch)
        aarch64_rootfs()

    def to_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "jobs": self.jobs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EstimateSpec:
        return cls(cpu=str(d["cpu"]), jobs=d.get("jobs"))


def estimate_spec(target: Any, config: TuneConfig) -> EstimateSpec | None:
    """The estimate to tune against: an aarch64 target that this machine cannot run, and no
    device to measure on (None: measured here or on the device)."""
    if config.rpc or config.rpc_tracker:
        return None
    if not isinstance(target, TargetSpec) or target.is_native or target.arch != "aarch64":
        return None
    mcpu = target.tvm.get("mcpu")
    name = mcpu if mcpu in CPUS else TARGET_CPU.get(target.name)
    if name is None:
        raise LprnetEdgeError(
            f"target {target.name} (mcpu {mcpu!r}) has no cost model to tune against "
            f"(have: {', '.join(CPUS)}): give a device with --rpc HOST:PORT or --host, or "
            "set mcpu to one of them in the target file")
    return EstimateSpec(cpu=name)


def candidate(runner_input: Any) -> Candidate:
    """A MetaSchedule RunnerInput as the instrument's candidate (library and argument types)."""
    args = []
    for info in runner_input.args_info:
        kind, dtype, shape = info.as_json()
        if kind != "TENSOR":
            raise LprnetEdgeError(f"argument kind {kind} cannot be estimated")
        args.append((str(dtype), tuple(int(d) for d in shape)))
    return Candidate(str(runner_input.artifact_path), tuple(args))


def make_runner(spec: EstimateSpec, timeout_s: float) -> Any:
    """A MetaSchedule runner whose run time per candidate is its estimated cycles at the
    board's clock (runs in the tuning worker; its guest processes serve every batch)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    hz = spec.clock_ghz * 1e9
    estimator = CandidateEstimator(spec.model, timeout_s, spec.jobs)

    @derived_object
    class EstimateRunner(PyRunner):
        def run(self, runner_inputs: Any) -> list[Any]:
            cands: list[Candidate | str] = []
            for ri in runner_inputs:
                try:
                    cands.append(candidate(ri))
                except LprnetEdgeError as e:
                    cands.append(str(e))
            ok = [c for c in cands if isinstance(c, Candidate)]
            costs = iter(estimator.estimate(ok))
            futures = []
            for c in cands:
                cost = next(costs) if isinstance(c, Candidate) else None
                if cost is None or cost.cycles is None:
                    why = c if isinstance(c, str) else cost.error  # type: ignore[union-attr]
                    futures.append(LocalRunnerFuture(
                        error_message=f"EstimateRunner ({spec.cpu}): {why}"))
                else:
                    futures.append(LocalRunnerFuture(res=[cost.cycles / hz]))
            return futures

    return EstimateRunner()
