"""Loading LPRNet checkpoints with checks that turn bad files into clear errors (host, torch)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from lprnet_edge.model.lprnet import LPRNet
from lprnet_edge.model.weights import KNOWN_SHA256
from lprnet_edge.runtime.errors import WeightsError
from lprnet_edge.runtime.files import sha256_file

# Parameter whose first dimension is the class count.
_CLASS_KEY = "container.0.weight"
EXPECTED = ("expected an LPRNet PyTorch checkpoint (.pth): the sirius-ai weights "
            "(`lprnet-edge weights download`) or a file written by `lprnet-edge compress`")
# First bytes of files users pass by mistake, and what they are.
_MAGIC = ((b"\x7fELF", "a compiled shared object (an artifact's model.so?)"),
          (b"\x93NUMPY", "a NumPy .npy array"),
          (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"\x1f\x8b", "a gzip file (an artifact bundle .tar.gz?)"))


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict of a checkpoint and its extra metadata (``widths`` for pruned models).

    Accepts the upstream file (a bare state dict) and lprnet-edge's own
    ``{"state_dict": ..., "widths": ..., "class_num": ...}``.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: weights file not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain containers.
        what = _what_it_is(p, "corrupt, or it holds Python objects other than tensors, which "
                              "are not loaded")
        raise WeightsError(f"{p}: {what}; {EXPECTED}") from e
    except Exception as e:  # random bytes make the unpickler fail in many ways (KeyError...)
        raise WeightsError(f"{p}: {_what_it_is(p, 'corrupt or truncated')}; {EXPECTED}") from e
    meta: dict = {}
    if isinstance(obj, dict) and "state_dict" in obj:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        held = (f"a dict with keys {', '.join(map(str, list(obj)[:5]))}"
                if isinstance(obj, dict) else f"a {type(obj).__name__}")
        raise WeightsError(f"{p}: a PyTorch file, but it holds {held}, not a state dict of "
                           f"tensors; {EXPECTED}")
    return obj, meta


def _what_it_is(p: Path, otherwise: str) -> str:
    """What a file that torch cannot load looks like, from its first bytes."""
    with open(p, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"not a PyTorch checkpoint: {what}"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            names = []
        if names and all(n.endswith(".npy") for n in names):
            return "not a PyTorch checkpoint: a NumPy .npz archive (an artifact's params.npz?)"
        if names and not any(n.endswith("data.pkl") for n in names):
            return "not a PyTorch checkpoint: a zip archive"
    elif head.lstrip()[:1] in (b"{", b"[") or all(32 <= b < 127 or b in b"\t\r\n"
                                                   for b in head):
        return "not a PyTorch checkpoint: a text file"
    return f"not a readable PyTorch checkpoint ({otherwise})"


def load_model(path: str | Path, num_classes: int = 68, check_sha: bool = True) -> LPRNet:
    """An eval-mode LPRNet with the weights of ``path``, checked against the charset size."""
    p = Path(path)
    sd, meta = read_state_dict(p)
    if check_sha and not meta:
        # A file named like a known upstream checkpoint must be that file.
        for spec in KNOWN_SHA256.values():
            if p.name == spec.filename and sha256_file(p) != spec.sha256:
                raise WeightsError(
                    f"{p}: sha256 does not match the published {spec.name} weights "
                    f"({spec.sha256[:12]}...): the file is corrupt or not the original; "
                    "re-download it with `lprnet-edge weights download --force`"
                )
    if _CLASS_KEY not in sd:
        raise WeightsError(f"{p}: a state dict, but not LPRNet's (no {_CLASS_KEY}); "
                           f"{EXPECTED}")
    found = int(sd[_CLASS_KEY].shape[0])
    if found != num_classes:
        raise WeightsError(
            f"{p}: the checkpoint has {found} output classes but the charset has "
            f"{num_classes}; use weights trained for this charset"
        )
    model = LPRNet(class_num=num_classes, widths=meta.get("widths"))
    _check_keys(p, model.state_dict(), sd)
    model.load_state_dict(flush_denormals(sd))
    # FTZ/DAZ for this thread's torch kernels too (calibration, distillation, pruning run on
    # the loaded model): activations can go subnormal as well. TorchBackend sets it again
    # before each call, since loading ONNX Runtime or TVM can reset the FPU mode.
    torch.set_flush_denormal(True)
    return model.eval()


def flush_denormals(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with subnormal floats set to exact zeros.

    34% of the published checkpoint's weights are subnormal (|w| < 1.2e-38): numerically
    nothing, but x86 CPUs take a microcode assist for each one, which makes PyTorch eager ~10x
    slower. Zeroing them leaves every logit unchanged to float32 precision (tested on test/).
    """
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            v = torch.where(v.abs() < torch.finfo(v.dtype).tiny, torch.zeros_like(v), v)
        out[k] = v
    return out


def _check_keys(p: Path, expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> None:
    """Name the first missing, unexpected or mis-shaped weight instead of torch's long dump."""
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    shapes = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if extra:
        problems.append(f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else ""))
    for k, got, want in shapes[:3]:
        problems.append(f"{k} has shape {list(got)}, LPRNet expects {list(want)}")
    if problems:
        raise WeightsError(f"{p}: weights do not fit LPRNet: {'; '.join(problems)} "
                           "(is this an LPRNet checkpoint of sirius-ai's architecture?)")


def save_checkpoint(model: LPRNet, path: str | Path, **meta: object) -> None:
    """Save weights with the metadata needed to rebuild the (possibly pruned) architecture."""
    torch.save({"state_dict": model.state_dict(), "widths": model.widths,
                "class_num": model.class_num, **meta}, path)
