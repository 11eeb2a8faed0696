"""The guest side of tuning against the cost instrument: many compiled kernels, one process.

MetaSchedule's candidates are small shared libraries, each with one function (``main``) and
the shapes and dtypes of its arguments. Under qemu, starting Python and the TVM runtime costs
far more than running a kernel, so one process measures many, sent on its input::

    python -m lprnet_edge.runtime.cost_candidates < REQUESTS

reads one candidate per line, ``{"id": N, "path": "cand.so", "args": [["float32", [1, 64]],
...]}``, until its input ends; it prints ``{"ready": true}`` once Python and the TVM runtime
are loaded. Each candidate is loaded, given seeded random arguments, run once outside the
region (warm-up: lazy symbol binding, first-touch pages), then once inside its own measured
region, which the plugin dumps as section ``id`` (``cost_marker.dump_region``). One JSON
line per candidate goes to stdout as it finishes (``{"id": N, "ok": true, "maps": [...]}``
with the process's executable mappings, or ``{"id": N, "error": "..."}``), so the host
knows which candidate a crash or a hang belongs to.

Every module stays loaded until the process ends: unloading one would let the next be mapped
at the same addresses. numpy and the TVM runtime only: this module ships to the board.
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Any

import numpy as np

from lprnet_edge.runtime.cost_marker import dump_region, measured_region
from lprnet_edge.runtime.cost_runner import SEED, executable_maps


def random_args(args: list[list[Any]]) -> list[np.ndarray]:
    """Seeded arguments of the given dtypes and shapes (floats in [0, 1), integers small)."""
    rng = np.random.default_rng(SEED)
    out = []
    for dtype, shape in args:
        dt = np.dtype(dtype)
        if dt.kind == "f":
            a = rng.random(tuple(shape), dtype=np.float32).astype(dt)
        elif dt.kind in "iu":
            a = rng.integers(0, 8, size=tuple(shape)).astype(dt)
        elif dt.kind == "b":
            a = rng.integers(0, 2, size=tuple(shape)).astype(dt)
        else:
            raise ValueError(f"unsupported argument dtype {dtype}")
        out.append(np.array(a, dtype=dt, order="C"))  # 0-d stays 0-d (not ascontiguousarray)
    return out


def measure(tvm: Any, cand: dict[str, Any], keep: list[Any]) -> None:
    """Load one candidate, warm it up, and run it once inside region ``cand["id"]``."""
    mod = tvm.runtime.load_module(cand["path"])
    keep.append(mod)
    func = mod["main"]
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(a, dev) for a in random_args(cand["args"])]
    func(*args)
    gc.collect()
    gc.disable()
    try:
        with measured_region():
            func(*args)
    finally:
        gc.enable()
    dump_region(int(cand["id"]))


def _say(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main() -> int:
    # The TVM runtime is the one heavy package here: imported when the guest starts serving.
    import tvm
    import tvm.runtime  # noqa: F401

    keep: list[Any] = []
    _say({"ready": True})
    for text in sys.stdin:
        if not text.strip():
            continue
        cand = json.loads(text)
        try:
            measure(tvm, cand, keep)
            line = {"id": cand["id"], "ok": True, "maps": executable_maps()}
        except Exception as e:  # noqa: BLE001 - a failing candidate is a result, not a stop
            line = {"id": cand["id"], "error": f"{type(e).__name__}: {e}"[:2000]}
        _say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
