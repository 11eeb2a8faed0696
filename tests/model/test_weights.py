"""Finding, downloading (file:// and a local HTTP server) and verifying the weights."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_user_error

from lprnet_edge.model.weights import SIRIUS, WeightsSpec, cache_dir, download, resolve_weights
from lprnet_edge.runtime.errors import LprnetEdgeError, WeightsError

pytestmark = pytest.mark.usefixtures("fresh_cache")


def spec_for(data: bytes, name: str = "model.pth") -> WeightsSpec:
    return WeightsSpec("test", "http://127.0.0.1:9/unused", hashlib.sha256(data).hexdigest(),
                       name)


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ---------------------------------------------------------------- a local HTTP server


class _Server:
    """A bounded HTTP server on 127.0.0.1 (port 0) serving ``routes`` and counting requests."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.lie_length: dict[str, int] = {}  # path -> Content-Length announced
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                length = server.lie_length.get(self.path, len(body))
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    with _Server() as s:
        yield s


# ---------------------------------------------------------------- download


def test_download_from_file_url(tmp_path):
    data = os.urandom(300_000)
    src = tmp_path / "mirror" / "weights.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    dest_dir = tmp_path / "cache"
    seen = []
    path = download(spec_for(data), url=src.as_uri(), dest_dir=dest_dir,
                    progress=lambda d, t: seen.append((d, t)))
    assert path == dest_dir / "model.pth"
    assert path.read_bytes() == data
    assert files_in(dest_dir) == ["model.pth"]  # no temporary file left
    assert seen and seen[-1] == (len(data), len(data))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_download_real_weights_into_the_default_cache(weights_path, monkeypatch):
    # LPRNET_EDGE_CACHE points at a per-test folder (conftest): the "user cache" here.
    path = download(SIRIUS, url=weights_path.as_uri())
    assert path == cache_dir() / "weights" / SIRIUS.filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SIRIUS.sha256
    monkeypatch.delenv("LPRNET_EDGE_DATA", raising=False)
    assert resolve_weights() == path


def test_download_over_http(tmp_path, server):
    data = os.urandom(200_000)
    server.routes["/w/model.pth"] = data
    seen = []
    path = download(spec_for(data), url=server.url("/w/model.pth"), dest_dir=tmp_path,
                    progress=lambda d, t: seen.append((d, t)), timeout=10)
    assert path.read_bytes() == data
    assert server.requests == ["/w/model.pth"]
    assert seen[-1] == (len(data), len(data))  # the total comes from Content-Length


def test_cached_file_is_reused(tmp_path, server):
    data = os.urandom(50_000)
    server.routes["/m"] = data
    spec = spec_for(data)
    first = download(spec, url=server.url("/m"), dest_dir=tmp_path, timeout=10)
    mtime = first.stat().st_mtime_ns
    second = download(spec, url=server.url("/m"), dest_dir=tmp_path, timeout=10)
    assert second == first and first.stat().st_mtime_ns == mtime
    assert server.requests == ["/m"]  # verified from disk, not fetched again
    download(spec, url=server.url("/m"), dest_dir=tmp_path, force=True, timeout=10)
    assert server.requests == ["/m", "/m"]


def test_damaged_cache_is_replaced(tmp_path, server):
    data = os.urandom(50_000)
    server.routes["/m"] = data
    (tmp_path / "model.pth").write_bytes(data[:1000])
    path = download(spec_for(data), url=server.url("/m"), dest_dir=tmp_path, timeout=10)
    assert path.read_bytes() == data and server.requests == ["/m"]


def test_sha_mismatch_is_refused_and_leaves_nothing(tmp_path, server):
    good = os.urandom(10_000)
    server.routes["/evil"] = b"not the weights" * 100
    with pytest.raises(WeightsError, match="sha256") as e:
        download(spec_for(good), url=server.url("/evil"), dest_dir=tmp_path / "c", timeout=10)
    assert "refusing" in str(e.value)
    assert files_in(tmp_path / "c") == []
    src = tmp_path / "wrong.bin"
    src.write_bytes(b"x" * 5000)
    with pytest.raises(WeightsError, match="sha256"):
        download(spec_for(good), url=src.as_uri(), dest_dir=tmp_path / "c")
    assert files_in(tmp_path / "c") == []


def test_sha_mismatch_keeps_a_previous_good_file(tmp_path, server):
    data = os.urandom(10_000)
    spec = spec_for(data)
    (tmp_path / "model.pth").write_bytes(data)
    server.routes["/bad"] = b"garbage"
    with pytest.raises(WeightsError):
        download(spec, url=server.url("/bad"), dest_dir=tmp_path, force=True, timeout=10)
    assert (tmp_path / "model.pth").read_bytes() == data
    assert files_in(tmp_path) == ["model.pth"]


def test_truncated_transfer(tmp_path, server):
    data = os.urandom(100_000)
    server.routes["/cut"] = data[:40_000]
    server.lie_length["/cut"] = len(data)
    with pytest.raises(WeightsError, match="cut short"):
        download(spec_for(data), url=server.url("/cut"), dest_dir=tmp_path, timeout=10)
    assert files_in(tmp_path) == []


def test_http_errors_and_bad_urls(tmp_path, server):
    spec = spec_for(b"x")
    with pytest.raises(WeightsError, match="cannot download.*404"):
        download(spec, url=server.url("/missing"), dest_dir=tmp_path, timeout=10)
    with pytest.raises(WeightsError, match="cannot download"):
        download(spec, url=(tmp_path / "nope.pth").as_uri(), dest_dir=tmp_path)
    with pytest.raises(WeightsError, match="cannot download"):
        download(spec, url="not a url", dest_dir=tmp_path)
    assert files_in(tmp_path) == []


def test_unresponsive_server_times_out(tmp_path):
    # Accepts connections but never answers: the download must give up, not hang.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(WeightsError, match="cannot download"):
            download(spec_for(b"x"), url=f"http://127.0.0.1:{port}/w", dest_dir=tmp_path,
                     timeout=1.0)
        assert time.monotonic() - t0 < 20
    assert files_in(tmp_path) == []


def test_unwritable_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(WeightsError, match="cannot write"):
        download(spec_for(b"x"), url="file:///dev/null", dest_dir=blocker / "weights")


def test_cli_download_file_url(cli_runner, weights_path, tmp_path):
    r = cli_runner("weights", "download", "--url", weights_path.as_uri())
    assert r.exit_code == 0, r.output
    cached = cache_dir() / "weights" / SIRIUS.filename
    assert str(cached) in r.stdout and "verified" in r.stdout
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == SIRIUS.sha256
    # Again: served from the cache.
    r = cli_runner("weights", "download", "--url", (tmp_path / "gone.pth").as_uri())
    assert r.exit_code == 0, r.output


def test_cli_download_over_http(cli_runner, weights_path, server):
    server.routes["/Final_LPRNet_model.pth"] = weights_path.read_bytes()
    r = cli_runner("weights", "download", "--url", server.url("/Final_LPRNet_model.pth"))
    assert r.exit_code == 0, r.output
    assert server.requests == ["/Final_LPRNet_model.pth"]
    assert (cache_dir() / "weights" / SIRIUS.filename).is_file()


def test_cli_download_wrong_file(cli_runner, tmp_path):
    bad = tmp_path / "Final_LPRNet_model.pth"
    bad.write_bytes(b"\x80\x02 not the published weights")
    r = cli_runner("weights", "download", "--url", bad.as_uri())
    assert_user_error(r, "sha256")
    assert r.exit_code == WeightsError.exit_code
    assert files_in(cache_dir() / "weights") == []


# ---------------------------------------------------------------- resolution order


def test_resolution_order(tmp_path, monkeypatch):
    def make(p: Path) -> Path:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"w")
        return p

    data = tmp_path / "data"
    monkeypatch.setenv("LPRNET_EDGE_DATA", str(data))
    with pytest.raises(WeightsError, match="weights download"):
        resolve_weights()
    cached = make(cache_dir() / "weights" / SIRIUS.filename)
    assert resolve_weights() == cached
    in_data = make(data / "weights" / SIRIUS.filename)
    assert resolve_weights() == in_data
    env = make(tmp_path / "env.pth")
    monkeypatch.setenv("LPRNET_EDGE_WEIGHTS", str(env))
    assert resolve_weights() == env
    explicit = make(tmp_path / "explicit.pth")
    assert resolve_weights(explicit) == explicit
    assert resolve_weights(str(explicit)) == explicit


def test_explicit_choices_that_do_not_exist_are_errors(tmp_path, monkeypatch):
    cached = cache_dir() / "weights" / SIRIUS.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"w")
    # A missing override is an error, never silently replaced by the cached file.
    with pytest.raises(WeightsError, match="--weights"):
        resolve_weights(tmp_path / "missing.pth")
    monkeypatch.setenv("LPRNET_EDGE_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match="LPRNET_EDGE_WEIGHTS"):
        resolve_weights()


def test_cli_weights_path_follows_the_overrides(cli_runner, weights_path, tmp_path,
                                                 monkeypatch):
    monkeypatch.setenv("LPRNET_EDGE_DATA", str(weights_path.parents[1]))
    r = cli_runner("weights", "path")
    assert r.exit_code == 0 and r.stdout.strip() == str(weights_path)
    other = tmp_path / "other.pth"
    shutil.copy(weights_path, other)
    monkeypatch.setenv("LPRNET_EDGE_WEIGHTS", str(other))
    assert cli_runner("weights", "path").stdout.strip() == str(other)
    third = tmp_path / "third.pth"
    third.write_bytes(b"x")
    assert cli_runner("weights", "path", "--weights", third).stdout.strip() == str(third)
    monkeypatch.setenv("LPRNET_EDGE_WEIGHTS", str(tmp_path / "missing.pth"))
    assert_user_error(cli_runner("weights", "path"), "missing.pth")


# ---------------------------------------------------------------- loading checks (torch)


@pytest.fixture
def model_io():
    pytest.importorskip("torch")
    from lprnet_edge.model import checkpoint as model_io

    return model_io


def test_load_real_weights(model_io, weights_path):
    model = model_io.load_model(weights_path)
    assert model.class_num == 68 and not model.training


def test_wrong_class_count(model_io, tmp_path):
    import torch

    from lprnet_edge.model.lprnet import LPRNet

    p = tmp_path / "ten.pth"
    torch.save(LPRNet(class_num=10).state_dict(), p)  # upstream format: a bare state dict
    with pytest.raises(WeightsError, match="10 output classes.*68") as e:
        model_io.load_model(p)
    assert "--charset" not in str(e.value)  # no such option (issue 12 defect 8)
    assert model_io.load_model(p, num_classes=10).class_num == 10


def test_a_missing_or_misshaped_weight_is_named(model_io, tmp_path):
    """Issue 12 defect 8: the message names the key, not just "Error(s) in loading"."""
    import torch

    p = tmp_path / "w.pth"
    sd = _tiny_state_dict()
    torch.save({k: v for k, v in sd.items() if k != "backbone.4.block.0.weight"}, p)
    with pytest.raises(WeightsError, match=r"missing backbone\.4\.block\.0\.weight"):
        model_io.load_model(p)
    bad = dict(sd)
    bad["backbone.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(bad, p)
    with pytest.raises(WeightsError, match=r"backbone\.0\.weight has shape \[64, 3, 5, 5\], "
                                           r"LPRNet expects \[64, 3, 3, 3\]"):
        model_io.load_model(p)
    torch.save({**sd, "extra.weight": torch.zeros(1)}, p)
    with pytest.raises(WeightsError, match=r"unexpected extra\.weight"):
        model_io.load_model(p)


def test_denormal_weights_are_flushed_at_load(model_io, weights_path):
    """34% of the published weights are subnormal floats (10x slower PyTorch on x86); the loader
    sets them to exact zeros, which changes no logit beyond float32 rounding."""
    import torch

    def subnormal(sd: dict) -> int:
        # By bit pattern: with FTZ/DAZ on (the loader turns it on) a subnormal compares as 0.
        bits = [v.contiguous().view(torch.int32) for v in sd.values()
                if v.dtype == torch.float32]
        return sum(int(((b & 0x7F800000) == 0).logical_and((b & 0x007FFFFF) != 0).sum())
                   for b in bits)

    raw, _meta = model_io.read_state_dict(weights_path)
    assert subnormal(raw) > 0  # the published checkpoint has them
    model = model_io.load_model(weights_path)
    assert subnormal(model.state_dict()) == 0
    from lprnet_edge.model.lprnet import LPRNet

    unflushed = LPRNet(class_num=68)
    unflushed.load_state_dict(raw)
    x = torch.rand(1, 3, 24, 94) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(model(x), unflushed.eval()(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda real: real[: len(real) // 2], id="truncated-half"),
        pytest.param(lambda real: real[:100], id="truncated-header"),
        pytest.param(lambda real: b"", id="empty"),
        pytest.param(lambda real: os.urandom(4096), id="random-bytes"),
        pytest.param(lambda real: b"hello world, not a checkpoint", id="text"),
    ],
)
@pytest.mark.parametrize("name", ["Final_LPRNet_model.pth", "mine.pth"])
def test_corrupt_or_truncated_files(model_io, weights_path, tmp_path, content, name):
    p = tmp_path / name
    p.write_bytes(content(weights_path.read_bytes()))
    with pytest.raises(WeightsError, match="not a (readable )?PyTorch checkpoint|an empty file"
                       "|state dict") as e:
        model_io.load_model(p)
    assert str(p) in str(e.value) and "expected an LPRNet PyTorch checkpoint" in str(e.value)
    assert "KeyError" not in str(e.value)  # what the file is, not what the unpickler tripped on


def test_other_kinds_of_file_are_named(model_io, tmp_path):
    """A file passed as weights by mistake: the error says what it looks like."""
    import numpy as np

    np.savez(tmp_path / "params.npz", p000=np.zeros(3, np.float32))
    (tmp_path / "notes.txt").write_text("hello")
    for name, what in (("params.npz", "a NumPy .npz archive"), ("notes.txt", "a text file")):
        with pytest.raises(WeightsError, match=f"not a PyTorch checkpoint: {what}"):
            model_io.load_model(tmp_path / name)


def test_truncated_zip_checkpoint(model_io, tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    p = tmp_path / "cut.pth"
    p.write_bytes(data[: len(data) - 200])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        model_io.load_model(p)


def test_known_file_name_with_other_content_fails_its_sha(model_io, tiny_model, tmp_path):
    import torch

    p = tmp_path / SIRIUS.filename
    torch.save(tiny_model.state_dict(), p)  # loadable, right shapes, but not the original
    with pytest.raises(WeightsError, match="sha256 does not match"):
        model_io.load_model(p)
    assert model_io.load_model(p, check_sha=False).class_num == 68


def test_not_an_lprnet_state_dict(model_io, tmp_path):
    import torch

    p = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, p)
    with pytest.raises(WeightsError, match="a state dict, but not LPRNet's"):
        model_io.load_model(p)
    torch.save([torch.zeros(1)], p)
    with pytest.raises(WeightsError, match="holds a list, not a state dict of tensors"):
        model_io.load_model(p)
    sd = {k: v for k, v in _tiny_state_dict().items() if not k.startswith("backbone.0.")}
    torch.save(sd, p)
    with pytest.raises(WeightsError, match="do not fit"):
        model_io.load_model(p)
    with pytest.raises(WeightsError, match="not found"):
        model_io.load_model(tmp_path / "absent.pth")


def _tiny_state_dict():
    from lprnet_edge.model.lprnet import LPRNet

    return LPRNet().state_dict()


def test_all_weights_errors_share_the_root(model_io):
    assert issubclass(WeightsError, LprnetEdgeError)
