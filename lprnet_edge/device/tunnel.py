"""A TVM RPC server started on the device over SSH, reached through an SSH tunnel.

The server binds the device's 127.0.0.1 only: nothing is exposed on the network, and the host
reaches it through a ``direct-tcpip`` channel of the SSH connection it already trusts. It is
started in its own session so that it can be stopped as a process group, and always is.
Tuning on the device (``build --tune --host``) and ``bench --host --tunnel`` use it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from shlex import quote
from typing import Any

from lprnet_edge.compiler.session import Session, in_child_process, time_artifact
from lprnet_edge.device.device import Device
from lprnet_edge.device.remote import DeviceBench
from lprnet_edge.runtime.artifact import Artifact, machine_arch
from lprnet_edge.runtime.errors import ArtifactError, DeviceError

SERVER_TIMEOUT = 180  # s for the server to listen (its first `import tvm` under emulation)
SESSION_TIMEOUT = 1800

_EXTRA_LIB = ("import os, tvm; p = os.path.join(os.path.dirname(tvm.__file__), 'lib', "
              "'libtvm_runtime_extra.so'); print(p if os.path.exists(p) else '')")
_FREE_PORT = ("import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); "
              "print(s.getsockname()[1])")


@dataclass(frozen=True)
class RpcServer:
    """A server started on the device: its process (group) id, port and log file there."""

    pid: int
    port: int
    log: str


def _wait_script(port: int, timeout: float) -> str:
    return (f"import socket, time, sys\nend = time.time() + {timeout}\n"
            "while time.time() < end:\n"
            "    try:\n"
            f"        socket.create_connection(('127.0.0.1', {port}), 1).close(); sys.exit(0)\n"
            "    except OSError: time.sleep(0.5)\n"
            "sys.exit(1)\n")


def start_rpc_server(dev: Device, port: int | None = None, timeout: float = SERVER_TIMEOUT,
                     load_library: str | None = "auto") -> RpcServer:
    """Start ``python -m tvm.exec.rpc_server`` on the device's 127.0.0.1, in its own session
    (so it can be stopped as a process group), and wait until it listens.

    ``load_library="auto"`` loads the wheel's ``libtvm_runtime_extra.so`` when it is there:
    a runtime-only server lacks ``random_fill``, which MetaSchedule's measurements call.
    """
    dev.mkdirs()
    env = "TVM_USE_RUNTIME_LIB=1 " if dev.runtime_lib_only else ""
    py = quote(dev.python)
    if load_library == "auto":
        load_library = dev.sh(f"{env}{py} -c {quote(_EXTRA_LIB)}",
                              check=False).stdout.strip() or None
    if port is None:
        port = int(dev.sh(f"{py} -c {quote(_FREE_PORT)}").stdout.strip())
    log = f"{dev.root}/tmp/rpc-{port}.log"
    extra = f" --load-library {quote(load_library)}" if load_library else ""
    res = dev.sh(f"cd {quote(dev.root)}/tmp || exit 1; {env}setsid nohup {py} -m "
                 f"tvm.exec.rpc_server --host 127.0.0.1 --port {port} --port-end {port + 1}"
                 f"{extra} > {quote(log)} 2>&1 < /dev/null & echo $!")
    server = RpcServer(int(res.stdout.strip().splitlines()[-1]), port, log)
    wait = _wait_script(port, timeout)
    if not dev.sh(f"{py} -c {quote(wait)}", check=False, timeout=timeout + 30).ok:
        logtext = dev.sh(f"tail -n 20 {quote(log)}", check=False).stdout
        stop_rpc_server(dev, server)
        raise DeviceError(f"the TVM RPC server on {dev.spec} did not listen on port {port} "
                          f"within {timeout:g}s: {logtext.strip()[-1000:]}")
    return server


def stop_rpc_server(dev: Device, server: RpcServer) -> None:
    """Kill the server's process group (its popen_worker child survives SIGTERM alone)."""
    dev.sh(f"kill -TERM -- -{server.pid} 2>/dev/null; sleep 1; "
           f"kill -KILL -- -{server.pid} 2>/dev/null; rm -f {quote(server.log)}; true",
           check=False)


@contextlib.contextmanager
def device_rpc(dev: Device, port: int | None = None, server_timeout: float = SERVER_TIMEOUT
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
              port: int | None = None, server_timeout: float = SERVER_TIMEOUT,
              session_timeout: float = SESSION_TIMEOUT) -> DeviceBench:
    """Time the model of a local ``artifact`` on the device with ``time_evaluator``, through
    a TVM RPC server bound to the device's localhost and an SSH tunnel to it."""
    root = Path(artifact)
    target = Artifact.open(root, check_arch=False).manifest.target
    want, have = target.arch, machine_arch(dev.machine())
    if want and want != have:
        raise ArtifactError(f"{root} is built for {want} but {dev.spec} is {have}")
    with device_rpc(dev, port, server_timeout) as lport:
        t0 = time.perf_counter()
        limit = session_timeout + 120
        timed = in_child_process(
            _rpc_time_child, lport, str(root), number, repeat, session_timeout, timeout=limit,
            on_timeout=lambda: DeviceError(f"the RPC benchmark did not finish in {limit:g}s"))
        session_s = time.perf_counter() - t0
    latency = {**timed["stats"], "include_preprocess": False, "backend": "tvm",
               "repeat": repeat, "target": target.to_dict(), "session_seconds": session_s,
               "output_shape": timed["output_shape"], "port": lport}
    return DeviceBench(host=dev.spec, mode="rpc", machine=have, latency=latency)


def _rpc_time_child(local_port: int, artifact: str, number: int, repeat: int,
                    session_timeout: float) -> dict[str, Any]:
    """In a spawned child: open the RPC session through the tunnel and time the artifact
    there with the same code as a local ``bench``
    (:func:`lprnet_edge.compiler.session.time_artifact`)."""
    from tvm import rpc  # the child imports TVM; the parent pumping the tunnel need not

    try:
        sess = rpc.connect("127.0.0.1", local_port, session_timeout=session_timeout)
    except Exception as e:
        raise DeviceError(f"cannot open a TVM RPC session through the SSH tunnel: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                          ) from None
    res = time_artifact(Path(artifact), Session("rpc", "SSH tunnel", sess, 3600),
                        number=number, repeat=repeat, warmup=2)
    return {"stats": res.timing.to_dict(), "output_shape": res.output_shape}
