"""The package's layering, checked on the source: what ships to a board is one folder, and
nothing imports upward (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lprnet_edge"

# Low to high; a module may import its own layer or lower ones. pipeline and device are peers.
RANK = {"runtime": 0, "errors": 0, "paths": 0, "model": 1, "compress": 2, "compiler": 3,
        "pipeline": 4, "device": 4, "report": 5, "cli": 6}
PEERS = {frozenset({"pipeline", "device"})}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lprnet_edge":
                out += [(node.lineno, f"lprnet_edge.{a.name}") for a in node.names]
            elif node.module.startswith("lprnet_edge."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("lprnet_edge")]
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_upward_import(path: Path):
    layer = _layer(path)
    if layer not in RANK:
        pytest.skip(f"{layer} is not a layer")
    bad = []
    for line, name in _imports(path):
        parts = name.split(".")
        target = parts[1] if len(parts) > 1 else ""
        if target not in RANK or target == layer:
            continue
        if layer == "runtime" or (RANK[target] > RANK[layer]
                                  and frozenset({layer, target}) not in PEERS):
            bad.append(f"line {line}: {layer} imports {name}")
    assert not bad, bad


def test_runtime_imports_only_itself():
    """``deploy`` ships ``lprnet_edge/runtime/`` (and the package ``__init__``) alone."""
    outside = [(p.name, n) for p in (PKG / "runtime").rglob("*.py") for _, n in _imports(p)
               if not n.startswith("lprnet_edge.runtime")]
    assert outside == []
    init = [n for _, n in _imports(PKG / "__init__.py")]
    assert init and all(n.startswith("lprnet_edge.runtime") for n in init), init


def test_plain_imports_only():
    """No importlib for in-package modules: a broken module must fail loudly, not vanish."""
    offenders = [str(p.relative_to(PKG)) for p in _modules()
                 if "import_module(" in p.read_text(encoding="utf-8")]
    assert offenders == []
