"""Auto-tuning with MetaSchedule into a reusable, resumable JSON database.

The public face: :func:`tune` with a :class:`TuneConfig` (budget, where to measure) and
optionally :class:`TuneOptions`, returning the database and a :class:`TuningSummary`; the
database helpers a caller needs to find or count records. The rooms: ``config`` (the budget),
``database`` (where records live), ``scheduler`` (how the budget is spread), ``worker`` (the
process that runs MetaSchedule), ``measure`` (its builder and runner), ``launcher`` (the host
side of that process), ``summary`` (what a run reports).
"""

from lprnet_edge.compiler.tuning.api import TuneOptions, list_tasks, tune
from lprnet_edge.compiler.tuning.config import TuneConfig
from lprnet_edge.compiler.tuning.database import (
    count_records,
    has_records,
    open_database,
    resolve_db_dir,
)
from lprnet_edge.compiler.tuning.summary import TaskRow, TuningSummary

__all__ = ["TaskRow", "TuneConfig", "TuneOptions", "TuningSummary", "count_records",
           "has_records", "list_tasks", "open_database", "resolve_db_dir", "tune"]
