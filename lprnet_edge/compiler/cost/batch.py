"""Estimated cycles of many small compiled kernels (tuning candidates), in long-lived guests.

Under qemu, Python and the TVM runtime take many seconds to start and a candidate kernel
milliseconds to run, so candidates share processes: :class:`CandidateEstimator` keeps
``jobs`` guest processes (:mod:`lprnet_edge.runtime.cost_candidates`, fed one candidate per
line on stdin) alive across batches, one per core, and the plugin dumps every candidate's
region as its own section. A candidate that crashes its process or hangs gets an error and a
new process serves the next one, so a bad candidate costs one start-up, not the tuning.
Processes are replaced after :data:`RECYCLE` candidates (every module stays loaded in its
guest). A batch's blocks are weighed with llvm-mca in one pass (cached per block, so the
runtime's blocks and repeated kernels are weighed once).

A candidate's cost is the blocks of its own library and of what a kernel calls in TVM's
runtime and libm (workspace allocation, the parallel launch, math functions). The guest's
harness is left out: the interpreter, ctypes and libffi, TVM's Cython layer, the loader and
libc (there the harness allocates and issues the marker syscall; TVM's generated code does
not call libc's memset or memcpy on its own). The harness is Python, which a board's
runtime (the VM calling kernels from C++) is not, and its allocations vary with what ran
before: without it, the same candidate gives the same cycles wherever it runs in a batch.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import queue
import shutil
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
RECYCLE = 200  # candidates per guest process before a fresh one
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
    """Estimated cycles of one call of each candidate on ``cpu`` (aarch64), in order, with
    processes of their own (a tuner keeps a :class:`CandidateEstimator` instead)."""
    with CandidateEstimator(cpu, timeout_s, jobs) as est:
        return est.estimate(cands)


class CandidateEstimator:
    """``jobs`` guest processes (default: the machine's cores) that estimate candidates for
    ``cpu``; ``timeout_s`` bounds one candidate (load, warm-up and counted run under qemu)."""

    def __init__(self, cpu: CpuModel, timeout_s: float = 60.0, jobs: int | None = None) -> None:
        self.cpu, self.timeout_s = cpu, timeout_s
        self.tools = find_tools(cpu.arch)
        self.jobs = max(1, jobs or os.cpu_count() or 1)
        self.work = Path(tempfile.mkdtemp(prefix="lprnet-cands-"))
        self.guests: list[Guest | None] = [None] * self.jobs
        self.started = 0
        self.ids = itertools.count(1)  # section ids, unique per guest file
        self.broken: str | None = None  # why a guest could not even start
        atexit.register(self.close)

    def __enter__(self) -> CandidateEstimator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def estimate(self, cands: Sequence[Candidate]) -> list[CandidateCost]:
        """Estimated cycles of one call of each candidate, in order. The guests take the
        next candidate as they finish one, so a slow candidate does not hold the others."""
        found: dict[int, Counts | str] = {}
        todo: queue.Queue[int] = queue.Queue()
        for i in range(len(cands)):
            todo.put(i)
        threads = [threading.Thread(target=self._serve, args=(j, todo, cands, found),
                                    daemon=True)
                   for j in range(min(self.jobs, len(cands)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lost = self.broken or "not measured"
        return _weigh(self.tools, self.cpu, [found.get(i, lost) for i in range(len(cands))])

    def _serve(self, j: int, todo: queue.Queue[int], cands: Sequence[Candidate],
               found: dict[int, Counts | str]) -> None:
        """Candidates from ``todo`` on guest ``j``; a dead guest is replaced, one that dies
        before it is ready stops this thread (the instrument itself is broken)."""
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                g = self.guests[j]
                if g is None or not g.alive() or g.served >= RECYCLE:
                    if g is not None:
                        g.close()
                    g = self.guests[j] = self._start()
                found[i] = g.measure(next(self.ids), cands[i], self.timeout_s)
            except (OSError, ValueError, LprnetEdgeError) as e:
                found[i] = f"the cost instrument failed: {e}"
                if (g := self.guests[j]) is not None:
                    g.close(kill=True)
                g = None
            if g is None or not g.alive():
                self.guests[j] = None
                if g is None or not g.ready:
                    self.broken = str(found[i])
                    return

    def _start(self) -> Guest:
        self.started += 1
        return Guest(self.tools, self.cpu, self.work, self.started)

    def close(self) -> None:
        """Stop the guests and remove their files."""
        for g in self.guests:
            if g is not None:
                g.close()
        self.guests = [None] * self.jobs
        shutil.rmtree(self.work, ignore_errors=True)


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


class Guest:
    """One guest process under qemu with the plugin, measuring one candidate per request."""

    def __init__(self, tools: Tools, cpu: CpuModel, work: Path, n: int) -> None:
        self.dump, self.err = work / f"dump{n}.txt", work / f"err{n}.txt"
        self.offset = 0
        self.served = 0
        self.ready = False  # the guest has started (Python and the TVM runtime loaded)
        prog = python_program("candidates", GUEST, cpu)
        cmd = qemu_command(tools, cpu, work / f"exit{n}.txt", list(prog.argv), prog.rootfs)
        plugin_at = cmd.index("-plugin") + 1
        cmd[plugin_at] += f",dump={self.dump}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("QEMU_")}
        with open(self.err, "w") as err:
            # setarch execs qemu: the pid is qemu's, a single process to kill.
            self.proc = subprocess.Popen(
                cmd, env={**env, **dict(prog.env), **DETERMINISTIC_ENV}, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, text=True)
        self.out: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, self.out), daemon=True).start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def measure(self, sid: int, cand: Candidate, timeout_s: float) -> Counts | str:
        """The candidate's counted blocks, or why there are none."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"id": sid, **cand.to_dict()}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._died()
        deadline = time.monotonic() + timeout_s + (STARTUP_S if self.served == 0 else 0)
        while True:
            try:
                text = self.out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close(kill=True)
                return f"timeout: no result after {timeout_s:.0f} s under qemu"
            if text is None:
                return self._died()
            if text.startswith("{"):
                line = json.loads(text)
                if not line.get("ready"):
                    break
                self.ready = True
        self.served += 1
        if not line.get("ok"):
            return str(line.get("error") or "the guest reported no result")
        sections = self._sections()
        if sid not in sections:
            return "the plugin wrote no section for this candidate"
        return own_blocks(sections[sid], line.get("maps", []), cand.path)

    def _sections(self) -> dict[int, Counts]:
        with open(self.dump) as f:
            f.seek(self.offset)
            text = f.read()
        end = text.rfind("\nend\n")
        if end < 0:
            return {}
        self.offset += end + len("\nend\n")
        return parse_sections(text[:end + len("\nend\n")])

    def _died(self) -> str:
        code = self.proc.wait()
        tail = self.err.read_text(errors="replace").strip()[-600:] if self.err.is_file() else ""
        return f"the candidate crashed its process (exit {code}): {tail}"

    def close(self, kill: bool = False) -> None:
        """End the process: EOF on its stdin (it exits after the candidate in hand), or kill."""
        if self.proc.poll() is None and not kill:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                kill = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _pump(stream: Any, out: queue.Queue[str | None]) -> None:
    for line in stream:
        out.put(line.strip())
    out.put(None)


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


def parse_sections(dump: str) -> dict[int, Counts]:
    """The plugin's dump sections: one :class:`Counts` per region id."""
    out: dict[int, Counts] = {}
    for text in dump.split("\nend\n"):
        if not text.strip():
            continue
        head = dict(ln.split() for ln in text.splitlines()[:4] if not ln.startswith(("B ", "I ")))
        counts = parse_report(text)
        if counts.regions != 1:
            raise LprnetEdgeError(f"a candidate's section counted {counts.regions} regions")
        out[int(head["region"])] = counts
    return out
