"""The fp32 original as a LiteRT (TFLite) flatbuffer, converted with litert-torch on the host.

litert-torch's own requirements would replace the host's PyTorch (it asks for a newer, CUDA
build) and pull in transformers; the conversion itself needs only the packages in
:data:`CONVERTER_PKGS`, which :func:`install_converter` puts in a folder of their own
(``cache_dir()/litert-torch``, pip ``--no-deps --target``) used on top of the installed torch.
The model converts as it is (NCHW input; the strided channel slice is supported). Cached in
``cache_dir()/litert`` under the weights' sha256.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lprnet_edge.model.checkpoint import load_model
from lprnet_edge.model.exports import ExportedFile, export_place
from lprnet_edge.model.lprnet import example_input
from lprnet_edge.paths import cache_dir
from lprnet_edge.runtime.errors import LprnetEdgeError, ToolchainError

_FORMAT = 1  # bump when the conversion changes, so cached files are not reused
CONVERTER_PKGS = (
    "litert-torch==0.10.0", "litert-converter==0.5.0", "ai-edge-litert==2.3.0",
    "ai-edge-quantizer==0.10.0", "jax==0.10.2", "jaxlib==0.10.2", "ml_dtypes==0.7.0",
    "torchao==0.18.0", "immutabledict", "multipledispatch", "opt_einsum", "absl-py",
    "backports.strenum", "jaxtyping", "wadler_lindig", "xdsl", "rich", "markdown-it-py",
    "mdurl", "pygments", "tabulate", "fire", "termcolor")


def converter_dir() -> Path:
    return cache_dir() / "litert-torch"


def install_converter(timeout: float = 1800.0) -> Path:
    """Install the converter's packages into :func:`converter_dir` (once; a stamp records
    the package list) and return that folder."""
    dest = converter_dir()
    stamp = dest / ".lprnet-edge-packages"
    if stamp.is_file() and stamp.read_text() == " ".join(CONVERTER_PKGS):
        return dest
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "--no-deps", "--upgrade", "--target", str(dest), *CONVERTER_PKGS]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise ToolchainError(f"installing the LiteRT converter failed: {r.stderr.strip()[-500:]}")
    stamp.write_text(" ".join(CONVERTER_PKGS))
    return dest


def _import_converter() -> object:
    dest = converter_dir()
    if dest.is_dir() and str(dest) not in sys.path:
        sys.path.append(str(dest))  # after the installed packages: the host's torch wins
    try:
        import litert_torch
    except ImportError as e:
        raise ToolchainError(
            f"the LiteRT converter is not installed ({e}): python -c 'from "
            "lprnet_edge.model.litert import install_converter; install_converter()'") from e
    return litert_torch


def export_litert(weights: str | Path | None = None, num_classes: int = 68,
                  cache: str | Path | None = None) -> ExportedFile:
    """The ``.tflite`` of ``weights``, converted on first use, then reused from the cache."""
    place = export_place(weights, cache, "litert", num_classes, f"v{_FORMAT}")
    src, sha, out_dir, out = (place.weights, place.weights_sha256, place.folder,
                              place.file(".tflite"))
    if out.is_file():
        return ExportedFile(out, src, sha, cached=True)
    litert_torch = _import_converter()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".litert-", suffix=".tflite")
    os.close(fd)
    try:
        model = load_model(src, num_classes).eval()
        try:
            litert_torch.convert(model, (example_input(),)).export(tmp)
        except Exception as e:  # the converter raises many types
            raise LprnetEdgeError(f"litert-torch cannot convert the model "
                                  f"({type(e).__name__}: {e})") from e
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return ExportedFile(out, src, sha, cached=False)
