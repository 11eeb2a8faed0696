"""Rendering of the compression report: the Markdown tables and the accuracy-vs-latency plot.

Reads the report's JSON-shaped dict (rows of :mod:`lprnet_edge.report.variants`, latency fields
of :mod:`lprnet_edge.report.latency`); measures nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.transforms import Bbox


def _latency_text(setup: dict[str, Any] | None) -> str:
    if not setup:  # a report from before the latency setup was recorded
        return ("- Latency: host, batch 1; backend per row (`torch` = PyTorch eager, 1 thread, "
                "median of 5 interleaved rounds; `tvm` = compiled artifact).")
    load = setup.get("loadavg_timing_start") or setup.get("loadavg_end")
    how = (f"batch {setup['batch']}, {setup['threads']} thread, model only (no preprocessing "
           f"or decoding), median over {setup['rounds']} interleaved rounds of the per-round "
           f"median of {setup['runs_per_round']} runs, finished {setup['measured']} on "
           f"{setup.get('host')} ({setup.get('cpus')} cores"
           + (f", 1-min load average {load[0]:.1f} when "
              + ("the timing started" if setup.get("loadavg_timing_start") else "it ended")
              if load else "") + ")")
    if setup["backend"] == "torch":
        text = f"- Latency (`torch`): PyTorch eager, {how}."
    elif setup["backend"] == "tvm":
        text = (f"- Latency (`tvm`): TVM host artifacts built by `lprnet_edge.pipeline` "
                f"(`{setup.get('command') or 'lprnet-edge report --latency tvm --trials 0'}`), "
                f"timed like `bench` (`compiler.session.time_artifact`), {how}. "
                "Tuning budget: **0 MetaSchedule trials for every variant** (the same budget "
                "for all): no build tunes; every kernel gets the packaged default schedule of "
                "its workload (`lprnet_edge/compiler/data/default_schedules`, tuned once for "
                "the original's fp32 shapes), or, for shapes that database does not know "
                "(pruned widths, int8 kernels), the most similar known kernel's schedule "
                "transferred by `compiler/schedules.py`; an element-wise kernel with neither "
                "gets one parallel, vectorized loop (`compiler/injective.py`), any other runs "
                "TVM's naive loops. The per-kernel profile below says which each kernel got.")
    else:
        text = (f"- Latency (`tvm-tuned`): TVM host artifacts built by `lprnet_edge.pipeline` "
                f"(`{setup.get('command') or 'lprnet-edge report --latency tvm'}`), timed like "
                f"`bench` (`compiler.session.time_artifact`), {how}. "
                f"Tuning budget: **{setup['trials']} MetaSchedule trials per workload**, "
                f"spent on the convolution tasks (`{'`, `'.join(setup['tuned_tasks'])}`; the "
                "other fused kernels keep TVM's default schedules) by the build's own tune "
                f"stage, {setup['num_trials_per_iter']} candidates per batch, into a database "
                "of the report's own for that budget: no workload inherits deeper tuning, "
                "and variants that run the same graph share their records. Per-kernel "
                "profiles of every variant are in the JSON (`latency_profile`).")
    text += (" Sparse / fp16 / int8-weight variants decode their weights at load and run the "
             "same dense float32 graph as their base model: their latency differences are "
             "noise. The host is shared: compare ratios between rows, not absolute figures.")
    return text


def _latency_cell(r: dict[str, Any]) -> str:
    if r.get("latency_ms") is None:
        return f"n/a ({r.get('latency_error') or 'not measured'})"
    return f"{r['latency_ms']:.2f} ({r.get('latency_backend')})"


def _ratio_cell(r: dict[str, Any]) -> str:
    if r.get("latency_comparable") is False:
        return "not compared (unequal tuning)"
    return f"{r['latency_ratio']:.2f}" if r.get("latency_ratio") else "-"


def write_markdown(path: Path, rep: dict[str, Any]) -> None:
    """The report as Markdown: how each column was measured, the table, the TVM builds
    behind the latency column, the goals, profiles, descriptions, calibrators, selection."""
    rows = rep["variants"]
    lines = _header_lines(rep) + _table_lines(rows)
    lines += _tvm_build_lines(rows, rep.get("latency"))
    lines += ["", "## Goals", ""]
    lines += goal_lines(rep.get("goals") or {}) or [
        "No goals given (`lprnet-edge report --goals FILE.toml`; the repository's are in "
        "`benchmarks/compression-goals.toml`)."]
    lines += profile_lines(rows)
    lines += ["", "Descriptions:", ""]
    lines += [f"- `{r['name']}`: {r['description']}" for r in rows]
    if rep.get("calibrators"):
        lines += _calibrator_lines(rep["calibrators"])
    if rep.get("selection"):
        lines += _selection_lines(rep["selection"])
    lines += ["", "![accuracy vs latency](compression-report.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _header_lines(rep: dict[str, Any]) -> list[str]:
    rows, setup = rep["variants"], rep.get("latency")
    return [
        "# Compression report",
        "",
        f"Generated {rep['generated']} by `{_report_command(rep)}` in {rep['seconds']:.0f} s"
        + (f"; latency column re-measured {rep['refreshed']}"
           + (f" by `{setup['command']}`" if setup and setup.get("command") else "")
           if rep.get("refreshed") else "") + ".",
        "",
        f"- Accuracy: exact plate match on `test/` ({rows[0]['test_images']} plates), batch-1 "
        "semantics, PyTorch. `test/` was only measured; calibration, distillation and "
        "selection used `calib/` (and a fixed-seed validation split of it).",
        f"- Stored size: `params.npz` bytes with the variant's encodings (BatchNorm folded); "
        f"the fp32 reference is {rows[0]['fp32_reference_bytes'] / 1e6:.2f} MB (4 bytes x "
        f"{rows[0]['fp32_reference_bytes'] // 4} parameters of the original).",
        _FLOPS_TEXT,
        _latency_text(setup),
        "- `int8-sim`: its accuracy is the PyTorch simulation of int8 x int8 -> int32 "
        "convolutions; its TVM artifact runs those convolutions in int8 "
        "(`compiler.frontend.relax_int8_rewrite`), calibrated by the build pipeline on "
        "`calib/`.",
        "",
    ]


def _table_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| variant | test acc | change (pt) | stored | x vs fp32 | MFLOPs model / executed "
             "| x fewer FLOPs model / executed | latency ms | x faster | executes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['test_accuracy']:.3f} | {r['accuracy_change_points']:+.1f} | "
            f"{r['stored_bytes'] / 1e3:.0f} kB | {r['compression_vs_fp32']:.1f} | "
            f"{r['flops'] / 1e6:.0f} / {_mflops(r.get('flops_executed'))} | "
            f"{r['flops_ratio']:.2f} / {_x(r.get('flops_executed_ratio'))} | "
            f"{_latency_cell(r)} | {_ratio_cell(r)} | {r['executes']} |")
    return lines


def _tvm_build_lines(rows: list[dict[str, Any]], setup: dict[str, Any] | None) -> list[str]:
    tvm_rows = [r for r in rows if r.get("latency_backend", "").startswith("tvm")]
    if not tvm_rows:
        return []
    lines = ["", "TVM builds behind the latency column:", "",
             "| variant | budget | new trials | records applied | "
             "conv tasks with records | build + tune s | params.npz |",
             "|---|---|---|---|---|---|---|"]
    for r in tvm_rows:
        t = r.get("latency_tvm")
        if not t:
            lines.append(f"| {r['name']} | - | - | - | - | - | "
                         f"{r.get('latency_error', 'not built')} |")
            continue
        tu = t.get("tuning") or {}
        lines.append(
            f"| {r['name']} | {t.get('trials_budget') or '0 (untuned)'} | "
            f"{tu.get('trials_new', 0)} | {t['records_applied']} | "
            f"{tu.get('tasks_tuned', '-')}/{tu.get('tasks', '-')} | "
            f"{t['build_s']:.0f} | {r['artifact_params_bytes'] / 1e3:.0f} kB |")
    return lines + _tuning_caveats(tvm_rows, (setup or {}).get("budget"))


def _selection_lines(s: dict[str, Any]) -> list[str]:
    lines = ["", "## Accuracy-guarded selection (calib/ validation split)", "",
             f"Guard `{s.get('guard', 'drop')}`, budget {100 * s['budget']:.1f} pt vs the "
             "original "
             f"({s['original_val_accuracy']:.3f} on {s['val_split']['images']} images, "
             f"seed {s['val_split']['seed']}); selected: **{s['selected']}**.", "",
             "| candidate | val acc | drop (pt) | lost (pt) | gained (pt) | agreement | "
             "stored | MFLOPs | within budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in s["candidates"]:
        lines.append(f"| {c['name']} | {c['val_accuracy']:.3f} | {100 * c['val_drop']:+.1f} "
                     f"| {100 * c.get('val_lost', 0):.1f} | "
                     f"{100 * c.get('val_gained', 0):.1f} "
                     f"| {c['val_agreement']:.3f} | {c['stored_bytes'] / 1e3:.0f} kB | "
                     f"{c['flops'] / 1e6:.0f} | {'yes' if c['within_budget'] else 'no'} |")
    return lines


_FLOPS_TEXT = (
    "- FLOPs: *model* = the variant's architecture (`lprnet_edge.model.flops`, dense); "
    "*executed* = what the compiled artifact computes after the compiler's exact "
    "constant-channel fold (`lprnet_edge.model.channel_fold.fold_all`, applied by every "
    "build; the original's dead filters are half of its FLOPs). Ratios are against the "
    "original's model / executed FLOPs.")


def _mflops(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _report_command(rep: dict[str, Any]) -> str:
    """The command that generated the report, as typed (recorded since the report kept it);
    an older report only knew whether it was ``--quick``."""
    return rep.get("command") or ("lprnet-edge report" + (" --quick" if rep["quick"] else ""))


def goal_lines(g: dict[str, Any]) -> list[str]:
    """One line per goal, in the order given: met / missed with by how much, or not
    evaluated (why), and for a missed one where the variant's kernel time goes."""
    out = []
    for r in g.values():
        if not isinstance(r, dict) or "status" not in r:
            continue
        status = ("**met**" if r["status"] == "met" else "**missed**"
                  if r["status"] == "missed" else f"not evaluated ({r['detail']})")
        line = f"- {r['goal']}: {status}"
        if r["status"] != "not evaluated":
            line += f": {r['detail']}"
        if r.get("why"):
            line += f". Why: {r['why']}"
        out.append(line + ".")
    return out


def profile_lines(rows: list[dict[str, Any]], top: int = 3) -> list[str]:
    """Per TVM-timed variant: kernel time by schedule kind and the ``top`` slowest kernels
    (the profiler of ``bench --profile``; the full compact profile is in the JSON)."""
    prof_rows = [r for r in rows if (r.get("latency_profile") or {}).get("rows")]
    if not prof_rows:
        return []
    p0 = prof_rows[0]["latency_profile"]
    out = ["", "## Per-kernel profiles (top kernels)", "",
           f"`lprnet_edge.runtime.profile` (as `lprnet-edge bench --profile`), instrumented, "
           f"mean of {p0.get('runs', '?')} runs per variant, 1 thread; *share* is of the sum of "
           "kernels; *schedule*: `tuned` (a record of the build's tuning), `default` (the "
           "packaged schedule of that workload), `transferred` (a similar workload's schedule "
           "re-fitted), `tensorized` (int8 dot-product intrinsics), `injective` (one parallel, "
           "vectorized loop for an element-wise kernel), `naive` (TVM's unscheduled loops), "
           "`builtin` (VM).", "",
           "| variant | kernels ms (wall) | time by schedule | # | kernel | ms | share | "
           "GFLOP/s | schedule |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in prof_rows:
        p = r["latency_profile"]
        kinds = ", ".join(f"{k} {v['share']:.0%}" for k, v in sorted(
            (p.get("by_schedule") or {}).items(), key=lambda kv: -kv[1]["ms"]))
        for i, k in enumerate(sorted(p["rows"], key=lambda k: -k["ms"])[:top]):
            head = (f"| {r['name']} | {p['kernels_ms']:.2f} ({p['wall']['median_ms']:.2f}) | "
                    f"{kinds} " if i == 0 else "| | | ")
            gf = "-" if k.get("gflops") is None else f"{k['gflops']:.1f}"
            out.append(f"{head}| {i + 1} | `{k['name']}` | {k['ms']:.3f} | {k['share']:.0%} | "
                       f"{gf} | {k.get('schedule') or '?'} |")
    return out


def _tuning_caveats(rows: list[dict[str, Any]], budget: dict[str, Any] | None
                    ) -> list[str]:
    """Say so when rows were not tuned to the same depth (then the table prints no latency
    ratio: they would compare tuning as well as models), and when tasks got no record."""
    out: list[str] = []
    if budget and not budget.get("comparable", True):
        out.append(f"**Not compared: unequal tuning budgets** ({budget['reason']}); the "
                   "*x faster* column is left empty.")
    partial = sorted({r["name"] for r in rows if r.get("latency_tvm")
                      and (r["latency_tvm"].get("tuning") or {}).get("tasks_tuned", 0)
                      < (r["latency_tvm"].get("tuning") or {}).get("tasks", 0)})
    if partial:
        out.append(f"Not every convolution task has records in {', '.join(partial)}: the "
                   "budget ran out before every task had a round, and those tasks run TVM's "
                   "default schedule.")
    return ["", " ".join(out)] if out else []


def _calibrator_lines(c: dict[str, Any]) -> list[str]:
    lines = ["", "## int8 calibrators (weights + activations, PyTorch simulation, test/)", "",
             f"Calibrated on the {c['calibration']}; measured on the {c['test_images']} "
             f"`test/` plates at batch-1 semantics like the table above (original "
             f"{c['original_test_accuracy']:.3f}); percentile = {c['percentile']}. "
             + (f"Command: `{c['command']}`, {c['measured']}." if c.get("command")
                else f"Measured {c['measured']}."), "",
             "| calibrator | head (container conv) | test acc | change (pt) | agreement with "
             "original | median threshold / max |",
             "|---|---|---|---|---|---|"]
    for r in c["rows"]:
        lines.append(f"| {r['calibrator']} | {'fp32' if r['head_fp32'] else 'int8'} | "
                     f"{r['test_accuracy']:.3f} | {r['accuracy_change_points']:+.1f} | "
                     f"{r['agreement_with_original']:.3f} | "
                     f"{r['threshold_over_max_median']:.2f} |")
    return lines


def pareto_front(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the variants (fastest first) that no other variant beats: none is faster
    and at least as accurate, or as fast and more accurate. Ties are all kept."""
    pts = [r for r in rows if r.get("latency_ms") is not None]

    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
        la, lb, aa, ab = a["latency_ms"], b["latency_ms"], a["test_accuracy"], b["test_accuracy"]
        return (la < lb and aa >= ab) or (la == lb and aa > ab)

    front = [b for b in pts if not any(beats(a, b) for a in pts if a is not b)]
    return [r["name"] for r in sorted(front, key=lambda r: (r["latency_ms"], r["name"]))]


def _overlap(a: Any, b: Any, pad: float = 1.0) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0) + pad
    h = min(a.y1, b.y1) - max(a.y0, b.y0) + pad
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(ax: Any, points: list[tuple[float, float]], texts: list[str],
                 radii_pt: list[float], obstacles: Sequence[Any] = (),
                 fontsize: float = 7) -> list[Any]:
    """Greedy label placement: each label takes the first offset (growing rings of 16
    directions around its point) whose text box stays inside the axes and overlaps neither
    a placed label, nor a marker, nor an ``obstacle`` (a legend); far labels get a leader
    line. Crowded points are placed first. Returns the text boxes (display coordinates)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    disp = ax.transData.transform(np.asarray(points, dtype=float))
    marks = [Bbox.from_extents(x - r * px, y - r * px, x + r * px, y + r * px)
             for (x, y), r in zip(disp, radii_pt, strict=True)]
    crowd = [sum(np.hypot(*(disp[i] - disp[j])) < 60 * px for j in range(len(disp)))
             for i in range(len(disp))]
    order = sorted(range(len(points)), key=lambda i: (-crowd[i], disp[i][0]))
    frame = ax.get_window_extent(renderer)
    boxes: list[Any] = [None] * len(points)
    for i in order:
        def cost(bb: Any) -> float:
            inside = (frame.x0 <= bb.x0 and bb.x1 <= frame.x1 and frame.y0 <= bb.y0
                      and bb.y1 <= frame.y1)
            return ((0.0 if inside else 1e9)
                    + sum(_overlap(bb, o) for o in boxes if o is not None) * 100
                    + sum(_overlap(bb, o) for o in obstacles) * 100
                    + sum(_overlap(bb, m) for m in marks) * 10)

        boxes[i] = _place_one(ax, renderer, points[i], texts[i], radii_pt[i], fontsize, cost)
    return boxes


def _place_one(ax: Any, renderer: Any, point: tuple[float, float], text: str, radius: float,
               fontsize: float, cost: Any) -> Any:
    """Try offsets ring by ring; keep the first free one, else the cheapest."""
    r0 = radius + 2
    cands = [(ring, (r0 + ring * 11) * np.array([np.cos(t), np.sin(t)]))
             for ring in range(10) for t in np.linspace(0, 2 * np.pi, 16, endpoint=False)]
    best: tuple[float, Any, Any] | None = None
    for ring, off in cands:
        ha = "left" if off[0] > 1 else "right" if off[0] < -1 else "center"
        va = "bottom" if off[1] > 1 else "top" if off[1] < -1 else "center"
        far = ring > 0  # away from its marker's edge: draw a leader line
        ann = ax.annotate(text, point, xytext=tuple(off), textcoords="offset points",
                          ha=ha, va=va, fontsize=fontsize, zorder=4,
                          bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                "alpha": 0.8},
                          arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.35",
                                      "shrinkA": 0, "shrinkB": radius} if far else None)
        ann.update_positions(renderer)  # the offset is applied at draw time otherwise
        bb = Text.get_window_extent(ann, renderer)  # the text only, not the leader line
        c = cost(bb)
        if best is None or c < best[0]:
            if best is not None:
                best[1].remove()
            best = (c, ann, bb)
            if c == 0:
                break
        else:
            ann.remove()
    assert best is not None
    return best[2]


OFF_SCALE_POINTS = 10.0  # variants that lost more are listed under the plot, not drawn


def plot(path: Path, rows: list[dict[str, Any]], setup: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """Accuracy vs latency (marker area ~ stored size), the Pareto front, and labels placed
    so they do not overlap. Variants without a latency are listed under the plot."""
    timed = [r for r in rows if r.get("latency_ms") is not None]
    # A variant that lost far more than any budget would squeeze the others into one line.
    far = [r for r in timed if r.get("accuracy_change_points", 0.0) < -OFF_SCALE_POINTS]
    pts = [r for r in timed if r not in far]
    missing = [r["name"] for r in rows if r.get("latency_ms") is None]
    fig = Figure(figsize=(10, 6.5))
    FigureCanvasAgg(fig)  # a canvas of its own: no pyplot state, no display
    ax = fig.subplots()
    smax = max(r["stored_bytes"] for r in rows)

    def area(b: float) -> float:
        return 30 + 570 * b / smax

    front = pareto_front(pts)
    if pts:
        _scatter(ax, pts, front, area)
    leg = _legend(ax, smax, area)
    backend = (setup or {}).get("backend") or (pts[0].get("latency_backend") if pts else "")
    extra = (f", {setup['trials']} trials/workload" if setup and setup.get("trials")
             else ", 0 trials: default schedules" if str(backend) == "tvm" else "")
    ax.set_xlabel(f"latency, ms (host, batch 1, 1 thread, model only; {backend}{extra})")
    ax.set_ylabel("test accuracy (exact plate, batch 1)")
    ax.set_title("LPRNet compression variants (marker area ~ stored size)")
    ax.grid(alpha=0.3)
    notes = []
    if missing:
        notes.append("not plotted (no latency): " + ", ".join(missing))
    if far:
        notes.append(f"off scale (> {OFF_SCALE_POINTS:g} pt lost): " + ", ".join(
            f"{r['name']} ({r['test_accuracy']:.3f}, {r['latency_ms']:.2f} ms)" for r in far))
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize=7)
    fig.tight_layout(rect=(0, 0.03 if notes else 0, 1, 1))
    boxes: list[Any] = []
    if pts:
        fig.canvas.draw()
        obstacles = [leg.get_window_extent(fig.canvas.get_renderer())]
        boxes = place_labels(ax, [(r["latency_ms"], r["test_accuracy"]) for r in pts],
                             [f"{r['name']} ({r['stored_bytes'] / 1e3:.0f} kB)" for r in pts],
                             [float(np.sqrt(area(r["stored_bytes"])) / 2) for r in pts],
                             obstacles)
    fig.savefig(path, dpi=120)
    return {"front": front, "missing": missing, "off_scale": [r["name"] for r in far],
            "texts": len(ax.texts),
            "labels": {r["name"]: tuple(float(e) for e in b.extents)
                       for r, b in zip(pts, boxes, strict=True)}}


def _scatter(ax: Any, pts: list[dict[str, Any]], front: list[str], area: Any) -> None:
    """The variants (front in another colour), the front as a step line, and limits with
    room for the labels."""
    lat = np.array([r["latency_ms"] for r in pts])
    acc = np.array([r["test_accuracy"] for r in pts])
    areas = np.array([area(r["stored_bytes"]) for r in pts])
    on = np.array([r["name"] in front for r in pts])
    ax.scatter(lat[~on], acc[~on], s=areas[~on], alpha=0.45, c="C0", edgecolors="k",
               linewidths=0.6, zorder=2)
    ax.scatter(lat[on], acc[on], s=areas[on], alpha=0.6, c="C1", edgecolors="k",
               linewidths=0.9, zorder=3)
    fr = sorted((r["latency_ms"], r["test_accuracy"]) for r in pts if r["name"] in front)
    fx, fy = [p[0] for p in fr], [p[1] for p in fr]
    ax.step(fx + [lat.max() * 1.08], fy + [fy[-1]], where="post", ls="--", lw=1.2,
            color="C3", zorder=1)
    xr = max(lat.max() - lat.min(), 0.1 * lat.max())
    yr = max(acc.max() - acc.min(), 0.01)
    ax.set_xlim(lat.min() - 0.35 * xr, lat.max() + 0.35 * xr)
    ax.set_ylim(acc.min() - 0.45 * yr, acc.max() + 0.45 * yr)


def _legend(ax: Any, smax: float, area: Any) -> Any:
    kb = [k for k in (50, 200, 600) if k * 1e3 <= smax * 1.05] or [round(smax / 1e3)]
    handles = [ax.scatter([], [], s=area(k * 1e3), c="C0", alpha=0.45, edgecolors="k",
                          label=f"{k} kB stored") for k in kb]
    handles += [ax.scatter([], [], s=60, c="C1", alpha=0.6, edgecolors="k",
                           label="on the Pareto front"),
                Line2D([], [], ls="--", color="C3", label="Pareto front (faster and at least "
                                                          "as accurate)")]
    return ax.legend(handles=handles, loc="lower right", fontsize=7, labelspacing=1.2,
                     borderpad=0.8, framealpha=0.9)
