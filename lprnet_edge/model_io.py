"""Loading LPRNet checkpoints with checks that turn bad files into clear errors (host, torch)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from lprnet_edge.errors import WeightsError
from lprnet_edge.manifest import sha256_file
from lprnet_edge.model import LPRNet
from lprnet_edge.weights import KNOWN_SHA256

# Parameter whose first dimension is the class count.
_CLASS_KEY = "container.0.weight"


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
        raise WeightsError(f"{p}: not a readable PyTorch checkpoint (corrupt, or it holds "
                           "Python objects other than tensors, which are not loaded)") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise WeightsError(f"{p}: not a readable PyTorch checkpoint (corrupt or truncated?): "
                           f"{(str(e).splitlines() or [type(e).__name__])[0]}") from e
    except Exception as e:  # random bytes make the unpickler fail in many other ways
        raise WeightsError(f"{p}: not a readable PyTorch checkpoint (corrupt or truncated?): "
                           f"{type(e).__name__}") from e
    meta: dict = {}
    if isinstance(obj, dict) and "state_dict" in obj:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{p}: not an LPRNet state dict")
    return obj, meta


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
        raise WeightsError(f"{p}: not an LPRNet checkpoint (no {_CLASS_KEY})")
    found = int(sd[_CLASS_KEY].shape[0])
    if found != num_classes:
        raise WeightsError(
            f"{p}: the checkpoint has {found} output classes but the charset has "
            f"{num_classes}; use the matching --charset or weights"
        )
    model = LPRNet(class_num=num_classes, widths=meta.get("widths"))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise WeightsError(f"{p}: weights do not fit LPRNet: {str(e).splitlines()[0]}") from e
    return model.eval()


def save_checkpoint(model: LPRNet, path: str | Path, **meta: object) -> None:
    """Save weights with the metadata needed to rebuild the (possibly pruned) architecture."""
    torch.save({"state_dict": model.state_dict(), "widths": model.widths,
                "class_num": model.class_num, **meta}, path)
