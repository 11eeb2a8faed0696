"""TVM compiler plumbing shared by the compiler modules: the guarded import and error text."""

from __future__ import annotations

from typing import Any

from lprnet_edge.runtime.errors import ToolchainError


def import_tvm_compiler() -> Any:
    """``tvm`` with its compiler (``tvm.relax``), or a ToolchainError saying how to get it."""
    try:
        import tvm
        from tvm import relax  # noqa: F401  (fails on a runtime-only install)
    except ImportError as e:
        raise ToolchainError(
            "the TVM compiler is not available: pip install 'lprnet-edge[host]' "
            f"(apache-tvm==0.27.*, apache-tvm-ffi==0.1.14.post1) ({e})"
        ) from e
    return tvm


def _lines(e: BaseException) -> list[str]:
    return [ln for ln in str(e).strip().splitlines() if ln.strip()]


def first_line(e: BaseException) -> str:
    lines = _lines(e)
    return lines[0] if lines else type(e).__name__


def last_line(e: BaseException) -> str:
    lines = _lines(e)
    return lines[-1] if lines else type(e).__name__


def tail(e: BaseException, n: int = 6) -> str:
    lines = _lines(e)
    return " | ".join(lines[-n:]) if lines else type(e).__name__
