"""Weights stored beside the compiled module, in a compact encoding decoded at load.

Runtime side (numpy only). One ``.npz`` file; each tensor is stored as one of:
``dense`` (float32), ``fp16`` (half precision), ``sparse`` (bitmask of non-zeros + their
values, in float32 or fp16), ``int8`` (per-channel symmetric int8 + float32 scales; the
channel is the first axis, or the last one for ``int8-last``: HWIO convolution weights) or
``raw`` (stored and loaded with its own integer or float type: the int8 graph's weights,
already quantized and packed by the compiler, see ``compiler.int8.precompute_params``).
Sparse storage is what makes an unstructured-pruned artifact smaller on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lprnet_edge.runtime.errors import ArtifactError

ENCODINGS = ("dense", "fp16", "sparse", "sparse-fp16", "int8", "int8-last", "raw")
RAW_DTYPES = ("int8", "uint8", "int32", "float32", "float64")


def encode(name: str, a: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    if encoding == "raw":
        return {name: _raw(name, np.asarray(a))}
    a = np.asarray(a, dtype=np.float32)
    if encoding == "dense":
        return {name: a}
    if encoding == "fp16":
        return {name: a.astype(np.float16)}
    if encoding in ("sparse", "sparse-fp16"):
        flat = a.ravel()
        mask = flat != 0
        vals = flat[mask].astype(np.float16 if encoding == "sparse-fp16" else np.float32)
        return {f"{name}::mask": np.packbits(mask), f"{name}::values": vals,
                f"{name}::shape": np.asarray(a.shape, dtype=np.int64)}
    if encoding in ("int8", "int8-last"):
        axes = tuple(range(1, a.ndim)) if a.ndim > 1 else ()
        if encoding == "int8-last":
            axes = tuple(range(a.ndim - 1))
        amax = np.abs(a).max(axis=axes, keepdims=True) if axes else np.abs(a)
        scale = (amax / 127.0).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0))  # all-zero (or denormal) channels
        q = np.clip(np.round(a / scale), -127, 127).astype(np.int8)
        return {f"{name}::q": q, f"{name}::scale": scale}
    raise ArtifactError(f"unknown params encoding {encoding!r}: use one of {list(ENCODINGS)}")


def _raw(name: str, a: np.ndarray) -> np.ndarray:
    """A ``raw`` tensor, refused unless it has one of the types a compiled module takes."""
    if a.dtype.name not in RAW_DTYPES:
        raise ArtifactError(f"params: {name} has type {a.dtype.name}; raw weights must be one "
                            f"of {list(RAW_DTYPES)} (rebuild the artifact)")
    return a


def decode(files: dict[str, np.ndarray], name: str, encoding: str) -> np.ndarray:
    if encoding == "raw":
        return _raw(name, files[name])
    if encoding == "dense":
        return files[name].astype(np.float32, copy=False)
    if encoding == "fp16":
        return files[name].astype(np.float32)
    if encoding in ("sparse", "sparse-fp16"):
        shape = tuple(int(s) for s in files[f"{name}::shape"])
        n = int(np.prod(shape))
        mask = np.unpackbits(files[f"{name}::mask"], count=n).astype(bool)
        out = np.zeros(n, dtype=np.float32)
        out[mask] = files[f"{name}::values"].astype(np.float32)
        return out.reshape(shape)
    if encoding in ("int8", "int8-last"):
        return files[f"{name}::q"].astype(np.float32) * files[f"{name}::scale"]
    raise ArtifactError(f"unknown params encoding {encoding!r}")


def save_params(path: str | Path, arrays: dict[str, np.ndarray],
                encodings: dict[str, str] | str = "dense") -> None:
    """Write ``arrays`` (name -> array; the order is kept) with per-tensor encodings."""
    enc = encodings if isinstance(encodings, dict) else dict.fromkeys(arrays, encodings)
    files: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        files.update(encode(name, a, enc.get(name, "dense")))
    index = {"order": list(arrays), "encodings": {n: enc.get(n, "dense") for n in arrays}}
    files["__index__"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez_compressed(f, **files)


def load_params(path: str | Path) -> dict[str, np.ndarray]:
    """Decode a params file, in the saved order: float32 arrays, and ``raw`` ones in their
    own type."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
        index = json.loads(files.pop("__index__").tobytes())
        return {n: decode(files, n, index["encodings"][n]) for n in index["order"]}
    except (OSError, KeyError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable params file ({e})") from e
