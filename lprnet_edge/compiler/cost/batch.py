"""Estimated cycles of many small compiled kernels (tuning candidates), a few processes each.

Under qemu, Python and the TVM runtime take seconds to start and a candidate kernel
milliseconds to run, so the candidates of a batch share processes: each process runs the
guest :mod:`lprnet_edge.runtime.cost_candidates` over a list of candidates, and the plugin
dumps every candidate's region as its own section. The list is split across ``jobs``
processes run side by side. A candidate that crashes its process or hangs gets an error and
the process is started again for the candidates after it, so one bad candidate costs one
restart, not the batch. All blocks are weighed with llvm-mca in one pass at the end (cached
per block, so the runtime's blocks and repeated kernels are weighed once).

A candidate's cost is the blocks of its own library and of what a kernel calls in TVM's
runtime and libm (workspace allocation, the parallel launch, math functions). The guest's
harness is left out: the interpreter, ctypes and libffi, TVM's Cython layer, the loader and
libc (there the harness allocates and issues the marker syscall; TVM's generated code does
not call libc's memset or memcpy on its own). The harness is Python, which a board's
runtime (the VM calling kernels from C++) is not, and its allocations vary with what ran
before: without it, the same candidate gives the same cycles wherever it runs in a batch.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lprnet_edge.errors import LprnetEdgeError

from . import mca
from .counting import DETERMINISTIC_ENV, Counts, parse_report, qemu_command
from .cpus import CpuModel
from .estimate import python_program
from .plugin import Tools, find_tools

GUEST = ("-m", "lprnet_edge.runtime.cost_candidates")
# Seconds a guest process may take to start (Python and the TVM runtime under qemu) before
# its first candidate's own timeout starts counting.
STARTUP_S = 180.0
# Libraries whose blocks a kernel's cost includes, besides its own (prefixes of file names).
KERNEL_LIBS = ("libtvm_runtime", "libtvm_ffi.", "libm.", "libm-")


@dataclass(frozen=True)
class Candidate:
    """One compiled candidate: an aarch64 shared library whose ``main`` takes ``args``
    (``(dtype, shape)`` per argument)."""

    path: str
    args: tuple[tuple[str, tuple[int, ...]], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "args": [[d, list(s)] for d, s in self.args]}


@dataclass(frozen=True)
class CandidateCost:
    """One candidate's estimated cycles and instructions for one call, or why it has none."""

    cycles: float | None
    instructions: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"cycles": self.cycles, "instructions": self.instructions, "error": self.error}


def estimate_candidates(cands: Sequence[Candidate], cpu: CpuModel, timeout_s: float = 60.0,
                     jobs: int | None = None) -> list[CandidateCost]:
    """Estimated cycles of one call of each kernel on ``cpu`` (aarch64), in order.

    ``timeout_s`` bounds one candidate (load, warm-up and counted run under qemu); ``jobs``
    processes run side by side (default: the machine's cores)."""
    if not cands:
        return []
    tools = find_tools(cpu.arch)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(cands)))
    parts = [list(range(len(cands)))[j::jobs] for j in range(jobs)]
    found: dict[int, Counts | str] = {}
    with tempfile.TemporaryDirectory(prefix="lprnet-cands-") as tmp:
        threads = [threading.Thread(target=_run_part_safe, daemon=True,
                                    args=(tools, cpu, cands, ids, Path(tmp) / f"p{j}",
                                          timeout_s, found))
                   for j, ids in enumerate(parts) if ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return _weigh(tools, cpu, [found.get(i, "not measured") for i in range(len(cands))])


def _weigh(tools: Tools, cpu: CpuModel, found: list[Counts | str]) -> list[CandidateCost]:
    blocks = [b.insns for c in found if isinstance(c, Counts) for b in c.blocks]
    w = mca.weigh(tools.mca, cpu.arch, cpu.mca_cpu, blocks).cycles
    out, k = [], 0
    for c in found:
        if isinstance(c, str):
            out.append(CandidateCost(None, 0, c))
            continue
        n = len(c.blocks)
        cyc = sum(b.executions * x for b, x in zip(c.blocks, w[k:k + n], strict=True))
        out.append(CandidateCost(cyc, c.instructions))
        k += n
    return out


def _run_part_safe(tools: Tools, cpu: CpuModel, cands: Sequence[Candidate], ids: list[int],
                   work: Path, timeout_s: float, found: dict[int, Counts | str]) -> None:
    """:func:`_run_part` in a thread: an error of the instrument itself becomes every
    unmeasured candidate's error instead of vanishing with the thread."""
    try:
        _run_part(tools, cpu, cands, ids, work, timeout_s, found)
    except (OSError, ValueError, LprnetEdgeError) as e:
        for i in ids:
            found.setdefault(i, f"the cost instrument failed: {e}")


def _run_part(tools: Tools, cpu: CpuModel, cands: Sequence[Candidate], ids: list[int],
              work: Path, timeout_s: float, found: dict[int, Counts | str]) -> None:
    """Measure ``ids`` in as few processes as crashes and hangs allow."""
    work.mkdir()
    todo = list(ids)
    attempt = 0
    while todo:
        attempt += 1
        listing, dump = work / f"list{attempt}.json", work / f"dump{attempt}.txt"
        listing.write_text(json.dumps([{"id": i, **cands[i].to_dict()} for i in todo]))
        lines, failure = _guest(tools, cpu, listing, dump, timeout_s, len(todo))
        sections = _sections(dump)
        for line in lines:
            i = int(line["id"])
            if line.get("ok") and i in sections:
                found[i] = own_blocks(sections[i], line.get("maps", []), cands[i].path)
            else:
                found[i] = str(line.get("error") or "no count for this candidate")
        done = {int(line["id"]) for line in lines}
        todo = [i for i in todo if i not in done]
        if failure is None or not todo:
            continue
        if not lines:  # the process failed before its first candidate: no point retrying
            for i in todo:
                found[i] = failure
            return
        found[todo.pop(0)] = failure  # the candidate it was running


def _guest(tools: Tools, cpu: CpuModel, listing: Path, dump: Path, timeout_s: float,
           n: int) -> tuple[list[dict[str, Any]], str | None]:
    """Run the guest over ``listing``: its per-candidate lines, and why it stopped early
    (None: it finished)."""
    prog = python_program("candidates", (*GUEST, str(listing)), cpu)
    cmd = qemu_command(tools, cpu, dump.with_suffix(".exit.txt"), list(prog.argv), prog.rootfs)
    plugin_at = next(i for i, a in enumerate(cmd) if a == "-plugin") + 1
    cmd[plugin_at] += f",dump={dump}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QEMU_")}
    proc = subprocess.Popen(cmd, env={**env, **dict(prog.env), **DETERMINISTIC_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out: queue.Queue[str | None] = queue.Queue()
    err: list[str] = []
    threading.Thread(target=_pump, args=(proc.stdout, out), daemon=True).start()
    threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True).start()
    lines: list[dict[str, Any]] = []
    deadline = time.monotonic() + STARTUP_S + timeout_s
    while len(lines) < n:
        try:
            text = out.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            _kill(proc)
            return lines, f"timeout: no result after {timeout_s:.0f} s under qemu"
        if text is None:  # the process ended
            break
        if text.startswith("{"):
            lines.append(json.loads(text))
            deadline = time.monotonic() + timeout_s
    code = proc.wait()
    if len(lines) < n:
        time.sleep(0.1)  # let the stderr reader finish
        tail = "".join(err).strip()[-600:]
        return lines, f"the candidate crashed its process (exit {code}): {tail}"
    return lines, None


def _pump(stream: Any, out: queue.Queue[str | None]) -> None:
    for line in stream:
        out.put(line.strip())
    out.put(None)


def _kill(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def own_blocks(counts: Counts, maps: list[dict[str, Any]], lib: str) -> Counts:
    """``counts`` reduced to the blocks of the candidate's library ``lib``, TVM's runtime and
    libm, by the guest's executable mappings."""
    want = os.path.realpath(lib)
    ranges = [(m["start"], m["end"]) for m in maps
              if os.path.realpath(m["path"]) == want
              or os.path.basename(m["path"]).startswith(KERNEL_LIBS)]
    kept = tuple(b for b in counts.blocks if any(lo <= b.vaddr < hi for lo, hi in ranges))
    return Counts(instructions=sum(b.executions * len(b.insns) for b in kept),
                  executions=sum(b.executions for b in kept), regions=counts.regions,
                  blocks=kept)


def _sections(dump: Path) -> dict[int, Counts]:
    """The plugin's dump file: one :class:`Counts` per region id."""
    if not dump.is_file():
        return {}
    out: dict[int, Counts] = {}
    for text in dump.read_text().split("\nend\n"):
        if not text.strip():
            continue
        head = dict(ln.split() for ln in text.splitlines()[:4] if not ln.startswith(("B ", "I ")))
        counts = parse_report(text)
        if counts.regions != 1:
            raise LprnetEdgeError(f"a candidate's section counted {counts.regions} regions")
        out[int(head["region"])] = counts
    return out
