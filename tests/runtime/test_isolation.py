"""The runtime ships alone: ``lprnet_edge/runtime/`` imports nothing else of the package, and it
runs (load an artifact, recognize, evaluate) with torch and the TVM compiler unavailable.

(a) by import graph: every import statement of every runtime module, the lazy ones inside
functions included, and importlib calls with a literal name; (b) by running it in a
subprocess whose import system refuses ``torch*`` and ``tvm.relax*``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, copy_images

RUNTIME = REPO / "lprnet_edge" / "runtime"
# What the board has: the standard library, numpy, OpenCV and the TVM runtime.
ALLOWED_THIRD_PARTY = {"numpy", "cv2", "tvm", "tvm.runtime", "tvm.runtime.vm", "tvm_ffi"}
FORBIDDEN_PREFIXES = ("torch", "tvm.relax", "tvm.s_tir", "tvm.tir", "tvm.te", "tvm.target",
                      "tvm.contrib", "tvm.meta_schedule", "onnx", "onnxruntime", "click",
                      "paramiko")
# Optional packages a runtime module may import lazily, behind an ImportError fallback: the
# device bench times ONNX Runtime beside the artifact when it is installed on the board.
# Peer runtimes live on a board only where the user installs them (`emulated-pi peers`).
OPTIONAL_ON_BOARD = {"baselines.py": {"onnxruntime"}, "peers.py": {"onnxruntime"},
                     "cost_runner.py": {"onnxruntime"}}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, wherever it is written."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = "lprnet_edge.runtime"
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            if mod in ("lprnet_edge", "lprnet_edge.runtime"):  # from pkg import submodule
                found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and node.args \
                    and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_imports_parser_sees_lazy_and_relative_imports(tmp_path: Path):
    src = tmp_path / "m.py"
    src.write_text(textwrap.dedent("""
        import os
        def f():
            from lprnet_edge.model import lprnet
            from ..compiler import build
            import importlib
            importlib.import_module("lprnet_edge.pipeline.build")
    """))
    mods = {m for _, m in imports_of(src)}
    assert mods == {"os", "lprnet_edge.model", "lprnet_edge.compiler", "importlib",
                    "lprnet_edge.pipeline.build"}


def test_runtime_imports_nothing_above_it():
    files = sorted(RUNTIME.glob("*.py"))
    assert len(files) >= 10, files
    bad = []
    for f in files:
        for line, mod in imports_of(f):
            rel = f"{f.relative_to(REPO)}:{line}"
            if mod.startswith("lprnet_edge") and not (
                    mod == "lprnet_edge.runtime" or mod.startswith("lprnet_edge.runtime.")):
                bad.append(f"{rel} imports {mod}")
            if mod.startswith(FORBIDDEN_PREFIXES) and mod not in OPTIONAL_ON_BOARD.get(f.name,
                                                                                     ()):
                bad.append(f"{rel} imports {mod} (not on the board)")
            top = mod.split(".")[0]
            if top in {"tvm", "tvm_ffi"} and mod not in ALLOWED_THIRD_PARTY:
                bad.append(f"{rel} imports {mod} (only the TVM runtime ships)")
    assert not bad, "\n".join(bad)


BLOCKED_RUN = textwrap.dedent('''
    import importlib.abc
    import json
    import sys


    class Block(importlib.abc.MetaPathFinder):
        """torch and the TVM compiler are not installed on the board."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch" or name == "tvm.relax" \\
                    or name.startswith("tvm.relax."):
                raise ImportError(f"blocked for this test: {name}")
            return None


    sys.meta_path.insert(0, Block())
    for probe in ("torch", "tvm.relax"):
        try:
            __import__(probe)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{probe} was importable: the test would prove nothing")

    from lprnet_edge.runtime.evaluate import evaluate
    from lprnet_edge.runtime.recognizer import Recognizer

    artifact, folder = sys.argv[1], sys.argv[2]
    rec = Recognizer.from_artifact(artifact)
    paths = sorted(str(p) for p in __import__("pathlib").Path(folder).iterdir())
    reads = rec.recognize(paths)
    res = evaluate(rec, folder)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "torch"
                    or m.startswith("tvm.relax"))
    print(json.dumps({"reads": [[r.text, r.confidence] for r in reads], "count": res.count,
                      "correct": res.correct, "loaded": loaded,
                      "backend": rec.backend_name}, ensure_ascii=False))
''')


@pytest.mark.slow
def test_runtime_runs_without_torch_and_the_compiler(tiny_tvm_artifact, test_images, tmp_path):
    from lprnet_edge.runtime.evaluate import evaluate
    from lprnet_edge.runtime.recognizer import Recognizer

    folder = copy_images(test_images[:4], tmp_path / "plates")
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED_RUN, encoding="utf-8")
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    env.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, str(script), str(tiny_tvm_artifact), str(folder)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    got = json.loads(p.stdout)
    assert got["loaded"] == [] and got["backend"] == "tvm"
    # The same reads as the runtime in this (unrestricted) process.
    rec = Recognizer.from_artifact(tiny_tvm_artifact)
    here = rec.recognize(sorted(str(q) for q in folder.iterdir()))
    assert [t for t, _ in got["reads"]] == [r.text for r in here]
    assert [c for _, c in got["reads"]] == pytest.approx([r.confidence for r in here],
                                                         abs=1e-6)
    res = evaluate(rec, folder)
    assert (got["count"], got["correct"]) == (res.count, res.correct) == (4, res.correct)
