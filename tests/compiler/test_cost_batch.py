"""Many candidates per qemu process: per-candidate regions, determinism, a crash.

Real parts: kernels compiled by TVM for the Cortex-A72 and linked by the aarch64 cross
compiler, run by the guest program under qemu-aarch64 with the counting plugin, weighed
with llvm-mca.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lprnet_edge.compiler.cost.batch import Candidate, estimate_candidates
from lprnet_edge.compiler.cost.cpus import CPUS
from lprnet_edge.compiler.cost.plugin import find_tools
from lprnet_edge.compiler.cost.rootfs import aarch64_rootfs
from lprnet_edge.errors import ToolchainError

pytestmark = pytest.mark.slow
A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
       "mattr": ["+neon"], "num-cores": 4}
N = 64
MATMUL = (("float32", (N, N)),) * 3


def needs_instrument() -> None:
    try:
        find_tools("aarch64")
        aarch64_rootfs()
    except ToolchainError as e:
        pytest.skip(str(e))
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (scripts/setup-host.sh)")


def export(func, path: Path) -> str:
    """``func`` (a PrimFunc named main) built for the A72 and cross-linked into ``path``."""
    import tvm

    from lprnet_edge.compiler.compile import export_library

    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(A72))
    export_library(lib, path, "aarch64-linux-gnu-g++")
    return str(path)


def matmul(tiled: bool):
    """C = A x B, naive (one accumulator chain per output) or tiled and vectorised."""
    import tvm
    from tvm import te

    a = te.placeholder((N, N), name="A")
    b = te.placeholder((N, N), name="B")
    k = te.reduce_axis((0, N), name="k")
    c = te.compute((N, N), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")
    if not tiled:
        return func
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("C")
    i, j, kk = sch.get_loops(blk)
    io, ii = sch.split(i, [None, 4])
    jo, ji = sch.split(j, [None, 16])
    sch.reorder(io, jo, kk, ii, ji)
    sch.vectorize(ji)
    sch.decompose_reduction(blk, kk)
    return sch.mod["main"]


def crasher():
    """Reads gigabytes past its buffer: the process gets SIGSEGV."""
    from tvm import te

    a = te.placeholder((16,), name="A")
    b = te.compute((16,), lambda i: a[(i + 1) * 67108864], name="B")
    return te.create_prim_func([a, b]).with_attr("global_symbol", "main")


def test_batch_regions_are_per_candidate(tmp_path: Path):
    needs_instrument()
    naive = Candidate(export(matmul(False), tmp_path / "naive.so"), MATMUL)
    tiled = Candidate(export(matmul(True), tmp_path / "tiled.so"), MATMUL)
    crash = Candidate(export(crasher(), tmp_path / "crash.so"),
                      (("float32", (16,)), ("float32", (16,))))
    cpu = CPUS["cortex-a72"]
    # One process: naive, crash (kills it), then a new process for the rest.
    first = estimate_candidates([naive, crash, tiled, naive], cpu, jobs=1)
    assert first[1].cycles is None and "crashed" in (first[1].error or "")
    assert all(r.error is None for r in (first[0], first[2], first[3]))
    # The same candidate in another process and position: the same cycles.
    assert first[0].cycles == first[3].cycles
    (again,) = estimate_candidates([naive], cpu, jobs=1)
    assert again.cycles == first[0].cycles and again.instructions == first[0].instructions
    # The schedule MetaSchedule should prefer is the cheaper one.
    assert first[2].cycles < 0.5 * first[0].cycles
