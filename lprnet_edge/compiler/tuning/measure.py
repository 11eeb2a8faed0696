"""How the worker builds and measures candidates: MetaSchedule's builder and runner (local,
an RPC server directly, an RPC tracker, or the cost instrument's estimated cycles for an ARM
board not given: :mod:`.estimate_runner`) and one cost model shared by every round.

MetaSchedule's ``RPCRunner`` only knows trackers; for a server reached directly it is given a
session function that connects to the server itself. Candidates measured on a device or
estimated under qemu are linked here by the target's compiler, so they load a ready ``.so``.

Runs in the worker process. Its TVM imports stay inside the functions: the worker reports
"loading TVM" before it pays the seconds that takes, and the builder's pool processes, which
unpickle :func:`export_shared`, import this module before they need MetaSchedule.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lprnet_edge.compiler.compile import export_library
from lprnet_edge.compiler.rpc import direct_session, parse_hostport
from lprnet_edge.compiler.tuning.config import TuneConfig
from lprnet_edge.compiler.tuning.estimate_runner import EstimateSpec, make_runner


@dataclass(frozen=True)
class MeasureTools:
    """What ``ms.tune_tasks`` measures with."""

    builder: Any
    runner: Any
    cost_model: Any


def export_shared(cc_path: str, options: Sequence[str], mod: Any) -> str:
    """MetaSchedule builder export: a shared library linked here by ``cc_path`` (runs in the
    builder's worker processes, hence a module-level function)."""
    path = os.path.join(tempfile.mkdtemp(prefix="lprnet-cand-"), "tvm_tmp_mod.so")
    export_library(mod, path, cc_path, options)
    return path


class _PooledBuild:
    """``LocalBuilder.build`` with a worker pool kept for ``REUSE_BATCHES`` batches.

    MetaSchedule's LocalBuilder starts a new process pool for every batch (against a memory
    leak of long-lived workers), and each new worker imports TVM and its tensor intrinsics,
    which on a busy machine takes as long as the builds themselves. Recycling the pool every
    few batches keeps the leak bounded and pays the start-up less often.
    """

    REUSE_BATCHES = 8

    def __init__(self, builder: Any, f_export: Any) -> None:
        self.builder = builder
        # The Python callable itself: read back from the builder object it is an ffi.Function,
        # which the worker pool cannot serialize.
        self.f_export = f_export
        self.pool: Any = None
        self.uses = 0

    def __call__(self, build_inputs: Any) -> list[Any]:
        from tvm.s_tir.meta_schedule.builder import BuilderResult
        from tvm.s_tir.meta_schedule.builder import local_builder as lb
        from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

        b = self.builder
        if not build_inputs:
            return []
        if self.pool is None or self.uses >= self.REUSE_BATCHES:
            if self.pool is not None:
                self.pool.shutdown()
            self.pool = PopenPoolExecutor(max_workers=b.max_workers, timeout=b.timeout_sec,
                                          initializer=b.initializer)
            self.uses = 0
        self.uses += 1
        args = [(None, self.f_export, bi.mod, bi.target, lb._serialize_params(bi.params))
                for bi in build_inputs]
        results = []
        for res in self.pool.map_with_error_catching(lambda x: lb._worker_func(*x), args):
            if res.status == StatusKind.COMPLETE:
                results.append(BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(
                    None, f"LocalBuilder: Timeout, killed after {b.timeout_sec} seconds"))
                self.uses = self.REUSE_BATCHES  # a killed worker: start a fresh pool
            else:
                results.append(BuilderResult(
                    None, "LocalBuilder: An exception occurred\n" + str(res.value)))
        return results


def measure_tools(ms: Any, cfg: TuneConfig, export_cc: dict[str, Any] | None,
                  emit: Callable[..., None],
                  estimate: dict[str, Any] | None = None) -> MeasureTools:
    """Builder, runner (local, RPC server or tracker, or ``estimate``'s cost instrument for
    an ARM board not given) and one cost model shared by all rounds, wrapped so that builds
    and measurements show up in the progress as they start."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import PyBuilder
    from tvm.s_tir.meta_schedule.runner import PyRunner

    nthreads = os.cpu_count() or 1
    timeout = max(1, int(cfg.timeout_s))
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100,
                                          enable_cpu_cache_flush=False)
    export = export_cc
    f_export = (functools.partial(export_shared, export["path"], tuple(export["options"]))
                if export else None)
    builder = ms.builder.LocalBuilder(max_workers=nthreads, timeout_sec=timeout,
                                      f_export=f_export)
    if estimate is not None:
        runner = make_runner(EstimateSpec.from_dict(estimate), cfg.timeout_s)
    elif cfg.rpc or cfg.rpc_tracker:
        if cfg.rpc:
            host, port = parse_hostport(cfg.rpc, "--rpc")
            rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                             tracker_key="direct", session_timeout_sec=timeout)
            runner = ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator,
                                         f_create_session=direct_session)
        else:
            host, port = parse_hostport(cfg.rpc_tracker, "--rpc-tracker")  # type: ignore[arg-type]
            rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                             tracker_key=cfg.rpc_key,
                                             session_timeout_sec=timeout)
            runner = ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator)
    else:
        runner = ms.runner.LocalRunner(timeout_sec=timeout, evaluator_config=evaluator)

    pooled = _PooledBuild(builder, f_export)

    @derived_object
    class ShowBuilds(PyBuilder):
        def build(self, build_inputs: Any) -> Any:
            if build_inputs:
                emit(event="stage", what=f"building {len(build_inputs)} candidates")
            return pooled(build_inputs)

    @derived_object
    class ShowRuns(PyRunner):
        def run(self, runner_inputs: Any) -> Any:
            if runner_inputs:
                emit(event="stage", what=f"measuring {len(runner_inputs)} candidates")
            return runner.run(runner_inputs)

    return MeasureTools(builder=ShowBuilds(), runner=ShowRuns(),
                        cost_model=ms.cost_model.XGBModel(num_tuning_cores=nthreads,
                                                          tree_method="auto"))
