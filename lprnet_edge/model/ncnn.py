"""The fp32 original as an ncnn graph (``.param`` + ``.bin``), converted with pnnx on the host.

pnnx turns the export-friendly LPRNet's strided channel slice ``x[:, ::s]`` (which stands in
for the original's ``MaxPool3d``) into a ``Tensor.slice`` layer that ncnn does not register, so
the graph would not load. :class:`SliceFreeChannelPool` computes the same tensor from layers
ncnn has: after the 3x3 pool, channel ``s*k`` is the first ``h*w`` values of row ``k`` of the
tensor reshaped to ``(n, c/s, s*h*w)``; a reshape, a unit-step crop and a reshape back. Pure
data movement, so the logits are those of the slice, bit for bit.

The conversion runs once per weights file (cached in ``cache_dir()/ncnn`` under the weights'
sha256), with fp32 weights (pnnx's default stores fp16).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lprnet_edge.model.checkpoint import load_model
from lprnet_edge.model.lprnet import ChannelStridedMaxPool, LPRNet, example_input
from lprnet_edge.model.weights import resolve_weights
from lprnet_edge.paths import cache_dir
from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError
from lprnet_edge.runtime.files import sha256_file

_FORMAT = 1  # bump when the conversion changes, so cached files are not reused


class SliceFreeChannelPool(nn.Module):
    """:class:`ChannelStridedMaxPool` without a strided slice (see the module docstring)."""

    def __init__(self, pool: ChannelStridedMaxPool) -> None:
        super().__init__()
        self.channel_stride = pool.channel_stride
        self.pool = pool.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        s = self.channel_stride
        if s == 1:
            return x
        n, c, h, w = x.shape
        rows = x.reshape(n, c // s, s * h * w)
        return rows[:, :, : h * w].reshape(n, c // s, h, w)


def ncnn_friendly(model: LPRNet) -> LPRNet:
    """``model`` with every channel-strided pool replaced by :class:`SliceFreeChannelPool`
    (in place; the weights are shared)."""
    for i, layer in enumerate(model.backbone):
        if isinstance(layer, ChannelStridedMaxPool):
            model.backbone[i] = SliceFreeChannelPool(layer)
    return model.eval()


@dataclass(frozen=True)
class NcnnExport:
    """A converted model: ``param`` (``bin`` beside it), the weights and their sha256."""

    param: Path
    bin: Path
    weights: Path
    weights_sha256: str
    cached: bool


def export_ncnn(weights: str | Path | None = None, num_classes: int = 68,
                cache: str | Path | None = None) -> NcnnExport:
    """The ncnn graph of ``weights`` (resolved like every command), converted by pnnx on first
    use and then reused from the cache (keyed by the weights' sha256)."""
    src = resolve_weights(weights)
    sha = sha256_file(src)
    out_dir = Path(cache) if cache else cache_dir() / "ncnn"
    stem = f"lprnet-{sha[:16]}-c{num_classes}-v{_FORMAT}"
    param, binf = out_dir / f"{stem}.param", out_dir / f"{stem}.bin"
    if param.is_file() and binf.is_file():
        return NcnnExport(param, binf, src, sha, cached=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".pnnx-") as tmp:
        t_param, t_bin = _convert(ncnn_friendly(load_model(src, num_classes)), Path(tmp))
        os.replace(t_bin, binf)  # the .bin first: a .param alone is not taken as cached
        os.replace(t_param, param)
    return NcnnExport(param, binf, src, sha, cached=False)


def _convert(model: nn.Module, work: Path) -> tuple[Path, Path]:
    """pnnx: TorchScript trace -> ncnn ``.param``/``.bin`` (fp32) in ``work``."""
    try:
        import pnnx
    except ImportError as e:
        raise ToolchainError(f"pnnx is not installed ({e}): pip install pnnx") from e
    param, binf = work / "model.ncnn.param", work / "model.ncnn.bin"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            pnnx.export(model, str(work / "model.pt"), (example_input(),), fp16=False,
                        ncnnparam=str(param), ncnnbin=str(binf),
                        pnnxparam=str(work / "model.pnnx.param"),
                        pnnxbin=str(work / "model.pnnx.bin"), pnnxpy=str(work / "model_pnnx.py"),
                        pnnxonnx=str(work / "model.pnnx.onnx"), ncnnpy=str(work / "model_ncnn.py"))
        except Exception as e:  # pnnx raises many types
            raise LprnetEdgeError(f"pnnx cannot convert the model ({type(e).__name__}: {e})") from e
    if not (param.is_file() and binf.is_file()):
        raise LprnetEdgeError(f"pnnx wrote no ncnn graph in {work}")
    unsupported = [ln.split()[0] for ln in param.read_text().splitlines()[2:]
                   if ln.split() and "." in ln.split()[0]]
    if unsupported:
        raise LprnetEdgeError("pnnx left layers ncnn does not register: "
                              f"{sorted(set(unsupported))}")
    shutil.rmtree(work / "__pycache__", ignore_errors=True)
    return param, binf
