"""Deploy an artifact to a device over SSH, roll back, report what is deployed.

A deployment carries its own runtime code, so a rollback switches model *and* code together.
It is uploaded to ``deployments/.staging-*``, checked on the device (sha256 of every file, then
the model is loaded, run and compared with the host's PyTorch logits), renamed into place and
only then made ``current`` by an atomic symlink swap (``ln -sfn`` + ``mv -T``). Any failure
before the swap leaves the previous deployment current and untouched. The device's layout is
described in :mod:`lprnet_edge.device.device`.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from shlex import quote
from typing import Any

import lprnet_edge
from lprnet_edge.device.agreement import require_images_agree
from lprnet_edge.device.device import Device, Progress, format_mb
from lprnet_edge.runtime.artifact import (
    MANIFEST,
    Artifact,
    Manifest,
    load_manifest,
    machine_arch,
    unbundle,
)
from lprnet_edge.runtime.errors import ArtifactError, DeviceError, LprnetEdgeError
from lprnet_edge.runtime.files import sha256_file

SELFCHECK = "lprnet_edge.runtime.selfcheck"
SPACE_MARGIN = 1 << 20  # bytes kept free beyond what a deployment needs
RUNTIME_SUFFIXES = (".py", ".json", ".typed")
CHECK_TIMEOUT = 900  # s for loading and running the model on the device (emulation is slow)
VERSION_KEYS = ("machine", "python", "tvm", "numpy", "opencv", "lprnet_edge")
STALE_STAGING_MIN = 30  # minutes after which an interrupted deploy's staging folder is removed

Step = Callable[[str], None]


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class DeviceCheck:
    """What the device reported for a staged deployment before it became current: the files'
    checksums held, the model loaded and ran (in these times, without importing torch), and
    its logits matched the host's PyTorch ones (``verification``, from
    :mod:`lprnet_edge.runtime.selfcheck`; ``status`` ``passed`` or ``absent``)."""

    sha256: str
    torch_imported: bool | None
    load_s: float | None
    first_inference_s: float | None
    verification: dict[str, Any] | None
    versions: dict[str, Any]  # the device's machine, python, tvm, numpy, opencv, lprnet_edge

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeployResult:
    host: str
    name: str
    path: str
    previous: str | None
    bytes_uploaded: int
    seconds: float
    upload_seconds: float
    device_arch: str
    checks: DeviceCheck

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RollbackResult:
    host: str
    current: str
    previous: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceStatus:
    """What is deployed on a device and what its runtime is (``info``: the agent's versions
    and the current artifact; None, like ``deployment``, when nothing is deployed)."""

    host: str
    remote_dir: str
    machine: str
    python: str
    current: str | None
    deployments: list[str]
    info: dict[str, Any] | None
    deployment: dict[str, Any] | None
    free_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- what is uploaded


def runtime_files() -> list[tuple[Path, str]]:
    """What ships to a board: ``lprnet_edge/__init__.py`` (it imports only the runtime) and
    the ``lprnet_edge/runtime/`` folder, as (local path, name in the zip) pairs.

    Nothing else of the package goes: the device has no torch, no compiler and no use for
    the pipeline, and a smaller upload is a smaller attack surface."""
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
    with tempfile.TemporaryDirectory(prefix="lprnet-bundle-") as tmpd:
        yield unbundle(path, Path(tmpd))


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


# ---------------------------------------------------------------- checks before and after upload


def _check_arch(dev: Device, root: Path, manifest: Manifest) -> str:
    """The device's ``uname -m``; refuses an artifact built for another architecture."""
    want = manifest.target.arch
    machine = dev.machine()
    if want and want != machine_arch(machine):
        raise ArtifactError(
            f"{root} is built for {manifest.target.name} ({want}) but "
            f"{dev.spec} is {machine}; build it with the device's target "
            f"(e.g. `lprnet-edge build --target rpi4`). Nothing was uploaded")
    return machine


def _check_space(dev: Device, dest: str, need: int) -> None:
    free = dev.free_bytes(dest)
    if free < need:
        raise DeviceError(
            f"not enough disk space on {dev.spec}: {dest} has {format_mb(free)} free, "
            f"this deployment needs {format_mb(need)}; free some space (older deployments "
            f"are in {dest}) and retry. Nothing was changed")


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
                                  f"({format_mb(free_now)} free in {dest})") from None
            raise
        done_before += size


def _unpack_runtime(dev: Device, staging: str, dest: str) -> None:
    res = dev.sh(f"cd {quote(staging)} && sha256sum -c --quiet SHA256SUMS", check=False)
    if not res.ok:
        raise DeviceError(f"checksum mismatch on {dev.spec} after upload: "
                          f"{(res.stdout + res.stderr).strip()[-800:]}")
    res = dev.sh(
        f"cd {quote(staging)} && {quote(dev.python)} -c "
        + quote("import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])")
        + " runtime.zip runtime && rm runtime.zip && "
        f"{quote(dev.python)} -m compileall -q runtime >/dev/null", check=False)
    if not res.ok:
        free_now = dev.free_bytes(dest)
        raise DeviceError(
            f"unpacking the runtime failed on {dev.spec} ({format_mb(free_now)} free in "
            f"{dest}): {(res.stderr.strip() or res.stdout.strip())[-800:]}")


def check_on_device(dev: Device, deployment: str, previous: str | None) -> DeviceCheck:
    """Load and run the model in ``deployment`` on the device, and compare it with the stored
    PyTorch logits (:mod:`lprnet_edge.runtime.selfcheck`); raise past the tolerance, naming
    ``previous`` (the deployment that stays current)."""
    res = dev.agent(f"{deployment}/runtime",
                    ["--artifact", f"{deployment}/artifact", "--info"],
                    timeout=CHECK_TIMEOUT, module=SELFCHECK)
    check = res.get("selfcheck")
    if (check or {}).get("status") == "failed":
        raise ArtifactError(_verification_failure(dev, check, previous))
    require_images_agree((check or {}).get("images"), str(dev.spec), previous)
    info = res.get("info") or {}
    return DeviceCheck(sha256="ok", torch_imported=info.get("torch_imported"),
                       load_s=info.get("load_s"), first_inference_s=info.get("first_inference_s"),
                       verification=check, versions={k: info.get(k) for k in VERSION_KEYS})


def _verification_failure(dev: Device, check: dict[str, Any], previous: str | None) -> str:
    diff = check.get("max_abs_logit_diff")
    agree = check.get("plate_agreement")
    return (f"verification on {dev.spec} failed: max |logit diff| vs the host's PyTorch "
            f"{'non-finite' if diff is None else f'{diff:.3g}'} > tolerance "
            f"{check.get('tolerance'):g} on {check.get('inputs')} calib inputs"
            + (f" ({agree:.0%} of plates agree)" if agree is not None else "")
            + ": the compiled model is wrong on this device (a bad tuning record or "
            "toolchain); rebuild it (e.g. without --tune). "
            + (f"{Path(previous).name} stays current" if previous else "Nothing was deployed"))


# ---------------------------------------------------------------- deploy


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "artifact"


def _record(final_name: str, ts: str, root: Path, manifest: Manifest,
            check: DeviceCheck) -> dict[str, Any]:
    """``deployment.json``: what was deployed, on what runtime, and what the device measured."""
    versions = dict(check.versions)
    return {
        "name": final_name, "created": ts, "artifact": root.name,
        "target": manifest.target.to_dict(), "lprnet_edge": versions.pop("lprnet_edge", None),
        "files": {n: e.sha256 for n, e in manifest.files.items()},
        "device": versions, "load_s": check.load_s,
        "first_inference_s": check.first_inference_s, "verification": check.verification,
    }


@dataclass(frozen=True)
class _Plan:
    """One deployment about to be staged: its name, folders and the files it uploads."""

    root: Path
    manifest: Manifest
    name: str
    stamp: str
    dest: str
    previous: str | None
    uploads: list[tuple[Path, str]]
    total: int  # bytes uploaded

    @property
    def staging(self) -> str:
        return f"{self.dest}/.staging-{self.name}"


def deploy(dev: Device, artifact: str | Path, name: str | None = None,
           progress: Progress | None = None, keep: int = 5, check_space: bool = True,
           on_step: Step | None = None) -> DeployResult:
    """Upload ``artifact`` (a folder or a ``build --bundle`` tarball) + the runtime, check
    them on the device (checksums, load, comparison with PyTorch), then make them current;
    older deployments beyond ``keep`` are removed."""
    step = on_step or (lambda _s: None)
    t0 = time.perf_counter()
    with artifact_dir(artifact) as root, \
            tempfile.TemporaryDirectory(prefix="lprnet-deploy-") as tmpd:
        # Validated before anything is uploaded: a manifest name such as ``../x`` would be
        # written outside the deployment.
        manifest = Artifact.open(root, check_arch=False).manifest
        step("checking the device")
        machine = _check_arch(dev, root, manifest)
        stamp = _timestamp()
        rz = runtime_zip(Path(tmpd))
        uploads = [(root / MANIFEST, f"artifact/{MANIFEST}"),
                   *((root / n, f"artifact/{n}") for n in manifest.files), (rz, "runtime.zip")]
        plan = _Plan(root, manifest, f"{_safe_name(name or root.name)}-{stamp}", stamp,
                     f"{dev.root}/deployments", dev.current(), uploads,
                     sum(p.stat().st_size for p, _ in uploads))
        unpacked = sum(i.file_size for i in zipfile.ZipFile(rz).infolist())
        _prepare(dev, plan, plan.total + unpacked + SPACE_MARGIN if check_space else None)
        check, upload_s = _stage_and_switch(dev, plan, progress, step)
    with contextlib.suppress(LprnetEdgeError):
        remove_old_deployments(dev, keep)
    return DeployResult(
        host=dev.spec, name=plan.name, path=f"{plan.dest}/{plan.name}",
        previous=Path(plan.previous).name if plan.previous else None,
        bytes_uploaded=plan.total, seconds=time.perf_counter() - t0, upload_seconds=upload_s,
        device_arch=machine, checks=check)


def _prepare(dev: Device, plan: _Plan, need: int | None) -> None:
    """The device's folders, without leftovers of interrupted deploys, with room for ``need``
    bytes (None: not checked)."""
    dev.mkdirs()
    # Never the current deployment: it is not a staging folder.
    dev.sh(f"find {quote(plan.dest)} -maxdepth 1 -name '.staging-*' -mmin "
           f"+{STALE_STAGING_MIN} -exec rm -rf {{}} + 2>/dev/null || true")
    if need is not None:
        _check_space(dev, plan.dest, need)


def _stage_and_switch(dev: Device, plan: _Plan, progress: Progress | None,
                      step: Step) -> tuple[DeviceCheck, float]:
    """Upload into the staging folder, check there, rename into place and switch; on any
    failure the staging folder is removed and the current deployment is untouched.
    Returns the device's check and the upload's seconds."""
    sums = "".join(f"{sha256_file(p)}  {rel}\n" for p, rel in plan.uploads)
    step(f"uploading {len(plan.uploads)} files ({format_mb(plan.total)})")
    dev.sh(f"mkdir -p {quote(plan.staging)}/artifact")
    ok = False
    try:
        t_up = time.perf_counter()
        _upload(dev, plan.uploads, plan.staging, plan.dest, progress)
        dev.conn.put_bytes(sums.encode(), f"{plan.staging}/SHA256SUMS")
        upload_s = time.perf_counter() - t_up
        step("verifying checksums on the device")
        _unpack_runtime(dev, plan.staging, plan.dest)
        step("loading the model on the device and comparing it with PyTorch")
        check = check_on_device(dev, plan.staging, plan.previous)
        record = _record(plan.name, plan.stamp, plan.root, plan.manifest, check)
        dev.conn.put_bytes(json.dumps(record, indent=2, ensure_ascii=False).encode(),
                           f"{plan.staging}/deployment.json")
        step("switching to the new deployment")
        dev.sh(f"mv -T {quote(plan.staging)} {quote(plan.dest)}/{quote(plan.name)}")
        dev.switch_to(plan.name)
        ok = True
    finally:
        if not ok:
            with contextlib.suppress(LprnetEdgeError, OSError, EOFError):
                dev.sh(f"rm -rf {quote(plan.staging)}", timeout=60)
    return check, upload_s


# ---------------------------------------------------------------- after deploying


def remove_old_deployments(dev: Device, keep: int) -> list[str]:
    """Remove the oldest deployments beyond ``keep`` (never the current one); returns their
    names."""
    if keep < 1:
        return []
    names = dev.deployments()
    cur = dev.current()
    cur_name = Path(cur).name if cur else None
    old = [n for n in names[:-keep] if n != cur_name]
    if old:
        dev.sh(f"cd {quote(dev.root)}/deployments && rm -rf " + " ".join(quote(n) for n in old))
    return old


def rollback(dev: Device, to: str | None = None) -> RollbackResult:
    """Make the deployment before the current one (or ``to``) current again, once the device
    has checked its files and architecture."""
    names = dev.deployments()
    cur = dev.current()
    cur_name = Path(cur).name if cur else None
    if to:
        if to not in names:
            raise DeviceError(f"no deployment {to!r} on {dev.spec}; there are: "
                              + (", ".join(names) or "none"))
        target = to
    else:
        if cur_name not in names:
            raise DeviceError(f"nothing is deployed on {dev.spec}; cannot roll back")
        i = names.index(cur_name)
        if i == 0:
            raise DeviceError(f"{cur_name} is the oldest deployment on {dev.spec}: there "
                              "is nothing to roll back to")
        target = names[i - 1]
    runtime, art = dev.runtime_of(f"{dev.root}/deployments/{target}")
    dev.agent(runtime, ["info", "--artifact", art])
    dev.switch_to(target)
    return RollbackResult(host=dev.spec, current=target, previous=cur_name)


def status(dev: Device) -> DeviceStatus:
    """What is deployed, and the device's runtime versions (agent ``info``)."""
    cur = dev.current()
    info = record = None
    if cur:
        runtime, art = dev.runtime_of(cur)
        info = dev.agent(runtime, ["info", "--artifact", art])
        record = dev.record_of(cur)
    return DeviceStatus(host=dev.spec, remote_dir=dev.root, machine=dev.machine(),
                        python=dev.python, current=Path(cur).name if cur else None,
                        deployments=dev.deployments(), info=info, deployment=record,
                        free_bytes=dev.free_bytes(dev.root if cur else dev.conn.home()))
