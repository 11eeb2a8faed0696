"""PyTorch eager on the host as a runtime backend: the reference every artifact is compared
to, and what ``eval``/``recognize`` use without ``--artifact``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lprnet_edge.model.checkpoint import load_model
from lprnet_edge.model.weights import resolve_weights
from lprnet_edge.runtime.charset import load_charset
from lprnet_edge.runtime.recognizer import Recognizer


def flush_denormals_mode() -> None:
    """FTZ/DAZ on for this thread's PyTorch CPU kernels.

    Loading ONNX Runtime or TVM can reset the FPU mode, so code that times or runs torch calls
    this again right before it (it is cheap).
    """
    torch.set_flush_denormal(True)


class TorchBackend:
    """PyTorch eager on the host, denormals flushed (the fair baseline and the reference)."""

    name = "torch"

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        flush_denormals_mode()
        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def reference_recognizer(weights: str | Path | None = None, charset: str = "chinese68"
                         ) -> Recognizer:
    """A :class:`Recognizer` on the PyTorch checkpoint ``weights`` (resolved like every
    command: --weights, $LPRNET_EDGE_WEIGHTS, $LPRNET_EDGE_DATA, the cache)."""
    cs = load_charset(charset)
    return Recognizer(TorchBackend(load_model(resolve_weights(weights), len(cs))), cs)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch on ``n`` threads for the block (the reference beside the TVM runtime runs on one:
    at batch 1 its workers only spin against TVM's)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
