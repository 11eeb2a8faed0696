"""TVM worker processes start without torch (see lprnet_edge.compiler.worker_env)."""

from __future__ import annotations

import subprocess
import sys

from lprnet_edge.compiler.worker_env import worker_env


def test_worker_env_keeps_torch_out():
    code = ("import sys\ntry:\n    import torch\nexcept ImportError:\n    pass\n"
            "import inspect, lprnet_edge\nprint('torch' in sys.modules, "
            "inspect.getmodule.__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=worker_env(), text=True,
                         capture_output=True, check=True).stdout.split()
    assert out == ["False", "_getmodule"]
