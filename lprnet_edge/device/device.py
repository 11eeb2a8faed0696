"""A device reached over SSH, and lprnet-edge's directory on it.

Layout on the device (``--remote-dir``, default ``~/.lprnet-edge``)::

    venv/                                 python with numpy, opencv, apache-tvm (set up once)
    deployments/<name>-<timestamp>/       one self-contained deployment:
        artifact/                           model.so, params.npz, manifest.json
        runtime/lprnet_edge/                the lprnet_edge package that runs it
        deployment.json, SHA256SUMS
    current -> deployments/<name>-<timestamp>
    tmp/                                  uploads of remote recognize/eval, removed after use

The host never imports the model's code to talk to the device: it runs the runtime's agent
there (``python -m lprnet_edge.runtime.agent``), which answers with one JSON document, so the
device needs nothing but the deployment's own runtime and its venv.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Callable, Iterator
from shlex import quote
from typing import Any

from lprnet_edge.device.ssh import CommandResult, SshConnection
from lprnet_edge.runtime.errors import ArtifactError, DataError, DeviceError, LprnetEdgeError

DEFAULT_REMOTE_DIR = "~/.lprnet-edge"
AGENT = "lprnet_edge.runtime.agent"
_TS_RE = re.compile(r"-(\d{8}T\d{6}\.\d{6}Z)$")
# The agent's errors that mean the same on the host; any other is a device failure.
_AGENT_ERRORS: dict[str, type[LprnetEdgeError]] = {"ArtifactError": ArtifactError,
                                                    "DataError": DataError}

Progress = Callable[[int, int], None]


def format_mb(n: int) -> str:
    """Bytes as the megabytes the disk-space messages print."""
    return f"{n / 1e6:.1f} MB"


def deployment_stamp(name: str) -> str | None:
    """The timestamp ending a deployment's name (``<name>-<timestamp>``), None if there is none."""
    m = _TS_RE.search(name)
    return m.group(1) if m else None


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

    @property
    def spec(self) -> str:
        """``user@host[:port]``, as messages name the device."""
        return str(self.conn.spec)

    def sh(self, command: str, **kw: Any) -> CommandResult:
        return self.conn.run(command, **kw)

    @property
    def python(self) -> str:
        """The venv's python when it is set up, else the system's ``python3``."""
        if self._python is None:
            venv = f"{self.root}/venv/bin/python"
            ok = self.sh(f"test -x {quote(venv)}", check=False).ok
            self._python = venv if ok else "python3"
        return self._python

    def machine(self) -> str:
        return self.sh("uname -m").stdout.strip()

    def free_bytes(self, path: str) -> int:
        out = self.sh(f"df -Pk {quote(path)} | tail -n 1").stdout.split()
        try:
            return int(out[3]) * 1024
        except (IndexError, ValueError):
            raise DeviceError(f"cannot read free space of {path} on {self.spec}") from None

    def mkdirs(self) -> None:
        self.sh(f"mkdir -p {quote(self.root)}/deployments {quote(self.root)}/tmp")

    # ---------------------------------------------------------------- the agent

    def agent(self, runtime: str, args: list[str], timeout: float | None = None,
              progress: Progress | None = None, log: Callable[[str], None] | None = None,
              module: str = AGENT) -> Any:
        """Run ``python -m MODULE ARGS`` (the agent, or another runtime module that speaks its
        JSON protocol) with ``runtime`` on PYTHONPATH; returns its ``result``.

        The agent reports progress as ``PROGRESS done total`` lines on stderr and its answer
        as the last JSON line on stdout; its errors come back as the same exception types."""
        env = f"PYTHONPATH={quote(runtime)} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1"
        if self.runtime_lib_only:
            env += " TVM_USE_RUNTIME_LIB=1"
        cmd = (f"cd {quote(self.root)} && {env} {quote(self.python)} -m {module} "
               + " ".join(quote(a) for a in args))

        def on_line(line: str) -> None:
            if line.startswith("PROGRESS ") and progress:
                with contextlib.suppress(ValueError):
                    done, total = (int(x) for x in line.split()[1:3])
                    progress(done, total)
            elif log and line.strip():
                log(line)

        res = self.conn.run(cmd, timeout=timeout, check=False, on_stderr_line=on_line)
        return self._agent_result(res)

    def _agent_result(self, res: CommandResult) -> Any:
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
            raise DeviceError(f"device agent failed on {self.spec} (exit {res.exit_code})"
                              f": {tail}")
        if not doc["ok"]:
            kind = _AGENT_ERRORS.get(doc.get("type", ""), DeviceError)
            raise kind(f"on {self.spec}: {doc.get('error')}")
        return doc["result"]

    # ---------------------------------------------------------------- deployments

    def current(self) -> str | None:
        """Absolute path of the current deployment (None if nothing is deployed)."""
        res = self.sh(f"readlink -f {quote(self.root)}/current && "
                      f"test -d {quote(self.root)}/current", check=False)
        return res.stdout.strip() if res.ok and res.stdout.strip() else None

    def deployments(self) -> list[str]:
        """Deployment names, oldest first."""
        res = self.sh(f"ls -1 {quote(self.root)}/deployments 2>/dev/null", check=False)
        names = [n for n in res.stdout.split() if deployment_stamp(n) and not n.startswith(".")]
        return sorted(names, key=deployment_stamp)

    def switch_to(self, name: str) -> None:
        """Make ``deployments/name`` current with an atomic symlink replacement."""
        tmp = f".current.{secrets.token_hex(4)}"
        self.sh(f"cd {quote(self.root)} && ln -sfn deployments/{quote(name)} {tmp} && "
                f"mv -T {tmp} current")

    def runtime_of(self, deployment_path: str) -> tuple[str, str]:
        """The (runtime folder, artifact folder) of a deployment."""
        return f"{deployment_path}/runtime", f"{deployment_path}/artifact"

    def record_of(self, deployment_path: str) -> dict[str, Any] | None:
        """A deployment's ``deployment.json`` (None when it is missing or unreadable)."""
        rec = self.sh(f"cat {quote(deployment_path)}/deployment.json", check=False)
        if not rec.ok:
            return None
        with contextlib.suppress(json.JSONDecodeError):
            doc = json.loads(rec.stdout)
            return doc if isinstance(doc, dict) else None
        return None

    def require_current(self) -> str:
        cur = self.current()
        if cur is None:
            raise DeviceError(f"nothing is deployed on {self.spec} under {self.root}: "
                              "run `lprnet-edge deploy ARTIFACT --host ...` first")
        return cur

    @contextlib.contextmanager
    def job_dir(self) -> Iterator[str]:
        """A temporary directory on the device, removed afterwards (if still reachable)."""
        self.mkdirs()
        d = f"{self.root}/tmp/job-{secrets.token_hex(6)}"
        self.sh(f"mkdir -p {quote(d)}")
        try:
            yield d
        finally:
            with contextlib.suppress(LprnetEdgeError):
                self.sh(f"rm -rf {quote(d)}", timeout=120)
