"""Latency statistics shared by every benchmark (local, SSH, RPC)."""

from __future__ import annotations

import numpy as np


def summarize(latencies_ms: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99/min/mean/std in milliseconds and throughput (runs per second at p50)."""
    a = np.asarray(latencies_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "runs": int(a.size),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "min_ms": float(a.min()),
        "mean_ms": float(a.mean()),
        "std_ms": float(a.std()),
        "throughput_fps": float(1000.0 / a.mean()) if a.mean() > 0 else float("inf"),
    }
