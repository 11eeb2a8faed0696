"""Report generation on a tiny run: files, figures, goals, CLI wiring, tuned TVM latency,
the plot's labels and Pareto front, the calibrator comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import assert_user_error  # noqa: E402

from lprnet_edge.model.calib import CalibrationSet, EvalSet  # noqa: E402
from lprnet_edge.report.goals import load_goals  # noqa: E402

GOALS = load_goals(Path(__file__).resolve().parents[2] / "benchmarks" / "compression-goals.toml")
LATENCY_KINDS = ("faster", "smallest_is_fastest")

PLATES = ["京A12345", "沪B6789C", "粤C1D234", "川A0K123"]
# Columns a latency refresh must leave alone (they took ~40 min to measure on test/).
FIXED = ("test_accuracy", "stored_bytes", "flops", "compression_vs_fp32",
         "accuracy_change_points", "size_ratio", "flops_ratio", "encodings", "executes")


def _sets():
    from lprnet_edge.runtime.preprocess import Preprocess

    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 255, (36, 136, 3), dtype=np.uint8) for _ in range(10)]
    pre = Preprocess()
    x = np.concatenate([pre(r) for r in raw])
    labels = [PLATES[i % 4] for i in range(10)]
    cal = CalibrationSet(x, labels, [f"{i}.jpg" for i in range(10)], raw=raw)
    return cal, EvalSet(x[:6], labels[:6], None)


def _read(out: Path) -> dict:
    return json.loads((out / "compression-report.json").read_text(encoding="utf-8"))


@pytest.fixture
def tiny_report(tiny_model, tmp_path, fresh_cache, one_torch_thread):
    """A quick report of the tiny model (PyTorch latency, 1 round of 2 runs), in its own
    cache (the distilled checkpoint and tuning databases never reach ~/.cache)."""
    import lprnet_edge.report.variants as report

    cal, test = _sets()
    out = tmp_path / "report"
    rep = report.run_report(out, quick=True, model=tiny_model, calib=cal, test=test,
                            selection=False, rounds=1, runs=2, goals=GOALS, log=lambda m: None)
    return out, rep, cal, test


def test_report_tiny_run(tiny_model, tmp_path, fresh_cache, one_torch_thread):
    import lprnet_edge.report.variants as report

    cal, test = _sets()
    rep = report.run_report(tmp_path, quick=True, model=tiny_model, calib=cal, test=test,
                            selection=True, rounds=2, runs=2, goals=GOALS,
                            command="lprnet-edge report --quick", log=lambda m: None)
    for suffix in ("md", "json", "png"):
        assert (tmp_path / f"compression-report.{suffix}").stat().st_size > 0
    data = _read(tmp_path)
    names = [r["name"] for r in data["variants"]]
    assert names[0] == "original" and "sparse80+fp16" in names and "int8-sim" in names
    assert any(n.startswith("channels-") for n in names)
    orig = data["variants"][0]
    assert orig["accuracy_change_points"] == 0 and orig["size_ratio"] == 1
    sp = next(r for r in data["variants"] if r["name"] == "sparse80+fp16")
    assert sp["stored_bytes"] < orig["stored_bytes"] / 4
    ch = next(r for r in data["variants"] if r["name"] == "channels-b23x0.5+kd")
    assert ch["flops_ratio"] > 1.3
    assert list(data["goals"]) == [g.name for g in GOALS]
    assert data["goal_specs"] == [g.to_dict() for g in GOALS]  # a refresh re-checks them
    # PyTorch latency: the latency goals are not evaluated, and say why.
    for spec in GOALS:
        g = data["goals"][spec.name]
        if spec.kind not in LATENCY_KINDS:  # needs no latency
            assert g["status"] in ("met", "missed", "not evaluated")
        else:
            assert g["status"] == "not evaluated" and g["detail"] == "needs --latency tvm"
    # Executed FLOPs: the model after the compiler's constant-channel fold, never more.
    for r in data["variants"]:
        assert 0 < r["flops_executed"] <= r["flops"], r["name"]
    assert orig["flops_executed_ratio"] == 1
    assert ch["flops_executed_ratio"] == pytest.approx(
        orig["flops_executed"] / ch["flops_executed"])
    assert data["selection"]["candidates"] and len(data["selection"]["candidates"]) == len(names)
    md = (tmp_path / "compression-report.md").read_text(encoding="utf-8")
    assert md.startswith("# Compression report\n\nGenerated ") and (
        "by `lprnet-edge report --quick` in" in md)
    assert "| original |" in md and "Goals" in md
    assert "not evaluated (needs --latency tvm)" in md and "MFLOPs model / executed" in md
    # Latency: measured (PyTorch, interleaved rounds), and described.
    for r in rep["variants"]:
        assert r["latency_backend"] == "torch" and len(r["latency_rounds_ms"]) == 2
        assert r["latency_ms"] == pytest.approx(float(np.median(r["latency_rounds_ms"])))
        assert r["latency_ms"] > 0 and r["latency_ratio"] > 0
    assert orig["latency_ratio"] == 1
    assert {r["latency_run"] for r in data["variants"]} == {data["latency"]["started"]}
    assert data["latency"]["threads"] == 1 and data["latency"]["rounds"] == 2
    assert "1 thread, model only" in md


def test_refresh_latency_tvm_tuned(tiny_report, tiny_model, data_dir, fresh_cache, tmp_path):
    """--refresh-latency --latency tvm --trials 2 on two variants that run the same graph:
    tuned artifacts, one shared database, the other columns untouched."""
    import lprnet_edge.report.variants as report
    from lprnet_edge.compiler.tuning import count_records

    out, before, cal, _test = tiny_report
    logs: list[str] = []
    rep = report.refresh_latency(out, latency="tvm", trials=2, rounds=2, runs=3,
                                 only=["original", "int8w"], model=tiny_model, calib=cal,
                                 work=tmp_path / "work", command="test refresh",
                                 log=logs.append)
    data = _read(out)
    assert [r["name"] for r in data["variants"]] == [r["name"] for r in before["variants"]]
    for old, new in zip(before["variants"], data["variants"], strict=True):
        for k in FIXED:
            assert new[k] == old[k], (new["name"], k)
    rows = {r["name"]: r for r in data["variants"]}
    for name in ("original", "int8w"):
        r = rows[name]
        assert r["latency_backend"] == "tvm-tuned" and "latency_error" not in r, (
            r.get("latency_error", r))
        assert math.isfinite(r["latency_ms"]) and r["latency_ms"] > 0
        assert len(r["latency_rounds_ms"]) == 2
        t = r["latency_tvm"]
        assert t["trials_budget"] == 2 and t["tuned_tasks"] == ["conv2d"]
        assert t["records_applied"] >= 2 and t["compile"]["tuned"] is True
        assert t["manifest_stages_tune"]["trials"] == 2
        assert r["artifact_params_bytes"] > 0
    o, w = rows["original"]["latency_tvm"], rows["int8w"]["latency_tvm"]
    # The executed-FLOPs column folds exactly what the build's compiler folded.
    assert o["channel_fold"] is not None and o["channel_fold"] == rows["original"]["channel_fold"]
    # The build's own tune stage tuned the convolutions only (TuneConfig.tasks), into the
    # report's database for this budget; int8 weights are decoded at load: same graph, its
    # records are already there, nothing new is tuned.
    assert o["manifest_stages_tune"]["tasks"] == ["conv2d"]
    assert o["tuning"]["db_dir"] == w["tuning"]["db_dir"]
    assert Path(o["tuning"]["db_dir"]).parent == tmp_path / "work" / "tuning"
    assert o["tuning"]["trials_new"] == 2 and not o["tuning"]["skipped"]
    assert w["tuning"]["skipped"] and w["tuning"]["trials_new"] == 0
    assert count_records(o["tuning"]["db_dir"]) >= 2
    assert 1 <= o["tuning"]["tasks_tuned"] == w["tuning"]["tasks_tuned"] < o["tuning"]["tasks"]
    assert o["tuning"]["tasks"] >= 10  # LPRNet's convolution tasks
    # Equal budgets: the same records in both workloads, so the ratio is printed.
    assert data["latency"]["budget"]["comparable"] is True
    assert o["records_applied"] == w["records_applied"]
    assert rows["original"]["latency_comparable"] is True
    # The per-kernel profile of each variant (the profiler of `bench --profile`).
    prof = rows["original"]["latency_profile"]
    assert prof["rows"] and prof["kernels_ms"] > 0 and prof["wall"]["median_ms"] > 0
    assert any("conv2d" in k["name"] for k in prof["rows"])
    assert [k["ms"] for k in prof["rows"]] == sorted((k["ms"] for k in prof["rows"]),
                                                     reverse=True)
    assert all("shapes" not in k and k["schedule"] for k in prof["rows"])
    kinds = prof["by_schedule"]
    assert sum(k["kernels"] for k in kinds.values()) == len(prof["rows"])
    assert sum(k["ms"] for k in kinds.values()) == pytest.approx(
        sum(k["ms"] for k in prof["rows"]))
    # 2 trials: a conv keeps its tuned record only where it beats the packaged default.
    assert sum(kinds.get(k, {}).get("kernels", 0) for k in ("tuned", "default")) >= 1
    assert rows["int8w"]["latency_ratio"] == pytest.approx(
        rows["original"]["latency_ms"] / rows["int8w"]["latency_ms"])
    # Variants not asked for keep their (PyTorch) latency and say so.
    assert rows["sparse80"]["latency_backend"] == "torch"
    assert data["latency"]["backend"] == "tvm-tuned" and data["latency"]["trials"] == 2
    assert data["latency"]["variants"] == ["original", "int8w"]
    assert rows["int8w"]["latency_run"] == data["latency"]["started"]
    assert rows["sparse80"]["latency_run"] == before["latency"]["started"]
    assert rep["refreshed"] == data["refreshed"]
    md = (out / "compression-report.md").read_text(encoding="utf-8")
    assert "**2 MetaSchedule trials per workload**" in md and "(tvm-tuned)" in md
    tt = o["tuning"]
    assert (f"| original | 2 | 2 | {o['records_applied']} | {tt['tasks_tuned']}/{tt['tasks']} |"
            in md)
    assert "Not compared" not in md
    # The profile section shows the refreshed variants' slowest kernels; the goals were
    # re-evaluated on the refreshed rows (the goals the report was given, kept in its JSON;
    # int8-sim kept its PyTorch latency: not evaluated).
    top = prof["rows"][0]
    assert "## Per-kernel profiles" in md and f"`{top['name']}` | {top['ms']:.3f} |" in md
    g = data["goals"]["int8_1.5x_faster_within_0.5pt"]
    assert g["status"] == "not evaluated" and "int8-sim has no comparable TVM latency" in g[
        "detail"]


def test_tvm_latency_reports_a_failed_build(tiny_report, tmp_path):
    """A variant that cannot be built gets an explained n/a, and the report is still written."""
    import lprnet_edge.report.latency as lat
    import lprnet_edge.report.render as render
    import lprnet_edge.report.variants as report

    out, rep, _cal, _test = tiny_report
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    v = report.Variant("broken", "unreadable checkpoint", torch.nn.Identity(),
                       torch.nn.Identity(), {}, "fp32", weights_path=bad)
    row = dict(rep["variants"][-1], name="broken", latency_ms=1.0, latency_rounds_ms=[1.0])
    lat.tvm_latencies([v], [row], tmp_path / "work", None, trials=None, rounds=1, runs=1,
                      log=lambda m: None)
    assert row["latency_ms"] is None and row["latency_backend"] == "tvm"
    assert row["latency_error"].startswith("build failed: ") and "latency_rounds_ms" not in row
    rep["variants"].append(row)
    lat.latency_ratios(rep["variants"])
    assert row["latency_ratio"] is None
    report._save(out, rep)
    md = (out / "compression-report.md").read_text(encoding="utf-8")
    assert "| broken |" in md and "n/a (build failed: " in md
    info = render.plot(tmp_path / "p.png", rep["variants"], rep["latency"])
    assert info["missing"] == ["broken"] and "broken" not in info["labels"]


def _brute_front(rows: list[dict]) -> set[str]:
    def beats(a: dict, b: dict) -> bool:
        return ((a["latency_ms"] < b["latency_ms"] and a["test_accuracy"] >= b["test_accuracy"])
                or (a["latency_ms"] == b["latency_ms"]
                    and a["test_accuracy"] > b["test_accuracy"]))

    return {b["name"] for b in rows if not any(beats(a, b) for a in rows if a is not b)}


def test_pareto_front_matches_brute_force():
    import lprnet_edge.report.render as report

    rng = np.random.default_rng(3)
    for _ in range(20):
        rows = [{"name": f"v{i}", "latency_ms": float(rng.integers(1, 8)),
                 "test_accuracy": float(rng.integers(80, 90)) / 100} for i in range(9)]
        assert set(report.pareto_front(rows)) == _brute_front(rows)


def test_plot_labels_do_not_overlap_in_a_cluster(tmp_path):
    """Seven variants on (almost) the same point, as same-graph variants are: every label
    is drawn, inside the axes, and no two labels overlap."""
    import lprnet_edge.report.render as report

    rows = []
    for i in range(7):  # the cluster
        rows.append({"name": f"same-graph-variant-{i}", "latency_ms": 30.0 + 0.05 * i,
                     "test_accuracy": 0.894 + 0.0005 * (i % 3),
                     "stored_bytes": 60_000 + 90_000 * i})
    rows += [{"name": "channels-dead", "latency_ms": 22.0, "test_accuracy": 0.894,
              "stored_bytes": 521_000},
             {"name": "channels-small", "latency_ms": 15.0, "test_accuracy": 0.893,
              "stored_bytes": 82_000},
             {"name": "int8", "latency_ms": 40.0, "test_accuracy": 0.896,
              "stored_bytes": 243_000}]
    png = tmp_path / "plot.png"
    info = report.plot(png, rows, {"backend": "tvm-tuned", "trials": 200})
    assert png.stat().st_size > 10_000
    assert set(info["labels"]) == {r["name"] for r in rows}
    assert info["texts"] == len(rows)  # one label each (rejected placements are removed)
    assert set(info["front"]) == _brute_front(rows)
    boxes = list(info["labels"].values())
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            disjoint = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
            assert disjoint, (a, b)


def test_compare_calibrators_tiny(tiny_model):
    """Every calibrator, with and without the fp32 head, measured on the evaluation set;
    the percentile/head-fp32 row is the report's int8-sim configuration."""
    import lprnet_edge.report.calibrators as report
    from lprnet_edge.compress.configs import QuantizeConfig
    from lprnet_edge.compress.quantize import quantize
    from lprnet_edge.model.calib import accuracy

    cal, test = _sets()
    res = report.compare_calibrators(tiny_model, cal, test, log=lambda m: None)
    got = {(r["calibrator"], r["head_fp32"]): r for r in res["rows"]}
    assert set(got) == {(c, h) for c in report.CALIBRATORS for h in (True, False)}
    for r in res["rows"]:
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["agreement_with_original"] <= 1
        assert 0 < r["threshold_over_max_median"] <= 1.0 + 1e-9
    assert got[("minmax", True)]["threshold_over_max_median"] == pytest.approx(1.0)
    train, _ = cal.split(0.3, 0)
    qm = quantize(tiny_model, QuantizeConfig(mode="int8", calibrator="percentile",
                                             fallback_layers=("container.0",)), train).module
    assert got[("percentile", True)]["test_accuracy"] == accuracy(qm, test)
    assert res["test_images"] == len(test.labels)


def test_report_command_registered(cli_runner):
    r = cli_runner("report", "--help")
    assert r.exit_code == 0 and "--quick" in r.output
    for opt in ("--trials", "--refresh-latency", "--calibrators", "--variant"):
        assert opt in r.output
    assert "[default: 200" in r.output  # --trials shows its default
    r = cli_runner("compress", "--help")
    assert r.exit_code == 0 and "--channels" in r.output


def test_report_command_rejects_inconsistent_options(cli_runner, tmp_path):
    assert_user_error(cli_runner("report", "--trials", "4", "--out", tmp_path),
                      "--trials applies to --latency tvm")
    assert_user_error(cli_runner("report", "--refresh-latency", "--out", tmp_path),
                      "no compression-report.json")
    assert_user_error(cli_runner("report", "--variant", "original", "--out", tmp_path),
                      "--variant applies to --refresh-latency")


def test_unequal_tuning_budgets_are_not_compared(tiny_report):
    """Rows whose workloads got different numbers of tuning records: no latency ratio, and
    the table says why instead of printing one."""
    import lprnet_edge.report.latency as lat
    import lprnet_edge.report.variants as report

    out, rep, _cal, _test = tiny_report
    rows = rep["variants"][:2]
    for r, records in zip(rows, (40, 8), strict=True):
        r.update(latency_backend="tvm-tuned", artifact_params_bytes=1000,
                 latency_tvm={"trials_budget": 40, "records_applied": records, "build_s": 1.0,
                              "tuning": {"tasks": 12, "tasks_tuned": 12}})
    check = lat.budget_check(rows)
    assert check["comparable"] is False and "records applied differ" in check["reason"]
    for r in rows:
        r["latency_comparable"] = check["comparable"]
    lat.latency_ratios(rows)
    assert all(r["latency_ratio"] is None for r in rows)
    rep["variants"] = rows
    rep["latency"] = dict(rep["latency"], budget=check)
    report._save(out, rep)
    md = (out / "compression-report.md").read_text(encoding="utf-8")
    assert "**Not compared: unequal tuning budgets**" in md
    assert "not compared (unequal tuning)" in md


def test_report_builds_accept_the_accuracy_guard(tmp_path):
    """The report builds for latency and measures accuracy on test/ itself: a variant that
    changes the model accepts the build's calib/ guard explicitly (else a lossy variant has
    no latency), and one that does not never turns the build into a search."""
    import lprnet_edge.report.latency as lat
    import lprnet_edge.report.variants as report
    from lprnet_edge.compress.configs import PruneConfig, QuantizeConfig

    ident = torch.nn.Identity()
    lossy = report.Variant("sparse70+int8w", "", ident, ident, {}, "fp32",
                           PruneConfig(kind="unstructured", sparsity=0.7),
                           QuantizeConfig(mode="int8-weights"))
    opts = lat.tvm_build_options(lossy, tmp_path, tmp_path / "w.pth", None)
    assert opts.changes_model and not opts.searching
    assert opts.max_accuracy_drop == lat.REPORT_ACCURACY_BUDGET >= 100
    plain = report.Variant("original", "", ident, ident, {}, "fp32")
    opts = lat.tvm_build_options(plain, tmp_path, tmp_path / "w.pth", None)
    assert opts.max_accuracy_drop is None and not opts.changes_model and not opts.searching


def test_plot_lists_far_off_variants_instead_of_drawing_them(tmp_path):
    """A variant that lost far more than any budget is named under the plot, so the
    variants that matter are not squeezed into one line."""
    import lprnet_edge.report.render as report

    rows = [{"name": f"v{i}", "latency_ms": 1.0 + 0.3 * i, "test_accuracy": 0.89 + 0.002 * i,
             "accuracy_change_points": 0.2 * i, "stored_bytes": 100_000 * (i + 1)}
            for i in range(4)]
    lost = -(report.OFF_SCALE_POINTS + 1)
    rows.append({"name": "collapsed", "latency_ms": 0.5, "test_accuracy": 0.89 + lost / 100,
                 "accuracy_change_points": lost, "stored_bytes": 50_000})
    info = report.plot(tmp_path / "p.png", rows, {"backend": "tvm"})
    assert info["off_scale"] == ["collapsed"] and "collapsed" not in info["labels"]
    assert set(info["labels"]) == {f"v{i}" for i in range(4)}
    assert "collapsed" not in info["front"] and info["front"]
