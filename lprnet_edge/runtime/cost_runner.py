"""The guest side of the cost instrument: run a model N times inside the measured region.

Run under qemu with the counting plugin (``lprnet_edge.compiler.cost``), on the host or on a
board's rootfs::

    python -m lprnet_edge.runtime.cost_runner --artifact DIR [--runs N] [--warmup N]
    python -m lprnet_edge.runtime.cost_runner --onnx FILE [--runs N] [--warmup N]

The input is fixed (seeded), the runtime runs one thread, and warm-up runs happen outside the
region, so two runs execute the same instructions. It prints one JSON document: the runs
counted and the executable segments of the loaded libraries (from the dynamic loader, in
guest addresses), which the host uses to map counted blocks to ``model.so``
symbols. numpy and the TVM runtime (or ONNX Runtime) only: this module ships to the board.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from lprnet_edge.runtime.cost_marker import measured_region

SEED = 0


def fixed_input(shape: tuple[int, ...]) -> np.ndarray:
    """The same plate-sized input on every run and machine (values in [0, 1))."""
    return np.random.default_rng(SEED).random(shape, dtype=np.float32)


def _tvm_model(artifact: str) -> tuple[Callable[[], Any], str]:
    from lprnet_edge.runtime.artifact import Artifact
    from lprnet_edge.runtime.backends import TvmBackend

    art = Artifact.open(artifact)
    backend = TvmBackend(art, num_threads=1)
    x = fixed_input(art.manifest.input.shape)
    return (lambda: backend(x)), str(art.lib_path.resolve())


def _onnx_model(path: str) -> tuple[Callable[[], Any], str]:
    # onnxruntime is imported here only: the TVM path must not need it on a board.
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = tuple(d if isinstance(d, int) else 1 for d in inp.shape)
    x = fixed_input(shape)
    return (lambda: sess.run(None, {inp.name: x})), ""


class _Phdr(ctypes.Structure):  # Elf64_Phdr
    _fields_ = [("p_type", ctypes.c_uint32), ("p_flags", ctypes.c_uint32),
                ("p_offset", ctypes.c_uint64), ("p_vaddr", ctypes.c_uint64),
                ("p_paddr", ctypes.c_uint64), ("p_filesz", ctypes.c_uint64),
                ("p_memsz", ctypes.c_uint64), ("p_align", ctypes.c_uint64)]


class _PhdrInfo(ctypes.Structure):  # struct dl_phdr_info (the fields every libc has)
    _fields_ = [("dlpi_addr", ctypes.c_uint64), ("dlpi_name", ctypes.c_char_p),
                ("dlpi_phdr", ctypes.POINTER(_Phdr)), ("dlpi_phnum", ctypes.c_uint16)]


_PT_LOAD, _PF_X = 1, 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_PhdrInfo), ctypes.c_size_t,
                             ctypes.c_void_p)


def executable_maps() -> list[dict[str, Any]]:
    """The executable segments of every loaded shared object, from the dynamic loader
    (``dl_iterate_phdr``): start, end, the segment's ELF virtual address (``offset``: an
    address's symbol is at ``addr - start + offset``) and the file. The loader's own view,
    because qemu-user's emulated ``/proc/self/maps`` leaves out libraries on some hosts."""
    out: list[dict[str, Any]] = []
    if ctypes.sizeof(ctypes.c_void_p) != 8:  # the structures above are the 64-bit ELF ones
        return out

    def visit(info_p: Any, _size: int, _data: Any) -> int:
        info = info_p.contents
        name = (info.dlpi_name or b"").decode(errors="replace")
        for i in range(info.dlpi_phnum if name.startswith("/") else 0):
            ph = info.dlpi_phdr[i]
            if ph.p_type == _PT_LOAD and ph.p_flags & _PF_X:
                start = info.dlpi_addr + ph.p_vaddr
                out.append({"start": start, "end": start + ph.p_memsz, "offset": ph.p_vaddr,
                            "path": name})
        return 0

    ctypes.CDLL(None).dl_iterate_phdr(_CALLBACK(visit), None)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, lib = _tvm_model(args.artifact) if args.artifact else _onnx_model(args.onnx)
    for _ in range(args.warmup):
        model()
    # Python's collector runs when allocation counts since start-up say so, which differs
    # between runs by a few objects: keep it out of the counted region.
    gc.collect()
    gc.disable()
    try:
        with measured_region():
            for _ in range(args.runs):
                model()
    finally:
        gc.enable()
    return {"runs": args.runs, "warmup": args.warmup, "lib": lib, "maps": executable_maps(),
            "threads": os.environ.get("TVM_NUM_THREADS")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="an artifact directory (TVM, 1 thread)")
    src.add_argument("--onnx", help="an ONNX file (ONNX Runtime CPU provider, 1 thread)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    json.dump({"ok": True, "result": run(args)}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
