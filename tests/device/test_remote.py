"""Remote recognize / eval / bench on the current deployment, against a real sshd on
127.0.0.1 (x86): the host is the device (see ``host_device``), so the device's figures must be
exactly the local Recognizer's on the same artifact."""

from __future__ import annotations

import json
import shutil

import pytest
from host_device import make_device, ssh_args

from lprnet_edge.device.deploy import deploy
from lprnet_edge.device.remote import remote_bench, remote_eval, remote_recognize
from lprnet_edge.runtime.errors import DeviceError
from lprnet_edge.runtime.evaluate import evaluate
from lprnet_edge.runtime.recognizer import Recognizer

pytest_plugins = ["sshd_fixture", "host_device"]
pytestmark = pytest.mark.slow  # builds a TVM artifact once per session


def test_recognize_eval_bench_match_the_host(host_sshd, host_artifact, remote_dir, test_dir,
                                             test_images):
    dev = make_device(host_sshd, remote_dir)
    with pytest.raises(DeviceError, match="nothing is deployed"):
        remote_recognize(dev, test_images[:1])
    first = deploy(dev, host_artifact)

    # Same plates and confidences as the local Recognizer on the same artifact.
    local = Recognizer.from_artifact(host_artifact)
    res = remote_recognize(dev, test_images[:5])
    for r, p in zip(res, test_images[:5], strict=True):
        loc = local.recognize(p)
        assert r["source"] == str(p) and r["text"] == loc.text
        assert r["confidence"] == pytest.approx(loc.confidence, abs=1e-6)
    assert not list((remote_dir / "tmp").iterdir())  # uploads cleaned up

    # Same metrics as the local evaluation; sharded over 2 processes too.
    ref = evaluate(local, test_dir, limit=60).to_dict()
    for workers in (1, 2):
        got = remote_eval(dev, test_dir, limit=60, workers=workers)
        for k in ("count", "correct", "accuracy", "char_accuracy", "mean_edit_distance",
                  "per_region", "errors"):
            assert got.to_dict()[k] == ref[k], (k, workers)
        assert got.workers == workers and got.deployment == first.name
        assert got.machine == "x86_64" and got.data == str(test_dir)

    stats = remote_bench(dev, runs=5, warmup=1)
    assert stats.latency["runs"] == 5 and stats.latency["include_preprocess"]
    assert stats.latency["p50_ms"] > 0
    assert stats.mode == "ssh" and stats.machine == "x86_64"
    assert stats.to_dict()["deployment"] == first.name
    dev.conn.close()


def test_cli_bench_host(host_sshd, host_artifact, remote_dir, cli_runner, tmp_path):
    """`lprnet-edge bench --host` (SSH, the deployed Recognizer) and `--host --tunnel`."""
    from conftest import assert_user_error

    make_device(host_sshd, remote_dir).conn.close()
    args = ssh_args(host_sshd, remote_dir)
    other = tmp_path / "other"
    shutil.copytree(host_artifact, other)
    assert cli_runner("deploy", host_artifact, *args).exit_code == 0
    r = cli_runner("bench", "--artifact", host_artifact, *args, "--runs", "3", "--warmup", "1",
                   "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mode"] == "ssh"
    # Without --artifact: the deployed model.
    r = cli_runner("bench", *args, "--runs", "2", "--warmup", "0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["runs"] == 2
    assert_user_error(cli_runner("bench"), "give --artifact")
    r = cli_runner("bench", "--artifact", host_artifact, *args, "--tunnel", "--runs", "3")
    assert r.exit_code == 0, r.output
    assert "time_evaluator over RPC + SSH tunnel" in r.stdout and "p50 ms" in r.stdout
    # A different artifact than the deployed one is not silently timed.
    (other / "params.npz").write_bytes((other / "params.npz").read_bytes())
    m = json.loads((other / "manifest.json").read_text())
    m["files"]["params.npz"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    assert_user_error(cli_runner("bench", "--artifact", other, *args), "deploy it first")


