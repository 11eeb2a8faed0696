"""The latency goals of the compression work (issue 11), evaluated on the report's rows.

Pure logic over the JSON rows of :mod:`lprnet_edge.report.variants`: every figure comes from
the rows (never a constant of a past run), and each goal says met / missed *by how much*, or
why it was not evaluated. The latency goals compare TVM artifacts timed in one interleaved
run at one tuning budget (``--latency tvm``); PyTorch eager latency says nothing about what
the compiled artifacts do, so with it they are "not evaluated".

Accuracy is the change on ``test/`` in points (1000 plates: 0.1 pt steps); "lost" is the
drop, clipped at 0 (a variant that gains accuracy lost nothing).
"""

from __future__ import annotations

from typing import Any

EPS = 1e-9  # accuracy changes are differences of floats: 0.5 pt must count as 0.5 pt
INT8_VARIANT = "int8-sim"
CHANNEL_PREFIX = "channels-"

Row = dict[str, Any]


def _lost(r: Row) -> float:
    return max(0.0, -float(r["accuracy_change_points"]))


def _within(r: Row, pts: float) -> bool:
    return _lost(r) <= pts + EPS


def _timed(r: Row) -> bool:
    """A TVM latency that may be compared (same budget as the others: see budget_check)."""
    return (r.get("latency_ms") is not None
            and str(r.get("latency_backend", "")).startswith("tvm")
            and r.get("latency_comparable") is not False)


def _speedup(base: Row, r: Row) -> float:
    return float(base["latency_ms"]) / float(r["latency_ms"])


def _runs_note(*rows: Row) -> str:
    """A warning when the rows were timed in different runs (a ``--refresh-latency
    --variant``): their ratio then also compares the host's load at two times."""
    runs = {r.get("latency_run") for r in rows}
    return "" if len(runs) <= 1 else (" [timed in different runs: "
                                      + ", ".join(f"{r['name']} {r.get('latency_run') or '?'}"
                                                  for r in rows) + "]")


def _result(goal: str, status: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"goal": goal, "status": status, "met": status == "met", "detail": detail, **extra}


def _not_evaluated(goal: str, reason: str) -> dict[str, Any]:
    return _result(goal, "not evaluated", reason, reason=reason)


def _acc(r: Row) -> str:
    return f"{r['accuracy_change_points']:+.1f} pt"


def profile_note(r: Row) -> str | None:
    """Where the variant's kernel time goes by schedule kind, and its slowest kernel (from the
    compact profile of :func:`lprnet_edge.report.latency.compact_profile`)."""
    prof = r.get("latency_profile") or {}
    kinds = prof.get("by_schedule") or {}
    rows = prof.get("rows") or []
    if not kinds or not rows:
        return None
    shares = ", ".join(f"{k} {v['share']:.0%}" for k, v in
                       sorted(kinds.items(), key=lambda kv: -kv[1]["ms"]))
    top = rows[0]
    gf = f", {top['gflops']:.1f} GFLOP/s" if top.get("gflops") else ""
    return (f"{r['name']} kernel time by schedule: {shares}; slowest kernel {top['name']} "
            f"{top['ms']:.2f} ms ({top['share']:.0%}, {top['schedule']}{gf})")


def int8_goal(rows: list[Row], base: Row, speed: float = 1.5, pts: float = 0.5
              ) -> dict[str, Any]:
    """The int8 artifact (``int8-sim``'s TVM build) >= ``speed`` x faster than the fp32
    original's, with <= ``pts`` lost on test/."""
    goal = f"host int8 artifact >= {speed:g}x faster than fp32, <= {pts:g} pt lost"
    r = next((x for x in rows if x["name"] == INT8_VARIANT), None)
    if r is None:
        return _not_evaluated(goal, f"no {INT8_VARIANT} row")
    if not _timed(r):
        return _not_evaluated(goal, f"{INT8_VARIANT} has no comparable TVM latency"
                              + (f" ({r['latency_error']})" if r.get("latency_error") else ""))
    s, lost = _speedup(base, r), _lost(r)
    fast, acc = s >= speed, _within(r, pts)
    need_ms = float(base["latency_ms"]) / speed
    parts = [f"{r['name']} {r['latency_ms']:.2f} ms vs {base['latency_ms']:.2f} ms: "
             f"{s:.2f}x faster"
             + (f" ({s - speed:+.2f}x over {speed:g}x)" if fast else
                f", missed by {speed - s:.2f}x (needs <= {need_ms:.2f} ms, "
                f"{float(r['latency_ms']) - need_ms:.2f} ms slower)"),
             f"accuracy {_acc(r)}" + (f" (within {pts:g} pt by {pts - lost:.1f} pt)" if acc
                                      else f" ({lost - pts:.1f} pt past the {pts:g} pt budget)")
             + _runs_note(base, r)]
    note = profile_note(r) if not fast else None
    return _result(goal, "met" if fast and acc else "missed", "; ".join(parts), variant=r["name"],
                   speedup=s, lost_points=lost, speedup_margin=s - speed,
                   points_margin=pts - lost, why=note)


def channel_speed_goal(rows: list[Row], base: Row, speed: float = 2.0, pts: float = 1.0
                       ) -> dict[str, Any]:
    """The fastest channel-pruned variant within ``pts`` is >= ``speed`` x faster than the
    original."""
    goal = f"a channel-pruned variant >= {speed:g}x faster than the original, <= {pts:g} pt lost"
    ch = [x for x in rows if x["name"].startswith(CHANNEL_PREFIX) and _timed(x)]
    if not ch:
        return _not_evaluated(goal, "no channel-pruned variant with a comparable TVM latency")
    ok = [x for x in ch if _within(x, pts)]
    if not ok:
        best = max(ch, key=lambda x: x["test_accuracy"])
        return _result(goal, "missed", f"no channel-pruned variant within {pts:g} pt (most "
                       f"accurate: {best['name']} {_acc(best)})", variant=best["name"],
                       speedup=_speedup(base, best), lost_points=_lost(best))
    r = max(ok, key=lambda x: _speedup(base, x))
    s = _speedup(base, r)
    met = s >= speed
    detail = (f"fastest within {pts:g} pt: {r['name']} {r['latency_ms']:.2f} ms vs "
              f"{base['latency_ms']:.2f} ms = {s:.2f}x ({_acc(r)}, "
              f"{r.get('flops_executed_ratio', float('nan')):.2f}x fewer executed FLOPs)"
              + (f", {s - speed:+.2f}x over {speed:g}x" if met else
                 f", missed by {speed - s:.2f}x (needs <= "
                 f"{float(base['latency_ms']) / speed:.2f} ms)") + _runs_note(base, r))
    return _result(goal, "met" if met else "missed", detail, variant=r["name"], speedup=s,
                   lost_points=_lost(r), speedup_margin=s - speed,
                   why=None if met else profile_note(r))


def flops_goal(rows: list[Row], factor: float = 4.0, pts: float = 1.0) -> dict[str, Any]:
    """A variant with >= ``factor`` x fewer *executed* FLOPs (after the compiler's exact
    constant-channel fold, original folded too) within ``pts``; model FLOPs shown beside.
    Needs no latency, so it is evaluated with either backend."""
    goal = f"a variant with >= {factor:g}x fewer executed FLOPs, <= {pts:g} pt lost"
    ok = [x for x in rows if _within(x, pts) and x.get("flops_executed_ratio")]
    if not ok:
        return _not_evaluated(goal, f"no variant within {pts:g} pt with executed FLOPs")
    r = max(ok, key=lambda x: x["flops_executed_ratio"])
    f = float(r["flops_executed_ratio"])
    met = f >= factor
    detail = (f"most reduced within {pts:g} pt: {r['name']} {r['flops_executed'] / 1e6:.0f} "
              f"executed MFLOPs = {f:.2f}x fewer ({r['flops_ratio']:.2f}x fewer model FLOPs), "
              f"{_acc(r)}" + (f", {f - factor:+.2f}x over {factor:g}x" if met
                              else f", missed by {factor - f:.2f}x"))
    return _result(goal, "met" if met else "missed", detail, variant=r["name"],
                   flops_executed_ratio=f, flops_ratio=r["flops_ratio"], lost_points=_lost(r))


def smallest_fastest_goal(rows: list[Row], pts: float = 0.5, slack: float = 0.10
                          ) -> dict[str, Any]:
    """The smallest (stored bytes) variant within ``pts`` is the fastest of those within
    ``pts``, or at most ``slack`` slower than it."""
    goal = (f"the smallest variant within {pts:g} pt is the fastest of those or within "
            f"{slack:.0%} of it")
    ok = [x for x in rows if _within(x, pts)]
    small = min(ok, key=lambda x: x["stored_bytes"])
    timed = [x for x in ok if _timed(x)]
    if not _timed(small) or not timed:
        return _not_evaluated(goal, f"{small['name']} (smallest within {pts:g} pt) has no "
                              "comparable TVM latency")
    fast = min(timed, key=lambda x: x["latency_ms"])
    over = float(small["latency_ms"]) / float(fast["latency_ms"]) - 1.0
    met = over <= slack + EPS
    if small is fast:
        detail = (f"{small['name']} ({small['stored_bytes'] / 1e3:.0f} kB, {_acc(small)}) is "
                  f"also the fastest within {pts:g} pt ({small['latency_ms']:.2f} ms)")
    else:
        detail = (f"smallest: {small['name']} ({small['stored_bytes'] / 1e3:.0f} kB, "
                  f"{_acc(small)}) {small['latency_ms']:.2f} ms; fastest: {fast['name']} "
                  f"({fast['stored_bytes'] / 1e3:.0f} kB) {fast['latency_ms']:.2f} ms; "
                  f"smallest is {over:.1%} slower"
                  + (f" (within {slack:.0%})" if met else
                     f", missed by {over - slack:.1%} points of the {slack:.0%} slack"))
    detail += _runs_note(small, fast)
    return _result(goal, "met" if met else "missed", detail, variant=small["name"],
                   fastest=fast["name"], slower_than_fastest=over,
                   why=None if met else profile_note(small))


def latency_goals(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """The issue-11 goals, keyed; latency ones "not evaluated" without TVM latencies."""
    out: dict[str, dict[str, Any]] = {}
    base = rows[0] if rows else None
    speed = {"int8_1.5x_faster_within_0.5pt": lambda b: int8_goal(rows, b),
             "channels_2x_faster_within_1pt": lambda b: channel_speed_goal(rows, b),
             "smallest_within_0.5pt_fastest_or_10pct": lambda b: smallest_fastest_goal(rows)}
    for key, fn in speed.items():
        if base is None or not _timed(base):
            why = ("needs --latency tvm" if base is None or not str(
                base.get("latency_backend", "")).startswith("tvm")
                else "the original has no comparable TVM latency")
            out[key] = _not_evaluated(_GOAL_TEXT[key], why)
        else:
            out[key] = fn(base)
    out["flops_executed_4x_within_1pt"] = flops_goal(rows)
    order = ("int8_1.5x_faster_within_0.5pt", "channels_2x_faster_within_1pt",
             "flops_executed_4x_within_1pt", "smallest_within_0.5pt_fastest_or_10pct")
    return {k: out[k] for k in order}


_GOAL_TEXT = {
    "int8_1.5x_faster_within_0.5pt": "host int8 artifact >= 1.5x faster than fp32, "
                                     "<= 0.5 pt lost",
    "channels_2x_faster_within_1pt": "a channel-pruned variant >= 2x faster than the original, "
                                     "<= 1 pt lost",
    "smallest_within_0.5pt_fastest_or_10pct": "the smallest variant within 0.5 pt is the "
                                              "fastest of those or within 10% of it",
}
