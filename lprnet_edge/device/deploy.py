"""Deploy an artifact to a device over SSH, roll back, and run recognition/eval/bench there.

Layout on the device (``--remote-dir``, default ``~/.lprnet-edge``)::

    venv/                                 python with numpy, opencv, apache-tvm (set up once)
    deployments/<name>-<timestamp>/       one self-contained deployment:
        artifact/                           model.so, params.npz, manifest.json
        runtime/lprnet_edge/                the lprnet_edge package that runs it
        deployment.json, SHA256SUMS
    current -> deployments/<name>-<timestamp>
    tmp/                                  uploads of remote recognize/eval, removed after use

A deployment carries its own runtime code, so a rollback switches model *and* code together.
It is uploaded to ``deployments/.staging-*``, checked on the device (sha256 of every file, then
the agent verifies the manifest and runs the model once), renamed into place and only then made
``current`` by an atomic symlink swap (``ln -sfn`` + ``mv -T``). Any failure before the swap
leaves the previous deployment current and untouched.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shlex
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lprnet_edge.device.agreement import require_images_agree
from lprnet_edge.device.ssh import SshConnection
from lprnet_edge.runtime.artifact import (
    MANIFEST,
    Artifact,
    load_manifest,
    machine_arch,
    sha256_file,
)
from lprnet_edge.runtime.errors import ArtifactError, DataError, DeviceError, LprnetEdgeError

DEFAULT_REMOTE_DIR = "~/.lprnet-edge"
AGENT = "lprnet_edge.runtime.agent"
SELFCHECK = "lprnet_edge.runtime.selfcheck"
SPACE_MARGIN = 1 << 20  # bytes kept free beyond what a deployment needs
_TS_RE = re.compile(r"-(\d{8}T\d{6}\.\d{6}Z)$")

Progress = Callable[[int, int], None]


def _q(s: str) -> str:
    return shlex.quote(s)


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "artifact"


# ---------------------------------------------------------------- the device


class Device:
    """A device reached over SSH, with its lprnet-edge directory and python."""

    def __init__(self, conn: SshConnection, remote_dir: str = DEFAULT_REMOTE_DIR,
                 python: str | None = None, runtime_lib_only: bool = True) -> None:
        self.conn = conn
        home = conn.home()
        d = remote_dir.rstrip("/") or "/"
        if d == "~" or d.startswith("~/"):
            d = home.rstrip("/") + d[1:]
        elif not d.startswith("/"):
            d = f"{home.rstrip('/')}/{d}"
        self.root = d
        self._python = python
        self.runtime_lib_only = runtime_lib_only

    def sh(self, command: str, **kw: Any):
        return self.conn.run(command, **kw)

    @property
    def python(self) -> str:
        if self._python is None:
            venv = f"{self.root}/venv/bin/python"
            ok = self.sh(f"test -x {_q(venv)}", check=False).ok
            self._python = venv if ok else "python3"
        return self._python

    def machine(self) -> str:
        return self.sh("uname -m").stdout.strip()

    def free_bytes(self, path: str) -> int:
        out = self.sh(f"df -Pk {_q(path)} | tail -n 1").stdout.split()
        try:
            return int(out[3]) * 1024
        except (IndexError, ValueError):
            raise DeviceError(f"cannot read free space of {path} on {self.conn.spec}") from None

    def mkdirs(self) -> None:
        self.sh(f"mkdir -p {_q(self.root)}/deployments {_q(self.root)}/tmp")

    # ---------------------------------------------------------------- agent

    def agent(self, runtime: str, args: list[str], timeout: float | None = None,
              progress: Progress | None = None, log: Callable[[str], None] | None = None,
              module: str = AGENT) -> Any:
        """Run ``python -m MODULE ARGS`` (the agent, or another runtime module that speaks its
        JSON protocol) with ``runtime`` on PYTHONPATH."""
        env = f"PYTHONPATH={_q(runtime)} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1"
        if self.runtime_lib_only:
            env += " TVM_USE_RUNTIME_LIB=1"
        cmd = (f"cd {_q(self.root)} && {env} {_q(self.python)} -m {module} "
               + " ".join(_q(a) for a in args))

        def on_line(line: str) -> None:
            if line.startswith("PROGRESS ") and progress:
                with contextlib.suppress(ValueError):
                    done, total = (int(x) for x in line.split()[1:3])
                    progress(done, total)
            elif log and line.strip():
                log(line)

        res = self.conn.run(cmd, timeout=timeout, check=False, on_stderr_line=on_line)
        doc = None
        for line in reversed(res.stdout.strip().splitlines()):
            with contextlib.suppress(json.JSONDecodeError):
                doc = json.loads(line)
                break
        if not isinstance(doc, dict) or "ok" not in doc:
            tail = (res.stderr.strip() or res.stdout.strip())[-1500:]
            if "No module named" in tail:
                raise DeviceError(
                    f"the device's python ({self.python}) lacks a module the runtime needs: "
                    f"{tail.splitlines()[-1]}; set up the venv as in docs/deployment.md")
            raise DeviceError(f"device agent failed on {self.conn.spec} (exit {res.exit_code})"
                              f": {tail}")
        if not doc["ok"]:
            kind = {"ArtifactError": ArtifactError, "DataError": DataError}.get(
                doc.get("type", ""), DeviceError)
            raise kind(f"on {self.conn.spec}: {doc.get('error')}")
        return doc["result"]

    # ---------------------------------------------------------------- deployments

    def current(self) -> str | None:
        """Absolute path of the current deployment (None if nothing is deployed)."""
        res = self.sh(f"readlink -f {_q(self.root)}/current && test -d {_q(self.root)}/current",
                      check=False)
        return res.stdout.strip() if res.ok and res.stdout.strip() else None

    def deployments(self) -> list[str]:
        """Deployment names, oldest first."""
        res = self.sh(f"ls -1 {_q(self.root)}/deployments 2>/dev/null", check=False)
        names = [n for n in res.stdout.split() if _TS_RE.search(n) and not n.startswith(".")]
        return sorted(names, key=lambda n: _TS_RE.search(n).group(1))

    def switch_to(self, name: str) -> None:
        """Make ``deployments/name`` current with an atomic symlink replacement."""
        tmp = f".current.{secrets.token_hex(4)}"
        self.sh(f"cd {_q(self.root)} && ln -sfn deployments/{_q(name)} {tmp} && "
                f"mv -T {tmp} current")

    def runtime_of(self, deployment_path: str) -> tuple[str, str]:
        return f"{deployment_path}/runtime", f"{deployment_path}/artifact"

    def require_current(self) -> str:
        cur = self.current()
        if cur is None:
            raise DeviceError(f"nothing is deployed on {self.conn.spec} under {self.root}: "
                              "run `lprnet-edge deploy ARTIFACT --host ...` first")
        return cur

    @contextlib.contextmanager
    def job_dir(self) -> Iterator[str]:
        """A temporary directory on the device, removed afterwards (if still reachable)."""
        self.mkdirs()
        d = f"{self.root}/tmp/job-{secrets.token_hex(6)}"
        self.sh(f"mkdir -p {_q(d)}")
        try:
            yield d
        finally:
            with contextlib.suppress(LprnetEdgeError):
                self.sh(f"rm -rf {_q(d)}", timeout=120)


# ---------------------------------------------------------------- runtime package


RUNTIME_SUFFIXES = (".py", ".json", ".typed")


def runtime_files() -> list[tuple[Path, str]]:
    """What ships to a board: ``lprnet_edge/__init__.py`` (it imports only the runtime) and
    the ``lprnet_edge/runtime/`` folder, as (local path, name in the zip) pairs.

    Nothing else of the package goes: the device has no torch, no compiler and no use for
    the pipeline, and a smaller upload is a smaller attack surface."""
    import lprnet_edge

    pkg = Path(lprnet_edge.__file__).parent
    files = [(pkg / "__init__.py", "lprnet_edge/__init__.py")]
    for p in sorted((pkg / "runtime").rglob("*")):
        if "__pycache__" in p.parts or not p.is_file() or p.suffix not in RUNTIME_SUFFIXES:
            continue
        files.append((p, f"lprnet_edge/{p.relative_to(pkg).as_posix()}"))
    return files


def runtime_zip(dest: Path) -> Path:
    """The on-device runtime (:func:`runtime_files`) as ``dest/runtime.zip``."""
    out = dest / "runtime.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path, name in runtime_files():
            z.write(path, name)
    return out


# ---------------------------------------------------------------- deploy


@dataclass
class DeployResult:
    host: str
    name: str
    path: str
    previous: str | None
    bytes_uploaded: int
    seconds: float
    upload_seconds: float
    device_arch: str
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def local_artifact(root: Path) -> dict[str, Any]:
    """The manifest of a local artifact, validated (:class:`Artifact`: every name in ``files``
    a plain file name inside the artifact, every loaded file listed), then every file's
    checksum. Names become paths on the device (``../x`` would be written outside the
    deployment), so this runs before anything is uploaded."""
    return Artifact.open(root, check_arch=False).manifest.to_dict()


@contextlib.contextmanager
def artifact_dir(artifact: str | Path) -> Iterator[Path]:
    """An artifact folder, or the folder inside a bundle made by ``build --bundle``
    (``<name>.tar.gz``, extracted safely into a temporary folder for the block)."""
    path = Path(artifact)
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact folder or bundle")
    from lprnet_edge.runtime.artifact import unbundle

    with tempfile.TemporaryDirectory(prefix="lprnet-bundle-") as tmpd:
        yield unbundle(path, Path(tmpd))


def _check_arch(dev: Device, root: Path, manifest: dict[str, Any]) -> str:
    """The device's ``uname -m``; refuses an artifact built for another architecture."""
    want = manifest["target"].get("arch")
    machine = dev.machine()
    if want and want != machine_arch(machine):
        raise ArtifactError(
            f"{root} is built for {manifest['target'].get('name', '?')} ({want}) but "
            f"{dev.conn.spec} is {machine}; build it with the device's target "
            f"(e.g. `lprnet-edge build --target rpi4`). Nothing was uploaded")
    return machine


def _check_space(dev: Device, dest: str, need: int) -> None:
    free = dev.free_bytes(dest)
    if free < need:
        raise DeviceError(
            f"not enough disk space on {dev.conn.spec}: {dest} has {_mb(free)} free, "
            f"this deployment needs {_mb(need)}; free some space (older deployments are in "
            f"{dest}) and retry. Nothing was changed")


def _upload(dev: Device, uploads: list[tuple[Path, str]], staging: str, dest: str,
            progress: Progress | None) -> None:
    """Copy each (local, relative name) into ``staging``; progress counts all the bytes."""
    total = sum(p.stat().st_size for p, _ in uploads)
    done_before = 0
    for path, rel in uploads:
        size = path.stat().st_size

        def cb(done: int, _t: int, base: int = done_before) -> None:
            if progress:
                progress(base + done, total)

        try:
            dev.conn.put(path, f"{staging}/{rel}", progress=cb)
        except DeviceError as e:
            free_now = None
            if dev.conn._alive():
                with contextlib.suppress(LprnetEdgeError):
                    free_now = dev.free_bytes(dest)
            if free_now is not None and free_now < size:
                raise DeviceError(f"{e}: the device ran out of disk space "
                                  f"({_mb(free_now)} free in {dest})") from None
            raise
        done_before += size


def _unpack_runtime(dev: Device, staging: str, dest: str) -> None:
    res = dev.sh(f"cd {_q(staging)} && sha256sum -c --quiet SHA256SUMS", check=False)
    if not res.ok:
        raise DeviceError(f"checksum mismatch on {dev.conn.spec} after upload: "
                          f"{(res.stdout + res.stderr).strip()[-800:]}")
    res = dev.sh(
        f"cd {_q(staging)} && {_q(dev.python)} -c "
        + _q("import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])")
        + " runtime.zip runtime && rm runtime.zip && "
        f"{_q(dev.python)} -m compileall -q runtime >/dev/null", check=False)
    if not res.ok:
        free_now = dev.free_bytes(dest)
        raise DeviceError(
            f"unpacking the runtime failed on {dev.conn.spec} ({_mb(free_now)} free in "
            f"{dest}): {(res.stderr.strip() or res.stdout.strip())[-800:]}")


def check_on_device(dev: Device, deployment: str, previous: str | None) -> dict[str, Any]:
    """Load and run the model in ``deployment`` on the device, and compare it with the stored
    PyTorch logits (:mod:`lprnet_edge.runtime.selfcheck`); raise past the tolerance.

    Returns ``{"info": agent info, "selfcheck": comparison}``."""
    res = dev.agent(f"{deployment}/runtime", ["--artifact", f"{deployment}/artifact", "--info"],
                    timeout=900, module=SELFCHECK)
    check = res.get("selfcheck") or {}
    if check.get("status") == "failed":
        diff = check.get("max_abs_logit_diff")
        agree = check.get("plate_agreement")
        raise ArtifactError(
            f"verification on {dev.conn.spec} failed: max |logit diff| vs the host's PyTorch "
            f"{'non-finite' if diff is None else f'{diff:.3g}'} > tolerance "
            f"{check.get('tolerance'):g} on {check.get('inputs')} calib inputs"
            + (f" ({agree:.0%} of plates agree)" if agree is not None else "")
            + ": the compiled model is wrong on this device (a bad tuning record or "
            "toolchain); rebuild it (e.g. without --tune). "
            + (f"{Path(previous).name} stays current" if previous else "Nothing was deployed"))
    require_images_agree(check.get("images"), str(dev.conn.spec), previous)
    return res


def _record(final_name: str, ts: str, root: Path, manifest: dict[str, Any],
            checked: dict[str, Any]) -> dict[str, Any]:
    """``deployment.json``: what was deployed, on what runtime, and what the device measured."""
    info = checked.get("info") or {}
    return {
        "name": final_name, "created": ts, "artifact": root.name,
        "target": manifest["target"], "lprnet_edge": info.get("lprnet_edge"),
        "files": {n: e["sha256"] for n, e in manifest["files"].items()},
        "device": {k: info.get(k) for k in ("machine", "python", "tvm", "numpy", "opencv")},
        "load_s": info.get("load_s"), "first_inference_s": info.get("first_inference_s"),
        "verification": checked.get("selfcheck"),
    }


def deploy(dev: Device, artifact: str | Path, name: str | None = None,
           progress: Progress | None = None, keep: int = 5, check_space: bool = True,
           on_step: Callable[[str], None] | None = None) -> DeployResult:
    """Upload ``artifact`` (a folder or a ``build --bundle`` tarball) + the runtime, check
    them on the device (checksums, load, comparison with PyTorch), then make them current."""
    with artifact_dir(artifact) as root:
        return _deploy(dev, root, name, progress, keep, check_space, on_step or (lambda _s: None))


def _deploy(dev: Device, root: Path, name: str | None, progress: Progress | None, keep: int,
            check_space: bool, step: Callable[[str], None]) -> DeployResult:
    t0 = time.perf_counter()
    manifest = local_artifact(root)
    step("checking the device")
    machine = _check_arch(dev, root, manifest)
    ts = _timestamp()
    final_name = f"{_safe_name(name or root.name)}-{ts}"
    dest = f"{dev.root}/deployments"
    staging = f"{dest}/.staging-{final_name}"
    previous = dev.current()

    with tempfile.TemporaryDirectory(prefix="lprnet-deploy-") as tmpd:
        rz = runtime_zip(Path(tmpd))
        uploads: list[tuple[Path, str]] = [(root / MANIFEST, f"artifact/{MANIFEST}")]
        uploads += [(root / n, f"artifact/{n}") for n in manifest["files"]]
        uploads.append((rz, "runtime.zip"))
        sums = "".join(f"{sha256_file(p)}  {rel}\n" for p, rel in uploads)
        total = sum(p.stat().st_size for p, _ in uploads)
        unpacked = sum(i.file_size for i in zipfile.ZipFile(rz).infolist())

        dev.mkdirs()
        # Leftovers of interrupted deploys (never the current one: it is not a staging dir).
        dev.sh(f"find {_q(dest)} -maxdepth 1 -name '.staging-*' -mmin +30 "
               "-exec rm -rf {} + 2>/dev/null || true")
        if check_space:
            _check_space(dev, dest, total + unpacked + SPACE_MARGIN)

        step(f"uploading {len(uploads)} files ({_mb(total)})")
        dev.sh(f"mkdir -p {_q(staging)}/artifact")
        ok = False
        try:
            t_up = time.perf_counter()
            _upload(dev, uploads, staging, dest, progress)
            dev.conn.put_bytes(sums.encode(), f"{staging}/SHA256SUMS")
            upload_s = time.perf_counter() - t_up

            step("verifying checksums on the device")
            _unpack_runtime(dev, staging, dest)
            step("loading the model on the device and comparing it with PyTorch")
            checked = check_on_device(dev, staging, previous)
            record = _record(final_name, ts, root, manifest, checked)
            dev.conn.put_bytes(json.dumps(record, indent=2, ensure_ascii=False).encode(),
                               f"{staging}/deployment.json")

            step("switching to the new deployment")
            dev.sh(f"mv -T {_q(staging)} {_q(dest)}/{_q(final_name)}")
            dev.switch_to(final_name)
            ok = True
        finally:
            if not ok:
                with contextlib.suppress(LprnetEdgeError, OSError, EOFError):
                    dev.sh(f"rm -rf {_q(staging)}", timeout=60)

    with contextlib.suppress(LprnetEdgeError):
        prune(dev, keep)
    info = checked.get("info") or {}
    return DeployResult(
        host=str(dev.conn.spec), name=final_name, path=f"{dest}/{final_name}",
        previous=Path(previous).name if previous else None, bytes_uploaded=total,
        seconds=time.perf_counter() - t0, upload_seconds=upload_s, device_arch=machine,
        checks={"sha256": "ok", "torch_imported": info.get("torch_imported"),
                "load_s": info.get("load_s"), "first_inference_s": info.get("first_inference_s"),
                "verification": checked.get("selfcheck")})


def prune(dev: Device, keep: int) -> list[str]:
    """Remove the oldest deployments beyond ``keep`` (never the current one)."""
    if keep < 1:
        return []
    names = dev.deployments()
    cur = dev.current()
    cur_name = Path(cur).name if cur else None
    old = [n for n in names[:-keep] if n != cur_name]
    if old:
        dev.sh(f"cd {_q(dev.root)}/deployments && rm -rf " + " ".join(_q(n) for n in old))
    return old


def rollback(dev: Device, to: str | None = None) -> dict[str, Any]:
    """Make the deployment before the current one (or ``to``) current again."""
    names = dev.deployments()
    cur = dev.current()
    cur_name = Path(cur).name if cur else None
    if to:
        if to not in names:
            raise DeviceError(f"no deployment {to!r} on {dev.conn.spec}; there are: "
                              + (", ".join(names) or "none"))
        target = to
    else:
        if cur_name not in names:
            raise DeviceError(f"nothing is deployed on {dev.conn.spec}; cannot roll back")
        i = names.index(cur_name)
        if i == 0:
            raise DeviceError(f"{cur_name} is the oldest deployment on {dev.conn.spec}: there "
                              "is nothing to roll back to")
        target = names[i - 1]
    path = f"{dev.root}/deployments/{target}"
    runtime, art = dev.runtime_of(path)
    dev.agent(runtime, ["info", "--artifact", art])  # checksums and arch still fine?
    dev.switch_to(target)
    return {"host": str(dev.conn.spec), "current": target, "previous": cur_name}


def status(dev: Device) -> dict[str, Any]:
    """What is deployed, and the device's runtime versions (agent ``info``)."""
    cur = dev.current()
    out: dict[str, Any] = {"host": str(dev.conn.spec), "remote_dir": dev.root,
                           "machine": dev.machine(), "python": dev.python,
                           "current": Path(cur).name if cur else None,
                           "deployments": dev.deployments()}
    if cur:
        runtime, art = dev.runtime_of(cur)
        out["info"] = dev.agent(runtime, ["info", "--artifact", art])
        rec = dev.sh(f"cat {_q(cur)}/deployment.json", check=False)
        with contextlib.suppress(json.JSONDecodeError):
            out["deployment"] = json.loads(rec.stdout) if rec.ok else None
    out["free_bytes"] = dev.free_bytes(dev.root if cur else dev.conn.home())
    return out


# ---------------------------------------------------------------- remote recognition


def remote_recognize(dev: Device, images: list[str | Path], threads: int | None = None,
                     progress: Progress | None = None) -> list[dict[str, Any]]:
    cur = dev.require_current()
    runtime, art = dev.runtime_of(cur)
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such image file")
    total = sum(p.stat().st_size for p in paths)
    with dev.job_dir() as job:
        remote_names, done = [], 0
        for i, p in enumerate(paths):
            rname = f"{job}/img-{i:05d}{p.suffix.lower() or '.img'}"
            dev.conn.put(p, rname, progress=(lambda d, _t, b=done: progress(b + d, total))
                         if progress else None)
            done += p.stat().st_size
            remote_names.append(rname)
        args = ["recognize", "--artifact", art, *remote_names]
        if threads:
            args += ["--threads", str(threads)]
        results = dev.agent(runtime, args, timeout=600)
    for r, p in zip(results, paths, strict=True):
        r["source"] = str(p)
    return results


def _tar_folder(data: Path, out: Path, limit: int | None = None) -> int:
    files = sorted(p for p in data.iterdir() if p.is_file() and not p.name.startswith("."))
    if limit:
        from lprnet_edge.runtime.dataset import IMAGE_SUFFIXES

        imgs = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES][:limit]
        files = imgs + [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT, dereference=True) as tar:
        for p in files:
            tar.add(p, arcname=f"data/{p.name}")
    return len(files)


def remote_eval(dev: Device, data: str | Path, skip_bad: bool = False, limit: int | None = None,
                threads: int | None = None, workers: int = 1,
                upload_progress: Progress | None = None, progress: Progress | None = None,
                timeout: float = 6 * 3600, reads: bool = False) -> dict[str, Any]:
    """Upload a labelled folder (one tar) and evaluate the current deployment on it there
    (``reads``: also each file's text, ``res["reads"]``)."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data}: not a folder of plate images")
    cur = dev.require_current()
    runtime, art = dev.runtime_of(cur)
    with tempfile.TemporaryDirectory(prefix="lprnet-eval-") as tmpd:
        tar = Path(tmpd) / "data.tar"
        _tar_folder(data, tar, limit)
        size = tar.stat().st_size
        with dev.job_dir() as job:
            free = dev.free_bytes(job)
            if free < 2 * size + SPACE_MARGIN:
                raise DeviceError(f"not enough disk space on {dev.conn.spec} for the data: "
                                  f"{_mb(free)} free, {_mb(2 * size + SPACE_MARGIN)} needed")
            t0 = time.perf_counter()
            dev.conn.put(tar, f"{job}/data.tar", progress=upload_progress)
            upload_s = time.perf_counter() - t0
            args = ["eval", "--artifact", art, "--data-tar", f"{job}/data.tar",
                    "--workers", str(workers)]
            if skip_bad:
                args.append("--skip-bad")
            if reads:
                args.append("--reads")
            if limit:
                args += ["--limit", str(limit)]
            if threads:
                args += ["--threads", str(threads)]
            res = dev.agent(runtime, args, timeout=timeout, progress=progress)
    res["data"] = str(data)
    res["upload_seconds"] = upload_s
    res["deployment"] = Path(cur).name
    res["host"] = str(dev.conn.spec)
    return res


def remote_bench(dev: Device, runs: int = 100, warmup: int = 10, threads: int | None = None,
                 image: str | Path | None = None, include_preprocess: bool = True,
                 timeout: float = 3600, expect_artifact: str | Path | None = None,
                 profile: bool = False) -> dict[str, Any]:
    """Recognizer.benchmark on the device, with the current deployment (which must be
    ``expect_artifact``, when given); ``profile`` adds the agent's per-kernel profile
    (``stats["profile"]``, :class:`lprnet_edge.runtime.profile.Profile` as a dict)."""
    cur = dev.require_current()
    runtime, art = dev.runtime_of(cur)
    if expect_artifact is not None:
        local = {n: e.sha256 for n, e in load_manifest(expect_artifact).files.items()}
        rec = dev.sh(f"cat {_q(cur)}/deployment.json", check=False)
        try:
            deployed = json.loads(rec.stdout).get("files") if rec.ok else None
        except json.JSONDecodeError:
            deployed = None
        if deployed != local:
            raise DeviceError(
                f"{dev.conn.spec} runs {Path(cur).name}, not {expect_artifact}: deploy it "
                f"first (`lprnet-edge deploy {expect_artifact} --host ...`)")
    args = ["bench", "--artifact", art, "--runs", str(runs), "--warmup", str(warmup)]
    if threads:
        args += ["--threads", str(threads)]
    if not include_preprocess:
        args.append("--no-preprocess")
    if profile:
        args.append("--profile")
    with dev.job_dir() as job:
        if image:
            dev.conn.put(Path(image), f"{job}/bench{Path(image).suffix}")
            args += ["--image", f"{job}/bench{Path(image).suffix}"]
        try:
            stats = dev.agent(runtime, args, timeout=timeout)
        except DeviceError as e:
            if profile and "unrecognized arguments: --profile" in str(e):
                raise DeviceError(f"{dev.conn.spec} runs {Path(cur).name}, deployed by an "
                                  "lprnet-edge whose agent cannot profile: deploy the artifact "
                                  "again (`lprnet-edge deploy ARTIFACT --host ...`)") from None
            raise
    stats.update(host=str(dev.conn.spec), deployment=Path(cur).name, mode="ssh")
    return stats


def remote_compare(dev: Device, onnx: str | Path, runs: int = 100, warmup: int = 10,
                   rounds: int = 5, threads: int | None = None, timeout: float = 3600
                   ) -> dict[str, Any]:
    """The current deployment's model next to ONNX Runtime on the device: ``onnx`` (the fp32
    original) is uploaded to a job dir and the agent's ``bench --onnx`` times both interleaved
    (ORT's row says how to install it when the device venv lacks it)."""
    cur = dev.require_current()
    runtime, art = dev.runtime_of(cur)
    args = ["bench", "--artifact", art, "--compare-only", "--runs", str(runs), "--warmup",
            str(warmup), "--rounds", str(rounds)]
    if threads:
        args += ["--threads", str(threads)]
    with dev.job_dir() as job:
        dev.conn.put(Path(onnx), f"{job}/model.onnx")
        try:
            res = dev.agent(runtime, [*args, "--onnx", f"{job}/model.onnx"], timeout=timeout)
        except DeviceError as e:
            if "unrecognized arguments" in str(e):
                raise DeviceError(f"{dev.conn.spec} runs {Path(cur).name}, deployed by an "
                                  "lprnet-edge whose agent cannot compare with ONNX Runtime: "
                                  "deploy the artifact again (`lprnet-edge deploy ARTIFACT "
                                  "--host ...`)") from None
            raise
    return {**res["compare"], "host": str(dev.conn.spec), "deployment": Path(cur).name}


# ---------------------------------------------------------------- RPC over an SSH tunnel


@dataclass
class RpcServer:
    pid: int
    port: int
    log: str


_EXTRA_LIB = ("import os, tvm; p = os.path.join(os.path.dirname(tvm.__file__), 'lib', "
              "'libtvm_runtime_extra.so'); print(p if os.path.exists(p) else '')")


def start_rpc_server(dev: Device, port: int | None = None, timeout: float = 180,
                     load_library: str | None = "auto") -> RpcServer:
    """Start ``python -m tvm.exec.rpc_server`` on the device's 127.0.0.1, in its own session
    (so it can be stopped as a process group), and wait until it listens.

    ``load_library="auto"`` loads the wheel's ``libtvm_runtime_extra.so`` when it is there:
    a runtime-only server lacks ``random_fill``, which MetaSchedule's measurements call.
    """
    dev.mkdirs()
    env = "TVM_USE_RUNTIME_LIB=1 " if dev.runtime_lib_only else ""
    if load_library == "auto":
        load_library = dev.sh(f"{env}{_q(dev.python)} -c {_q(_EXTRA_LIB)}",
                              check=False).stdout.strip() or None
    if port is None:
        port = int(dev.sh(f"{_q(dev.python)} -c " + _q(
            "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); "
            "print(s.getsockname()[1])")).stdout.strip())
    log = f"{dev.root}/tmp/rpc-{port}.log"
    extra = f" --load-library {_q(load_library)}" if load_library else ""
    res = dev.sh(f"cd {_q(dev.root)}/tmp || exit 1; {env}setsid nohup {_q(dev.python)} -m "
                 f"tvm.exec.rpc_server --host 127.0.0.1 --port {port} --port-end {port + 1}"
                 f"{extra} > {_q(log)} 2>&1 < /dev/null & echo $!")
    pid = int(res.stdout.strip().splitlines()[-1])
    server = RpcServer(pid, port, log)
    wait = (f"import socket, time, sys\nend = time.time() + {timeout}\n"
            "while time.time() < end:\n"
            "    try:\n"
            f"        socket.create_connection(('127.0.0.1', {port}), 1).close(); sys.exit(0)\n"
            "    except OSError: time.sleep(0.5)\n"
            "sys.exit(1)\n")
    ok = dev.sh(f"{_q(dev.python)} -c {_q(wait)}", check=False, timeout=timeout + 30).ok
    if not ok:
        logtext = dev.sh(f"tail -n 20 {_q(log)}", check=False).stdout
        stop_rpc_server(dev, server)
        raise DeviceError(f"the TVM RPC server on {dev.conn.spec} did not listen on port {port} "
                          f"within {timeout:g}s: {logtext.strip()[-1000:]}")
    return server


def stop_rpc_server(dev: Device, server: RpcServer) -> None:
    """Kill the server's process group (its popen_worker child survives SIGTERM alone)."""
    dev.sh(f"kill -TERM -- -{server.pid} 2>/dev/null; sleep 1; "
           f"kill -KILL -- -{server.pid} 2>/dev/null; rm -f {_q(server.log)}; true",
           check=False)


@contextlib.contextmanager
def device_rpc(dev: Device, port: int | None = None, server_timeout: float = 180
               ) -> Iterator[int]:
    """A TVM RPC server on the device's localhost, reached here through an SSH tunnel:
    yields the tunnel's local port on 127.0.0.1; the server is stopped on exit.

    The RPC client must not run in this process (see
    :func:`lprnet_edge.compiler.session.in_child_process`): the tuner's worker process or a
    spawned child talks to the tunnel, this process pumps it."""
    server = start_rpc_server(dev, port, timeout=server_timeout)
    try:
        with dev.conn.forward(server.port) as lport:
            yield lport
    finally:
        stop_rpc_server(dev, server)


def rpc_bench(dev: Device, artifact: str | Path, number: int = 10, repeat: int = 10,
              port: int | None = None, server_timeout: float = 180,
              session_timeout: float = 1800) -> dict[str, Any]:
    """Time the model of a local ``artifact`` on the device with ``time_evaluator``, through
    a TVM RPC server bound to the device's localhost and an SSH tunnel to it."""
    from lprnet_edge.compiler.session import in_child_process

    root = Path(artifact)
    target = Artifact.open(root, check_arch=False).manifest.target
    want, have = target.arch, machine_arch(dev.machine())
    if want and want != have:
        raise ArtifactError(f"{root} is built for {want} but {dev.conn.spec} is {have}")
    with device_rpc(dev, port, server_timeout) as lport:
        t0 = time.perf_counter()
        limit = session_timeout + 120
        timed = in_child_process(
            _rpc_time_child, lport, str(root), number, repeat, session_timeout, timeout=limit,
            on_timeout=lambda: DeviceError(f"the RPC benchmark did not finish in {limit:g}s"))
        session_s = time.perf_counter() - t0
    out = dict(timed["stats"])
    out.update(mode="rpc", host=str(dev.conn.spec), include_preprocess=False, backend="tvm",
               repeat=repeat, target=target.to_dict(), session_seconds=session_s,
               output_shape=timed["output_shape"], machine=have, port=lport)
    return out


def _rpc_time_child(local_port: int, artifact: str, number: int, repeat: int,
                    session_timeout: float) -> dict[str, Any]:
    from tvm import rpc

    root = Path(artifact)
    try:
        sess = rpc.connect("127.0.0.1", local_port, session_timeout=session_timeout)
    except Exception as e:
        raise DeviceError(f"cannot open a TVM RPC session through the SSH tunnel: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                          ) from None
    return _time_on_session(sess, root, number, repeat)


def _time_on_session(sess: Any, root: Path, number: int, repeat: int, warmup: int = 2,
                     timeout: float = 3600) -> dict[str, Any]:
    """Time the artifact's module on an open TVM RPC session: the same code as a local
    ``bench`` (:func:`lprnet_edge.compiler.session.time_artifact`), on a remote session."""
    from lprnet_edge.compiler.session import Session, time_artifact

    res = time_artifact(root, Session("rpc", "SSH tunnel", sess, timeout), number=number,
                        repeat=repeat, warmup=warmup)
    return {"stats": res.timing.to_dict(), "output_shape": res.output_shape}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def artifact_size(artifact: str | Path, with_runtime: bool = False) -> int:
    """Bytes a deploy uploads: the artifact's files (+ the runtime zip). ``artifact``: a
    folder or a ``build --bundle`` tarball."""
    with artifact_dir(artifact) as root:
        m = load_manifest(root)
        n = sum(e.size for e in m.files.values()) + (root / MANIFEST).stat().st_size
    if with_runtime:
        with tempfile.TemporaryDirectory() as d:
            n += runtime_zip(Path(d)).stat().st_size
    return n
