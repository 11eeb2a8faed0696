"""The cost instrument on real parts: the qemu plugin, qemu-user, llvm-mca.

A loop with a known instruction count, written in assembly between the two marker syscalls,
checks the counting (exactly: nothing outside the marks, nothing missed); the same loop twice
checks the estimate is deterministic; the slow test estimates a cross-built artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from emulated_device import build_or_skip

from lprnet_edge.compiler.cost import mca, plugin
from lprnet_edge.compiler.cost.counting import run_counted
from lprnet_edge.compiler.cost.cpus import CPUS, cpu_model, llvm_x86_cpu
from lprnet_edge.compiler.cost.estimate import Program, weigh_counts
from lprnet_edge.compiler.cost.plugin import find_tools
from lprnet_edge.errors import ToolchainError
from lprnet_edge.runtime.cost_marker import MAGIC

N = 100_000
REPO = Path(__file__).resolve().parents[2]
MARK_A64 = ("mov x8, #173\n movz x0, #0x{lo:x}\n movk x0, #0x{hi:x}, lsl #16\n"
            " mov x1, #{code}\n svc #0\n")
MARK_X86 = "mov $110, %%eax\n mov ${magic}, %%edi\n mov ${code}, %%esi\n syscall\n"
# Counted: after the start mark's syscall, the loop counter (1), the loop (2 per iteration),
# the stop mark's block up to its syscall (a64: 5, x86: 4).
LOOP = {
    "aarch64": ("mov x9, %x[n]\n 1: subs x9, x9, #1\n b.ne 1b\n", 2 * N + 6,
                '"x0", "x1", "x8", "x9"'),
    "x86_64": ("mov %[n], %%rcx\n 1: dec %%rcx\n jnz 1b\n", 2 * N + 5,
               '"rax", "rcx", "rdi", "rsi", "r11"'),
}
CC = {"aarch64": "aarch64-linux-gnu-gcc", "x86_64": "gcc"}


def loop_program(arch: str, out: Path) -> tuple[Path, int]:
    """A static binary that runs the known loop between the marks and prints the runner's
    JSON; returns it and the instructions it executes between the marks."""
    body, expected, clobbers = LOOP[arch]
    if arch == "aarch64":
        marks = [MARK_A64.format(lo=MAGIC & 0xFFFF, hi=MAGIC >> 16, code=c) for c in (1, 2)]
    else:
        marks = [MARK_X86.format(magic=MAGIC, code=c) for c in (1, 2)]
    asm = (marks[0] + body + marks[1]).replace("\n", "\\n")
    src = out.with_suffix(".c")
    report = r'printf("{\"ok\": true, \"result\": {\"runs\": 1}}\n");'
    src.write_text(f"#include <stdio.h>\nint main(void) {{ long n = {N};\n"
                   f'  __asm__ volatile("{asm}" : : [n] "r"(n) : {clobbers}, "cc", "memory");\n'
                   f"  {report} return 0; }}\n")
    cc = shutil.which(CC[arch])
    if cc is None:
        pytest.skip(f"{CC[arch]} is not installed (scripts/setup-host.sh)")
    subprocess.run([cc, "-O1", "-static", str(src), "-o", str(out)], check=True)
    return out, expected


def tools_or_skip(arch: str):
    try:
        return find_tools(arch)
    except ToolchainError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_counts_exactly_the_marked_region(arch: str, tmp_path: Path):
    tools = tools_or_skip(arch)
    cpu = CPUS["cortex-a72"] if arch == "aarch64" else cpu_model("host")
    prog, expected = loop_program(arch, tmp_path / "loop")
    counts = run_counted(tools, cpu, [str(prog)], dict(os.environ))
    assert counts.regions == 1
    assert counts.instructions == expected
    loop = max(counts.blocks, key=lambda b: b.executions)
    assert loop.executions >= N - 1 and len(loop.insns) == 2


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_estimate_is_deterministic_and_loop_bound(arch: str, tmp_path: Path):
    tools = tools_or_skip(arch)
    cpu = CPUS["cortex-a72"] if arch == "aarch64" else cpu_model("host")
    prog, _ = loop_program(arch, tmp_path / "loop")
    program = Program("loop", (str(prog),), arch, runs=1)
    runs = [weigh_counts(program, cpu, run_counted(tools, cpu, [str(prog)], dict(os.environ)),
                         tools.mca, kernels=False, cache_file=tmp_path / f"mca{i}.json")
            for i in range(2)]  # a cache each: llvm-mca really weighs both
    assert runs[0].cycles == runs[1].cycles and runs[0].instructions == runs[1].instructions
    # A decrement-and-branch loop is bound by its 1-cycle dependency chain: about N cycles.
    assert N * 0.9 <= runs[0].cycles <= N * 2.5
    assert runs[0].substituted == 0


def test_rewrite_for_llvm_mca(tmp_path: Path):
    """qemu's branch targets become a label llvm-mca resolves; the rest passes unchanged."""
    assert mca.rewrite("aarch64", "b.ne #0x400700") == "b.ne .Lt"
    assert mca.rewrite("aarch64", "tbz w0, #3, #0x4006f0") == "tbz w0, #3, .Lt"
    assert mca.rewrite("aarch64", "add x0, x1, #0x10") == "add x0, x1, #0x10"
    assert mca.rewrite("x86_64", "jne 0x4000001078") == "jne .Lt"
    assert mca.rewrite("x86_64", "callq 0x4000001030") == "callq .Lt"
    assert mca.rewrite("x86_64", "jmpq *0x2fca(%rip)") == "jmpq *0x2fca(%rip)"
    tools = tools_or_skip("aarch64")
    blocks = [["fmla v0.4s, v1.4s, v2.4s"], ["fmla v0.4s, v1.4s, v2.4s",
                                             "fmla v3.4s, v1.4s, v2.4s"]]
    w = mca.weigh(tools.mca, "aarch64", "cortex-a72", blocks, tmp_path / "mca.json")
    assert w.substituted == 0 and w.weighed == 2
    # Two independent FMAs per iteration cost no more than twice one dependent chain.
    assert 0 < w.cycles[1] <= 2 * w.cycles[0]
    again = mca.weigh(tools.mca, "aarch64", "cortex-a72", blocks, tmp_path / "mca.json")
    assert again.weighed == 0 and again.cycles == w.cycles  # from the cache


def test_rep_string_blocks_are_weighed_per_element(tmp_path: Path):
    """qemu runs ``rep stosb`` one element per block execution: weigh one element, not the
    whole instruction (which llvm-mca charges about 100 cycles)."""
    tools = tools_or_skip("x86_64")
    blocks = [["rep stosb %al, (%rdi)"], ["rep movsq (%rsi), (%rdi)"], ["addq $1, %rax"]]
    w = mca.weigh(tools.mca, "x86_64", "znver3", blocks, tmp_path / "mca.json")
    assert w.cycles[0] == 1 / mca.STRING_BYTES_PER_CYCLE
    assert w.cycles[1] == 8 / mca.STRING_BYTES_PER_CYCLE
    assert w.weighed == 1 and 0 < w.cycles[2] < 2  # only the ordinary block went to llvm-mca
    assert mca.rep_element_cycles("aarch64", ["rep stosb %al, (%rdi)"]) is None


def test_loaded_segments_name_the_code_of_a_library():
    """The guest's map of executable segments (from the loader) holds a libc function's
    address, with its ELF virtual address recoverable for ``nm``."""
    import ctypes

    from lprnet_edge.runtime.cost_runner import executable_maps

    addr = ctypes.cast(ctypes.CDLL(None).getppid, ctypes.c_void_p).value
    hits = [m for m in executable_maps() if m["start"] <= addr < m["end"]]
    assert len(hits) == 1 and Path(hits[0]["path"]).name.startswith("libc")
    m = hits[0]
    nm = subprocess.run(["nm", "-D", "--defined-only", m["path"]], capture_output=True,
                        text=True, check=True).stdout
    getppid = {int(line.split()[0], 16) for line in nm.splitlines()
               if line.split()[-1].split("@")[0] == "getppid"}
    assert addr - m["start"] + m["offset"] in getppid


def test_plugin_builds_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Estimates started together may all rebuild the plugin at once: each build writes a
    file of its own and the last one in place wins, none fails and none is left behind."""
    header = plugin.header_path()
    if not header.is_file():
        pytest.skip(f"qemu's plugin header is not fetched ({plugin.SETUP_HINT})")
    monkeypatch.setenv("LPRNET_EDGE_CACHE", str(tmp_path))
    plugin.header_path().parent.mkdir(parents=True)
    shutil.copy(header, plugin.header_path())
    with ThreadPoolExecutor(max_workers=3) as pool:
        built = list(pool.map(lambda _: plugin.build_plugin(force=True), range(3)))
    assert built == [plugin.plugin_path()] * 3
    assert plugin.plugin_path().read_bytes()[:4] == b"\x7fELF"
    assert sorted(p.name for p in plugin.plugin_dir().iterdir()) == ["bbcount.so", "include"]


def test_x86_family_maps_to_an_llvm_model():
    zen5 = "vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nflags\t: avx2 avx512f\n"
    assert llvm_x86_cpu(zen5) == "znver3"
    intel = "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\nflags\t: avx2 avx512f\n"
    assert llvm_x86_cpu(intel) == "skylake-avx512"


@pytest.mark.slow
def test_bench_estimate_of_a_cross_built_artifact(tmp_path: Path):
    """``bench --estimate`` on an rpi4 artifact: per plate figures, kernels from model.so."""
    art = os.environ.get("LPRNET_EDGE_RPI4_ARTIFACT")
    if not art:
        art = str(tmp_path / "lprnet-rpi4")
        subprocess.run([sys.executable, "-m", "lprnet_edge.cli.main", "build", "--target",
                        "rpi4", "-o", art], check=True, cwd=REPO, capture_output=True)
    tools_or_skip("aarch64")
    build_or_skip()  # the estimate runs the artifact in the emulated Pi's rootfs
    r = subprocess.run([sys.executable, "-m", "lprnet_edge.cli.main", "bench", "--artifact", art,
                        "--estimate", "--json"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    est = json.loads(r.stdout)
    assert est["cpu"]["name"] == "cortex-a72" and est["runs"] == 1
    assert est["estimated_cycles"] > 0 and est["instructions"] > est["estimated_cycles"] * 0.3
    assert set(est["estimated_ms"]) == {"1.5GHz", "1.8GHz"}
    top = est["kernels"][0]
    assert top["name"].startswith("fused_conv2d") and top["share"] > 0.1
    assert "caches" in est["caveats"]
