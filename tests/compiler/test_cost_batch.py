"""Many candidates per qemu process: per-candidate regions, determinism, a crash, a hang.

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


def endless():
    """Four billion dependent additions: far longer than the test's timeout under qemu."""
    from tvm import te

    a = te.placeholder((16,), name="A")
    k1 = te.reduce_axis((0, 65536), name="k1")
    k2 = te.reduce_axis((0, 65536), name="k2")
    b = te.compute((1,), lambda i: te.sum(a[(k1 + k2) % 16], axis=[k1, k2]), name="B")
    return te.create_prim_func([a, b]).with_attr("global_symbol", "main")


def test_batch_regions_are_per_candidate(tmp_path: Path):
    needs_instrument()
    naive = Candidate(export(matmul(False), tmp_path / "naive.so"), MATMUL)
    tiled = Candidate(export(matmul(True), tmp_path / "tiled.so"), MATMUL)
    crash = Candidate(export(crasher(), tmp_path / "crash.so"),
                      (("float32", (16,)), ("float32", (16,))))
    hang = Candidate(export(endless(), tmp_path / "hang.so"), (("float32", (16,)),
                                                              ("float32", (1,))))
    # One guest: naive, then crash kills it; a second: tiled, then hang is killed after the
    # timeout; a third: naive again.
    res = estimate_candidates([naive, crash, tiled, hang, naive], CPUS["cortex-a72"],
                              timeout_s=15, jobs=1)
    assert res[1].cycles is None and "crashed" in (res[1].error or "")
    assert res[3].cycles is None and "timeout" in (res[3].error or "")
    assert all(r.error is None for r in (res[0], res[2], res[4]))
    # The same candidate in another process and position: the same cycles.
    assert res[0].cycles == res[4].cycles and res[0].instructions == res[4].instructions
    # The schedule MetaSchedule should prefer is the cheaper one.
    assert res[2].cycles < 0.5 * res[0].cycles
