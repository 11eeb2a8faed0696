"""The one config of a tuning run: MetaSchedule's budget and where candidates are measured."""

from __future__ import annotations

from dataclasses import dataclass

from lprnet_edge.compress.configs import DictConfig
from lprnet_edge.runtime.errors import LprnetEdgeError


@dataclass(frozen=True)
class TuneConfig(DictConfig):
    """MetaSchedule budget and where to measure (local, direct RPC or an RPC tracker)."""

    trials: int = 600  # a first round for every task, then the convs (time-capped)
    trials_per_task: int | None = None
    num_trials_per_iter: int = 16
    rpc: str | None = None  # "HOST:PORT" of a TVM RPC server
    rpc_tracker: str | None = None  # "HOST:PORT" of a TVM RPC tracker
    rpc_key: str | None = None
    timeout_s: float = 60.0
    seed: int = 0
    db_dir: str | None = None  # default: the cache, keyed by target and workload
    # Only tune the tasks whose name contains one of these (empty: every task). The report
    # tunes the convolutions only: they take nearly all of LPRNet's time.
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise LprnetEdgeError("trials must be >= 1")
        if self.rpc_tracker and not self.rpc_key:
            raise LprnetEdgeError("--rpc-tracker needs --rpc-key (the device key to request)")
