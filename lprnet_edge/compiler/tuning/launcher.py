"""The host side of a tuning run: start the worker process, relay its progress, stop it.

The worker runs in its own process group, so a timeout, Ctrl-C or a crash also ends the
builder and runner processes MetaSchedule started. Whatever happens, the records measured so
far stay in the database and the same command resumes from them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from lprnet_edge.compiler.tuning.database import count_records, mkdir
from lprnet_edge.compiler.tuning.summary import PROGRESS, format_progress
from lprnet_edge.compiler.worker_env import worker_env
from lprnet_edge.runtime.errors import LprnetEdgeError

WORKER_MODULE = "lprnet_edge.compiler.tuning.worker"


def run_worker(spec_path: Path, summary_path: Path, db_dir: Path,
               log: Callable[[str], None], timeout_s: float | None) -> dict[str, Any]:
    """Run the worker on ``spec_path`` and return the summary it wrote (JSON)."""
    log_path = mkdir(db_dir / "logs") / (
        f"worker-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    before = count_records(db_dir)
    timed_out = threading.Event()
    with open(log_path, "w", encoding="utf-8") as wlog:
        proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, str(spec_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=worker_env(), text=True, bufsize=1,
            encoding="utf-8", errors="replace")
        try:
            if timeout_s:
                threading.Thread(target=_watchdog, args=(proc, time.monotonic() + timeout_s,
                                                         timed_out), daemon=True).start()
            _relay(proc, wlog, log)
            proc.wait()
        except BaseException:
            _kill_group(proc)
            kept = count_records(db_dir)
            log(f"tuning interrupted: {kept} records kept in {db_dir} "
                f"({kept - before} new); run the same command again to resume")
            raise
        finally:
            _kill_group(proc)  # builder/runner processes left behind by a crash
    if proc.returncode != 0 or not summary_path.is_file():
        kept = count_records(db_dir)
        how = _how_it_ended(proc.returncode, timeout_s if timed_out.is_set() else None)
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-6:])
        raise LprnetEdgeError(
            f"the MetaSchedule tuning worker {how}; {kept} records are kept in {db_dir} "
            f"({kept - before} from this run) and the same command resumes from them. "
            f"Worker log {log_path}: {tail}")
    return json.loads(summary_path.read_text())


def _relay(proc: subprocess.Popen, wlog: TextIO, log: Callable[[str], None]) -> None:
    """Progress lines go to ``log``; everything else to the worker's log file."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(PROGRESS):
            with contextlib.suppress(ValueError):
                log(format_progress(json.loads(line[len(PROGRESS):])))
                continue
        wlog.write(line)
        wlog.flush()


def _watchdog(proc: subprocess.Popen, deadline: float, timed_out: threading.Event) -> None:
    while proc.poll() is None:
        if time.monotonic() > deadline:
            timed_out.set()
            _kill_group(proc)
            return
        time.sleep(0.5)


def _how_it_ended(rc: int | None, timed_out_after: float | None) -> str:
    if timed_out_after is not None:
        return f"was stopped after the {timed_out_after:g}s time limit"
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"crashed ({name})"
    return f"failed (exit code {rc})"


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Stragglers of the group (builder/runner pool workers) after the leader is gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
