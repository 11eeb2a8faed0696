"""Fine-tuning: short real runs on a handful of calib/ plates (seconds), the data checks, the
checkpoint and its record, reproducibility, Ctrl-C, and the split every later stage sees."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import assert_user_error, copy_images  # noqa: E402

from lprnet_edge.model.calib import CalibrationSet  # noqa: E402
from lprnet_edge.model.checkpoint import load_model  # noqa: E402
from lprnet_edge.model.finetune import (  # noqa: E402
    FinetuneConfig,
    finetune,
    load_split,
    record_path,
    run_finetune,
)
from lprnet_edge.model.plates import load_plates  # noqa: E402
from lprnet_edge.runtime.errors import DataError, LprnetEdgeError  # noqa: E402


@pytest.fixture(scope="module")
def plates(data_dir: Path, tmp_path_factory) -> Path:
    """12 calib/ crops, plus a corrupt image and a label outside the charset."""
    d = copy_images(sorted((data_dir / "calib").glob("*.jpg"))[:12],
                    tmp_path_factory.mktemp("ft") / "plates")
    (d / "京A12345.jpg").write_bytes(b"not a jpeg")
    (d / "京A12#45.jpg").write_bytes((data_dir / "calib" / next(iter(
        sorted(p.name for p in (data_dir / "calib").glob("*.jpg"))))).read_bytes())
    return d


@pytest.fixture(scope="module")
def small_test(data_dir: Path, tmp_path_factory) -> Path:
    """A few test/ images: forgetting is measured there, never trained on."""
    return copy_images(sorted((data_dir / "test").glob("*.jpg"))[:16],
                       tmp_path_factory.mktemp("ft") / "test")


def _cfg(plates: Path, small_test: Path, **kw) -> FinetuneConfig:
    kw = {"epochs": 2, "batch_size": 8, "threads": 1, "test_dir": small_test, **kw}
    return FinetuneConfig(data=plates, val_split=0.25, **kw)


def test_bad_files_are_listed_with_the_reason(plates: Path):
    data = load_plates(plates)
    assert len(data) == 12 and data.raw is not None and data.x.shape == (12, 3, 24, 94)
    why = dict((Path(f).name, r) for f, r in data.skipped)
    assert "not a readable image" in why["京A12345.jpg"]
    assert "not in charset" in why["京A12#45.jpg"]


def test_a_folder_without_usable_plates_is_a_clear_error(tmp_path: Path, plates: Path):
    with pytest.raises(DataError, match="no plate images"):
        load_plates(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "京A12345.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match="no usable labelled plate.*not a readable image"):
        load_plates(bad)


def test_csv_labels(tmp_path: Path, plates: Path):
    names = sorted(p.name for p in plates.glob("*.jpg"))[:3]
    rows = ["file,text", f"{plates / names[0]},京A12345", f"{plates / names[1]},京Q!",
            f"{plates / 'missing.jpg'},京A12345", "only-one-cell"]
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = load_plates(csv)
    assert data.labels == ["京A12345"]
    reasons = " ".join(r for _, r in data.skipped)
    assert "not in charset" in reasons and "no such image" in reasons
    assert "expected 'file,text'" in reasons


def test_a_fixed_split_is_the_one_every_stage_gets(plates: Path, small_test: Path):
    data = load_split(_cfg(plates, small_test))
    train, val = data.split(0.3, 0)  # what quantize / guard / select ask for
    assert (len(train), len(val)) == (9, 3)
    assert set(val.names) == {data.names[i] for i in data.val_index}
    assert not set(train.names) & set(val.names)
    assert train.val_index is None  # a subset splits by its own arguments again
    other = load_split(_cfg(plates, small_test, seed=1))
    assert other.val_index != data.val_index


def test_finetune_run_is_reproducible_and_keeps_dead_filters(weights_path: Path, plates: Path,
                                                             small_test: Path):
    model = load_model(weights_path)
    cfg = _cfg(plates, small_test)
    a = finetune(model, cfg, progress=None)
    b = finetune(model, cfg, progress=None)
    assert len(a.history) == 2 and a.history[-1].val_accuracy is not None
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    original = model.state_dict()
    moved = any(not torch.equal(sa[k], original[k]) for k in sa)
    mixed = a.interpolation
    assert moved == (a.best_epoch > 0 and mixed is not None and mixed.a > 0)
    for k, w in original.items():
        if k.endswith("weight") and w.ndim == 4:
            dead = w.flatten(1).abs().amax(1) == 0
            assert torch.all(sa[k][dead] == 0), k  # the compiler still folds them away
    rec = a.to_dict()
    assert (rec["split"]["train"], rec["split"]["val"]) == (9, 3)
    assert rec["accuracy"]["test"]["before"] is not None
    assert len(rec["data"]["files_sha256"]) == 64 and len(rec["data"]["skipped"]) == 2
    if mixed is not None:  # chosen on the validation split: its accuracy is the record's
        kept = next(p for p in rec["interpolation"]["sweep"] if p["a"] == mixed.a)
        assert kept["val_accuracy"] == rec["accuracy"]["val"]["after"] == a.val_after


def test_cli_writes_a_checkpoint_the_toolchain_takes(cli_runner, plates: Path,
                                                     small_test: Path, weights_path: Path,
                                                     tmp_path: Path):
    out = tmp_path / "mine.pth"
    r = cli_runner("finetune", "--data", plates, "--epochs", "2", "--threads", "1",
                   "--test-dir", small_test, "--weights", weights_path, "-o", out)
    assert r.exit_code == 0, r.output
    assert "skipped 京A12345.jpg: not a readable image" in r.stderr
    assert "validation (2 plates)" in r.stdout and "test/ (evaluated only)" in r.stdout
    rec = json.loads(record_path(out).read_text(encoding="utf-8"))
    assert rec["base_weights"]["file"] == weights_path.name
    assert rec["split"]["val"] == 2 and rec["config"]["seed"] == 0
    assert load_model(out).class_num == 68
    r = cli_runner("eval", "--weights", out, "--data", small_test, "--json")
    assert r.exit_code == 0, r.output
    _provinces_table_reads_the_held_out_split(record_path(out), weights_path, out, rec=rec)


def _provinces_table_reads_the_held_out_split(record: Path, *weights: Path, rec: dict) -> None:
    """benchmarks/finetune_provinces.py measures each checkpoint on the record's split."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "finetune_provinces.py"),
                          str(record), *map(str, weights)], capture_output=True, text=True,
                         check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [w.name for w in weights]
    held = {Path(n).name[:1] for n in rec["split"]["val_files"]}
    seen = [int(cell.split("/")[1]) for cell in rows[0].split(" | ")[1:-2]]
    assert len(seen) == len(held) and sum(seen) == rec["split"]["val"]


def test_cli_bad_folder(cli_runner, tmp_path: Path, weights_path: Path):
    (tmp_path / "empty").mkdir()
    r = cli_runner("finetune", "--data", tmp_path / "empty", "--weights", weights_path,
                   "-o", tmp_path / "o.pth")
    assert_user_error(r, "no plate images")
    assert r.exit_code == DataError.exit_code and not (tmp_path / "o.pth").exists()


def test_cli_refuses_the_test_split(cli_runner, test_dir: Path, weights_path: Path,
                                    tmp_path: Path):
    r = cli_runner("finetune", "--data", test_dir, "--weights", weights_path,
                   "-o", tmp_path / "o.pth")
    assert_user_error(r, "refusing to calibrate / fine-tune")


def test_ctrl_c_keeps_the_best_weights_written_so_far(weights_path: Path, plates: Path,
                                                      small_test: Path, tmp_path: Path):
    seen = []

    def interrupt_at_second_epoch(rec) -> None:  # noqa: ANN001
        seen.append(rec)
        if rec.epoch == 2:
            raise KeyboardInterrupt

    out = tmp_path / "best.pth"
    res, record = run_finetune(load_model(weights_path), _cfg(plates, small_test, epochs=5),
                               weights_path, out, progress=interrupt_at_second_epoch)
    assert res.stopped == "interrupted" and len(seen) == 2
    on_disk = torch.load(out, weights_only=True)
    assert on_disk["epoch"] == res.best_epoch
    sd = res.model.state_dict()
    assert all(torch.equal(on_disk["state_dict"][k], sd[k]) for k in sd)
    assert json.loads(record.read_text(encoding="utf-8"))["stopped"] == "interrupted"


def test_calibration_set_split_without_a_partition_is_unchanged():
    x = np.zeros((10, 3, 24, 94), np.float32)
    cs = CalibrationSet(x, ["京A12345"] * 10, [f"{i}.jpg" for i in range(10)])
    train, val = cs.split(0.3, 0)
    assert len(val) == 3 and len(train) == 7


def test_learning_without_forgetting_and_frozen_layers(weights_path: Path, plates: Path,
                                                       small_test: Path):
    """A run with the pull towards the pretrained outputs, the first layers frozen and test/
    not evaluated: frozen layers are bit-identical, the history says how far it moved."""
    model = load_model(weights_path)
    res = finetune(model, _cfg(plates, small_test, distill=1.0, freeze_below=5, lr=0.05,
                               evaluate_test=False), progress=None)
    assert res.test_before is None and res.test_after is None
    start, now = model.state_dict(), res.model.state_dict()
    for k in start:
        if k.startswith(("backbone.0.", "backbone.4.")):
            assert torch.equal(start[k], now[k]), k
    last = res.history[-1]
    assert last.val_drift is not None and last.val_drift >= 0
    assert last.val_kept is None or 0 <= last.val_kept <= 1
    rec = res.to_dict()
    assert rec["config"]["distill"] == 1.0 and rec["accuracy"]["test"]["after"] is None


def test_balance_draws_each_province_as_often_as_asked():
    from lprnet_edge.model.finetune import province_draw

    labels = ["苏A1"] * 6 + ["皖B2"] * 2 + ["沪C3"]
    assert province_draw(labels, 0.0) is None
    even = province_draw(labels, 1.0)
    per = {c: float(sum(w for w, lab in zip(even, labels, strict=True) if lab[0] == c))
           for c in "苏皖沪"}
    assert per == pytest.approx({"苏": 1 / 3, "皖": 1 / 3, "沪": 1 / 3})
    half = province_draw(labels, 0.5)
    assert half.sum() == pytest.approx(1)
    assert half[0] < half[6] < half[8]  # a rarer province's plate is drawn more often
    with pytest.raises(LprnetEdgeError, match="--balance"):
        FinetuneConfig(data=Path("."), balance=2)


def test_a_balanced_run_trains_on_drawn_plates(weights_path: Path, plates: Path,
                                               small_test: Path):
    res = finetune(load_model(weights_path), _cfg(plates, small_test, epochs=1, balance=1.0,
                                                  evaluate_test=False), progress=None)
    assert res.to_dict()["config"]["balance"] == 1.0
    assert res.history[0].loss is not None and res.history[0].loss > 0


def test_frame_kl_is_zero_only_for_the_same_outputs():
    from lprnet_edge.model.training import frame_kl

    a = torch.randn(2, 68, 18)
    assert float(frame_kl(a, a, 2.0)) == pytest.approx(0, abs=1e-6)
    assert float(frame_kl(a, torch.randn(2, 68, 18), 2.0)) > 0


def test_bad_regularisation_settings_are_refused(plates: Path):
    with pytest.raises(LprnetEdgeError, match="--distill"):
        FinetuneConfig(data=plates, distill=-1)


def test_cli_regularisation_options_reach_the_record(cli_runner, plates: Path,
                                                     weights_path: Path, tmp_path: Path):
    out = tmp_path / "lwf.pth"
    r = cli_runner("finetune", "--data", plates, "--epochs", "1", "--threads", "1",
                   "--distill", "0.5", "--anchor", "0.001", "--freeze-below", "5",
                   "--lr", "0.02", "--interpolate", "0.5", "--no-test",
                   "--weights", weights_path, "-o", out)
    assert r.exit_code == 0, r.output
    rec = json.loads(record_path(out).read_text(encoding="utf-8"))
    cfg = rec["config"]
    assert (cfg["distill"], cfg["anchor"], cfg["freeze_below"], cfg["lr"],
            cfg["interpolate"]) == (0.5, 0.001, 5, 0.02, 0.5)
    assert cfg["evaluate_test"] is False and rec["accuracy"]["test"]["after"] is None
    assert rec["history"][0]["val_drift"] is not None


def test_cli_help_states_the_library_defaults(plates: Path):
    """The options left out take FinetuneConfig's defaults: the help must say the same."""
    import re

    from lprnet_edge.cli.finetune import finetune_cmd

    defaults = FinetuneConfig(data=plates)
    checked = 0
    for param in finetune_cmd.params:
        field = param.name
        if field in ("epochs", "patience", "lr", "distill", "anchor", "freeze_below",
                     "balance"):
            stated = re.search(r"\[default: ([^\]]+)\]", param.help).group(1)
            assert float(stated) == getattr(defaults, field), field
            checked += 1
        elif field == "distill_read_only":
            assert ("[default: read-only]" in param.help) == defaults.distill_read_only
            checked += 1
        elif field == "threads":
            assert param.default == defaults.threads
            checked += 1
        elif field == "interpolate":
            assert param.default == "auto" and defaults.interpolate is None
            checked += 1
    assert checked == 10


def _moved(model, seed: int = 0):  # noqa: ANN001, ANN202
    """A copy of ``model`` with every weight moved by a few percent, dead filters kept dead:
    an end point as far from the pretrained one as a fine-tuning goes."""
    g = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    return other


def test_interpolation_is_the_line_between_the_two_models(weights_path: Path, plates: Path,
                                                         small_test: Path):
    from lprnet_edge.model.calib import accuracy
    from lprnet_edge.model.interpolate import GRID, blend, choose, interpolate
    from lprnet_edge.runtime.charset import load_charset

    start = load_model(weights_path)
    end = _moved(start)
    s0, s1 = start.state_dict(), end.state_dict()
    assert all(torch.equal(interpolate(start, end, 0.0).state_dict()[k], s0[k]) for k in s0)
    assert all(torch.equal(interpolate(start, end, 1.0).state_dict()[k], s1[k]) for k in s1)
    half = interpolate(start, end, 0.5).state_dict()
    for k, w in s0.items():
        if w.is_floating_point():
            assert torch.allclose(half[k], (w + s1[k]) / 2, atol=1e-6), k
        if k.endswith("weight") and w.ndim == 4:
            dead = w.flatten(1).abs().amax(1) == 0
            assert torch.all(half[k][dead] == 0), k  # zero at both ends: still folded away
    cs = load_charset()
    val = load_split(_cfg(plates, small_test)).split()[1]
    assert GRID[0] == 0 and GRID[-1] == 1
    model, interp = blend(start, end, val, cs, grid=(0.0, 0.25, 0.5, 0.75))
    assert [p.a for p in interp.sweep] == [0, 0.25, 0.5, 0.75, 1]  # 1: always measured
    assert interp.finetuned_val_accuracy == pytest.approx(accuracy(end, val, cs))
    assert interp.sweep[0].val_accuracy == pytest.approx(accuracy(start, val, cs))
    assert interp.sweep[0].val_drift == 0 and interp.a == choose(interp.sweep, len(val))
    best = max(p.val_accuracy for p in interp.sweep)
    ties = [p.a for p in interp.sweep if p.val_accuracy >= best - 1 / len(val) - 1e-9]
    assert interp.a == min(ties) and not interp.given
    assert accuracy(model, val, cs) == pytest.approx(
        next(p.val_accuracy for p in interp.sweep if p.a == interp.a))
    _, given = blend(start, end, val, cs, 0.33, grid=(0.0,))
    assert given.a == 0.33 and given.given and 0.33 in [p.a for p in given.sweep]


def test_cli_refuses_a_mixing_weight_outside_0_1(cli_runner, plates: Path,
                                                 weights_path: Path, tmp_path: Path):
    r = cli_runner("finetune", "--data", plates, "--interpolate", "1.5",
                   "--weights", weights_path, "-o", tmp_path / "o.pth")
    assert r.exit_code == 2 and "--interpolate" in r.output
    assert not (tmp_path / "o.pth").exists()


def test_auto_mixing_counts_one_plate_fewer_as_a_tie():
    from lprnet_edge.model.interpolate import Point, choose

    def points(correct: list[int], n: int) -> tuple[Point, ...]:
        return tuple(Point(i / (len(correct) - 1), c / n, None, float(i))
                     for i, c in enumerate(correct))

    assert choose(points([5, 120, 130, 131], 147), 147) == pytest.approx(2 / 3)
    assert choose(points([5, 120, 129, 131], 147), 147) == 1.0
    assert choose(points([5, 131, 120, 131], 147), 147) == pytest.approx(1 / 3)
