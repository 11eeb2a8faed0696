"""The command line: help everywhere, and user mistakes as ``Error: ...`` without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import REPO, assert_user_error, copy_images

from lprnet_edge.runtime.errors import DataError, WeightsError

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_cache")


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()):
    """Every (path, command) of the tree, groups included."""
    for name, cmd in sorted(group.commands.items()):
        if getattr(cmd, "hidden", False):
            continue
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from command_paths(cmd, prefix + (name,))


def test_root_help_and_version(cli_runner):
    for flag in ("--help", "-h"):
        r = cli_runner(flag)
        assert r.exit_code == 0
        assert "Usage: lprnet-edge" in r.stdout and "Commands:" in r.stdout
    r = cli_runner("--version")
    assert r.exit_code == 0 and "lprnet-edge" in r.stdout
    from lprnet_edge import __version__

    assert __version__ in r.stdout


def test_help_on_every_command_with_examples(cli_runner, cli_root):
    paths = list(command_paths(cli_root))
    names = {p for p, _ in paths}
    assert {("eval",), ("recognize",), ("weights",), ("weights", "download"),
            ("weights", "path")} <= names
    for path, cmd in paths:
        r = cli_runner(*path, "--help")
        assert r.exit_code == 0, (path, r.output)
        assert f"Usage: lprnet-edge {' '.join(path)}" in r.stdout, r.stdout
        assert "Traceback" not in r.output
        if not isinstance(cmd, click.Group):
            assert "example" in r.stdout.lower(), f"`{' '.join(path)} --help` has no example"
            # Examples are runnable command lines of this program.
            assert f"lprnet-edge {path[0]}" in r.stdout, r.stdout


def test_every_command_module_is_on_the_root_group(cli_root):
    """Each cli/ module's COMMANDS are all reachable from the root group (plain imports: a
    broken module fails the import instead of silently dropping its commands)."""
    from lprnet_edge.cli import bench, build, device, finetune, inference, report, targets, tune

    for module in (inference, finetune, build, targets, tune, bench, device, report):
        for cmd in module.COMMANDS:
            assert cli_root.commands[cmd.name] is cmd, (module.__name__, cmd.name)


def test_unknown_command_and_option(cli_runner):
    assert_user_error(cli_runner("frobnicate"), "No such command")
    assert_user_error(cli_runner("eval", "--frobnicate"), "No such option")
    assert_user_error(cli_runner("eval"), "--data")  # a required option


# ---------------------------------------------------------------- bad inputs


@pytest.fixture
def corrupt_weights(tmp_path) -> Path:
    p = tmp_path / "corrupt.pth"
    p.write_bytes(os.urandom(2048))
    return p


@pytest.fixture
def ten_class_weights(tmp_path) -> Path:
    torch = pytest.importorskip("torch")
    from lprnet_edge.model.lprnet import LPRNet

    p = tmp_path / "ten.pth"
    torch.save(LPRNet(class_num=10).state_dict(), p)
    return p


def test_missing_files(cli_runner, tmp_path, test_images):
    missing = tmp_path / "missing"
    assert_user_error(cli_runner("recognize", missing / "a.jpg"), "a.jpg")
    assert_user_error(cli_runner("eval", "--data", missing), "missing")
    assert_user_error(cli_runner("eval", "--data", test_images[0].parent, "--weights",
                                 missing / "w.pth"), "w.pth")
    assert_user_error(cli_runner("recognize", test_images[0], "--artifact", missing), "missing")


def test_corrupt_weights(cli_runner, corrupt_weights, test_images):
    for args in (("recognize", test_images[0]), ("eval", "--data", test_images[0].parent)):
        r = cli_runner(*args, "--weights", corrupt_weights)
        assert_user_error(r, "not a readable PyTorch checkpoint", str(corrupt_weights))
        assert r.exit_code == WeightsError.exit_code


def test_wrong_class_count(cli_runner, ten_class_weights, test_images):
    r = cli_runner("recognize", test_images[0], "--weights", ten_class_weights)
    assert_user_error(r, "10 output classes")
    assert r.exit_code == WeightsError.exit_code


def test_no_weights_anywhere(cli_runner, test_images, monkeypatch):
    monkeypatch.delenv("LPRNET_EDGE_DATA", raising=False)
    r = cli_runner("recognize", test_images[0])
    assert_user_error(r, "lprnet-edge weights download")
    assert r.exit_code == WeightsError.exit_code


def test_empty_folder(cli_runner, tiny_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli_runner("eval", "--data", tmp_path / "empty", "--weights", tiny_checkpoint)
    assert_user_error(r, "no plate images")
    assert r.exit_code == DataError.exit_code


def test_non_image_files(cli_runner, tiny_checkpoint, tmp_path, test_images):
    notes = tmp_path / "notes.jpg"
    notes.write_text("this is not a picture")
    r = cli_runner("recognize", notes, "--weights", tiny_checkpoint)
    assert_user_error(r, "not a readable image")
    assert r.exit_code == DataError.exit_code
    root = copy_images(test_images[:2], tmp_path / "plates")
    (root / "labels.txt").write_text("x")
    r = cli_runner("eval", "--data", root, "--weights", tiny_checkpoint)
    assert_user_error(r, "labels.txt", "--skip-bad")
    assert r.exit_code == DataError.exit_code


def test_artifact_without_manifest(cli_runner, tmp_path, test_images):
    (tmp_path / "art").mkdir()
    r = cli_runner("recognize", test_images[0], "--artifact", tmp_path / "art")
    assert_user_error(r, "manifest.json")


def test_artifact_and_weights_together(cli_runner, tmp_path, tiny_checkpoint, test_images):
    (tmp_path / "art").mkdir()
    r = cli_runner("recognize", test_images[0], "--artifact", tmp_path / "art",
                   "--weights", tiny_checkpoint)
    assert_user_error(r, "not both")


def test_skip_bad_counts_skipped(cli_runner, tiny_checkpoint, tmp_path, test_images):
    root = copy_images(test_images[:3], tmp_path / "plates")
    (root / "README.txt").write_text("not an image")
    (root / "京A12345.jpg").write_bytes(b"\xff\xd8\xff broken")
    (root / "京AB#123.jpg").write_bytes(test_images[0].read_bytes())
    r = cli_runner("eval", "--data", root, "--weights", tiny_checkpoint, "--skip-bad", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["count"] == 3 and len(res["skipped"]) == 3  # [path, reason] pairs
    r = cli_runner("eval", "--data", root, "--weights", tiny_checkpoint, "--skip-bad")
    assert r.exit_code == 0, r.output
    assert "plates            3 (3 skipped)" in r.stdout
    # Each skipped file is named with its reason, in text and JSON.
    names = sorted(Path(p).name for p, _ in res["skipped"])
    assert names == sorted(["README.txt", "京A12345.jpg", "京AB#123.jpg"])
    assert all(reason for _, reason in res["skipped"])
    for name in names:
        assert name in r.stdout
    assert "skipped file" in r.stdout


def test_recognize_keeps_the_good_reads(cli_runner, tiny_checkpoint, tmp_path, test_images):
    """One bad image must not lose the reads of the good ones (issue 12 defect 5)."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = test_images[0]
    r = cli_runner("recognize", good, bad, "--weights", tiny_checkpoint, "--json")
    assert r.exit_code != 0 and "Error:" in r.stderr and "bad.jpg" in r.stderr
    assert [row["source"] for row in json.loads(r.stdout)] == [str(good)]
    r = cli_runner("recognize", good, bad, good, "--weights", tiny_checkpoint, "--json",
                   "--skip-bad")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["source"] for row in rows] == [str(good), str(bad), str(good)]
    assert "error" in rows[1] and "not a readable image" in rows[1]["error"]
    assert rows[0]["text"] == rows[2]["text"] and "error" not in rows[0]


def test_recognize_outputs(cli_runner, tiny_checkpoint, test_images):

    from lprnet_edge.model.reference import reference_recognizer

    rec = reference_recognizer(tiny_checkpoint)
    expected = rec.recognize(test_images[:2])
    r = cli_runner("recognize", *test_images[:2], "--weights", tiny_checkpoint, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert [g["text"] for g in got] == [e.text for e in expected]
    assert [g["source"] for g in got] == [str(p) for p in test_images[:2]]
    assert got[0]["confidence"] == pytest.approx(expected[0].confidence)
    r = cli_runner("recognize", *test_images[:2], "--weights", tiny_checkpoint)
    assert r.exit_code == 0 and "confidence" in r.stdout and test_images[1].name in r.stdout


# ---------------------------------------------------------------- the installed entry point


def run_entry_point(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "from lprnet_edge.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, **(env or {})})


def test_entry_point_errors_go_to_stderr(corrupt_weights, tmp_path):
    (tmp_path / "empty").mkdir()
    p = run_entry_point("eval", "--data", tmp_path / "empty", "--weights", corrupt_weights)
    assert p.returncode == WeightsError.exit_code, p.stderr
    assert p.stderr.startswith("Error: ") and "Traceback" not in p.stderr
    assert p.stdout == ""
    p = run_entry_point("recognize", tmp_path / "nope.jpg")
    assert p.returncode == 2 and "Error:" in p.stderr and "Traceback" not in p.stderr
    p = run_entry_point("--help")
    assert p.returncode == 0 and "weights" in p.stdout
