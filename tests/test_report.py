"""Report generation on a tiny run: files, figures, goals, CLI wiring."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lprnet_edge.calib import CalibrationSet, EvalSet  # noqa: E402

PLATES = ["京A12345", "沪B6789C", "粤C1D234", "川A0K123"]


def _sets():
    from lprnet_edge.preprocess import Preprocess

    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 255, (36, 136, 3), dtype=np.uint8) for _ in range(10)]
    pre = Preprocess()
    x = np.concatenate([pre(r) for r in raw])
    labels = [PLATES[i % 4] for i in range(10)]
    cal = CalibrationSet(x, labels, [f"{i}.jpg" for i in range(10)], raw=raw)
    return cal, EvalSet(x[:6], labels[:6], None)


def test_report_tiny_run(tiny_model, tmp_path, monkeypatch):
    import lprnet_edge.report as report

    monkeypatch.setattr(report, "torch_latency", lambda m, **k: {"p50_ms": 1.0})
    cal, test = _sets()
    rep = report.run_report(tmp_path, quick=True, model=tiny_model, calib=cal, test=test,
                            selection=True, log=lambda m: None)
    for suffix in ("md", "json", "png"):
        assert (tmp_path / f"compression-report.{suffix}").stat().st_size > 0
    data = json.loads((tmp_path / "compression-report.json").read_text(encoding="utf-8"))
    names = [r["name"] for r in data["variants"]]
    assert names[0] == "original" and "sparse80+fp16" in names and "int8-sim" in names
    assert any(n.startswith("channels-") for n in names)
    orig = data["variants"][0]
    assert orig["accuracy_change_points"] == 0 and orig["size_ratio"] == 1
    sp = next(r for r in data["variants"] if r["name"] == "sparse80+fp16")
    assert sp["stored_bytes"] < orig["stored_bytes"] / 4
    ch = next(r for r in data["variants"] if r["name"] == "channels-b23x0.5+kd")
    assert ch["flops_ratio"] > 1.3
    assert set(data["goals"]) == {"size_8x_within_0.5pt", "flops_1.5x_within_1pt"}
    assert data["selection"]["candidates"] and len(data["selection"]["candidates"]) == len(names)
    md = (tmp_path / "compression-report.md").read_text(encoding="utf-8")
    assert "| original |" in md and "Goals" in md
    assert rep["variants"][0]["latency_backend"] == "torch"


def test_report_command_registered(cli_runner):
    r = cli_runner("report", "--help")
    assert r.exit_code == 0 and "--quick" in r.output
    r = cli_runner("compress", "--help")
    assert r.exit_code == 0 and "--channels" in r.output
