"""``bench --estimate --host``: count the deployed model on the board, weigh it here.

The board runs its own Python, TVM runtime and deployed artifact under the host's dynamic
``qemu-aarch64`` with the counting plugin; llvm-mca stays on the host. qemu and the plugin
are x86 programs: they are copied to the board with the x86 libraries they load and started
through the copied x86 loader (``ld-linux-x86-64.so.2 --library-path DIR qemu-aarch64 ...``).
That runs where the board can execute x86-64 code: the emulated Pi (a chroot on this
machine). A real Pi measures wall time instead (``lprnet-edge bench --host``).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import tempfile
from pathlib import Path

from lprnet_edge.compiler.cost.counting import DETERMINISTIC_ENV, parse_report, with_guest
from lprnet_edge.compiler.cost.cpus import CpuModel
from lprnet_edge.compiler.cost.estimate import CostEstimate, Program, weigh_counts
from lprnet_edge.compiler.cost.plugin import find_tools, portable_files
from lprnet_edge.device.deploy import Device
from lprnet_edge.runtime.artifact import load_manifest
from lprnet_edge.runtime.cost_marker import GETPPID
from lprnet_edge.runtime.errors import DeviceError

RUNNER = "lprnet_edge.runtime.cost_runner"


def _q(s: str) -> str:
    return shlex.quote(s)


def install_qemu(dev: Device) -> str:
    """Copy qemu, the plugin and their libraries to ``ROOT/cost-qemu`` (once per content) and
    check the board can start them; returns that directory."""
    files = portable_files(find_tools("aarch64"))
    stamp = hashlib.sha256("".join(hashlib.sha256(p.read_bytes()).hexdigest() + name
                                   for p, name in files).encode()).hexdigest()[:16]
    qdir = f"{dev.root}/cost-qemu"
    have = dev.sh(f"cat {_q(qdir)}/STAMP 2>/dev/null", check=False).stdout.strip()
    if have != stamp:
        dev.sh(f"rm -rf {_q(qdir)} && mkdir -p {_q(qdir)}/lib")
        for i, (local, name) in enumerate(files):
            dest = f"{qdir}/{name}" if i < 3 else f"{qdir}/lib/{name}"
            dev.conn.put(local, dest)
        dev.sh(f"chmod +x {_q(qdir)}/{_q(files[0][1])} {_q(qdir)}/{_q(files[1][1])} && "
               f"echo {stamp} > {_q(qdir)}/STAMP")
    probe = dev.sh(f"{_qemu_prefix(qdir, files)} -version", check=False)
    if not probe.ok:
        why = probe.stderr.strip()[-200:]
        raise DeviceError(f"{dev.conn.spec} cannot run the host's x86 qemu ({why}): --estimate "
                          "--host needs the emulated Pi; on a real board measure wall time "
                          "with `lprnet-edge bench --host ...`")
    return qdir


def _qemu_prefix(qdir: str, files: tuple[tuple[Path, str], ...]) -> str:
    return (f"{_q(qdir)}/{_q(files[0][1])} --library-path {_q(qdir)}/lib "
            f"{_q(qdir)}/{_q(files[1][1])}")


def _check_deployed(dev: Device, cur: str, artifact: str | None) -> None:
    if artifact is None:
        return
    local = {n: e.sha256 for n, e in load_manifest(artifact).files.items()}
    rec = dev.sh(f"cat {_q(cur)}/deployment.json", check=False)
    try:
        deployed = json.loads(rec.stdout).get("files") if rec.ok else None
    except json.JSONDecodeError:
        deployed = None
    if deployed != local:
        raise DeviceError(f"{dev.conn.spec} runs {Path(cur).name}, not {artifact}: deploy it "
                          f"first (`lprnet-edge deploy {artifact} --host ...`)")


def remote_counts_command(dev: Device, qdir: str, cpu: CpuModel, runtime: str, art: str,
                          report: str, runs: int) -> str:
    """The shell command that counts ``runs`` inferences of the deployed model on the board."""
    files = portable_files(find_tools("aarch64"))
    env = " ".join(f"{k}={_q(v)}" for k, v in {**DETERMINISTIC_ENV, "PYTHONPATH": runtime,
                                                 "TVM_USE_RUNTIME_LIB": "1"}.items())
    plugin = f"{qdir}/{files[2][1]},out={report},nr={GETPPID['aarch64']}"
    no_aslr = "$(command -v setarch >/dev/null && echo setarch -R)"
    return (f"cd {_q(dev.root)} && env {env} {no_aslr} {_qemu_prefix(qdir, files)} "
            f"-cpu {cpu.qemu_cpu} -plugin {_q(plugin)} {_q(dev.python)} -m {RUNNER} "
            f"--artifact {_q(art)} --runs {runs} --warmup 1")


def remote_estimate(dev: Device, cpu: CpuModel, runs: int = 1, artifact: str | None = None,
                    timeout: float = 3600) -> CostEstimate:
    """Estimated cycles of the board's deployed model (which must be ``artifact``, if given)
    on ``cpu``: counted on the board, weighed with llvm-mca here."""
    cur = dev.require_current()
    runtime, art = dev.runtime_of(cur)
    _check_deployed(dev, cur, artifact)
    qdir = install_qemu(dev)
    with dev.job_dir() as job, tempfile.TemporaryDirectory(prefix="lprnet-cost-") as tmp:
        res = dev.sh(remote_counts_command(dev, qdir, cpu, runtime, art, f"{job}/blocks.txt",
                                           runs), timeout=timeout, check=False)
        if not res.ok:
            raise DeviceError(f"the counted run failed on {dev.conn.spec} (exit {res.exit_code})"
                              f": {res.stderr.strip()[-800:]}")
        counts = parse_report(dev.conn.sftp.open(f"{job}/blocks.txt").read().decode())
        lib = Path(artifact) / "model.so" if artifact else Path(tmp) / "model.so"
        if not artifact:
            dev.conn.sftp.get(f"{art}/model.so", str(lib))
        counts = with_guest(counts, res.stdout, where=f"on {dev.conn.spec} under its qemu")
        program = Program(Path(cur).name, (), "aarch64", runs, lib=lib)
        return weigh_counts(program, cpu, counts, find_tools("aarch64").mca)
