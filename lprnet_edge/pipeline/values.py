"""The values a build passes from stage to stage (tvmc style):
``TorchModel -> RelaxModel -> CompiledModule -> Artifact``.

The step functions (:mod:`.steps`) take one and return the next, so the search's candidate
builds reuse them outside a build, and a new stage only has to agree on these types.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lprnet_edge.compiler.frontend import ENTRY
from lprnet_edge.compiler.target import TargetSpec
from lprnet_edge.compiler.toolchain import Compiler
from lprnet_edge.runtime.artifact import (
    Artifact,
    FileEntry,
    InputSpec,
    Manifest,
    RuntimeSpec,
    TargetInfo,
)
from lprnet_edge.runtime.charset import Charset
from lprnet_edge.runtime.preprocess import Preprocess

MODEL_FILE = "model.so"
PARAMS_FILE = "params.npz"
LOSSLESS = ("dense", "sparse")  # storage encodings that decode to the exact weights
Log = Callable[[str], None]


@dataclass
class TorchModel:
    """A PyTorch model on its way to an artifact, with where it came from and what was done
    to it.

    ``model`` is what gets compiled: an ``nn.Module``, or a
    :class:`lprnet_edge.compress.api.CompressedModel` (``compiler.frontend.to_relax``
    dispatches on its type: a quantized one compiles its int8 convolutions as int8).
    ``reference`` is the PyTorch module verification compares against (None: no logit
    comparison); ``original`` is the model as loaded, the one the accuracy check compares
    with. ``stages`` are the configs applied and ``reports`` what each step reported, both in
    the order they ran (the manifest keeps that order).
    """

    model: Any
    reference: Any
    original: Any
    weights: Path
    weights_sha256: str
    charset: Charset
    stages: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)
    param_encodings: dict[str, str] | None = None  # state-dict or compiled names -> encoding
    verify_tolerance: float | None = None  # overrides CompileConfig.verify_tolerance
    calib: Any = None  # a fine-tuning's data: its validation split is every later stage's

    def tolerance(self, default: float) -> float:
        return self.verify_tolerance if self.verify_tolerance is not None else default


@dataclass(frozen=True)
class RelaxModel:
    mod: Any  # tvm.IRModule, main(x, *params)
    params: dict[str, np.ndarray]  # in main's order
    frontend: str
    import_s: float = 0.0


@dataclass
class CompiledModule:
    """``model.so`` and ``params.npz`` written in ``root`` (the staging directory)."""

    root: Path
    target: TargetSpec
    compiler: Compiler
    param_order: list[str]
    encodings: dict[str, str]
    info: dict[str, Any]
    extra_files: list[str] = field(default_factory=list)  # e.g. verify.npz for the device

    @property
    def files(self) -> list[str]:
        """Every file of the artifact but the manifest, as listed (and checksummed) in it."""
        return [MODEL_FILE, PARAMS_FILE, *self.extra_files]

    @property
    def lib_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def params_path(self) -> Path:
        return self.root / PARAMS_FILE

    @property
    def lossy(self) -> bool:
        """Some weights are stored in an encoding that does not decode to their exact value."""
        return any(e not in LOSSLESS for e in self.encodings.values())

    def runtime_entry(self, num_threads: int | None = None) -> RuntimeSpec:
        return RuntimeSpec(entry=ENTRY, params=PARAMS_FILE, param_order=tuple(self.param_order),
                           num_threads=num_threads or None)

    def artifact(self, charset: Charset, num_threads: int | None = None,
                 records: dict[str, Any] | None = None) -> Artifact:
        """The staged directory as an :class:`Artifact` (checksums of the files as written),
        verified; ``records`` are the manifest's build records (empty while verifying)."""
        target = self.target
        manifest = Manifest(
            backend="tvm", model_file=MODEL_FILE,
            target=TargetInfo(
                name=target.name, arch=target.arch, description=target.description,
                tvm=jsonable(dict(target.tvm)),
                toolchain=jsonable({**{k: v for k, v in target.toolchain.items()
                                       if k != "compiler"}, **self.compiler.to_dict()}),
                device=jsonable(dict(target.device))),
            input=InputSpec(name="x", shape=(1, 3, 24, 94), layout="NCHW", dtype="float32",
                            color="BGR"),
            preprocess=Preprocess(), charset=charset,
            files={n: FileEntry.of(self.root / n) for n in self.files},
            runtime=self.runtime_entry(num_threads), records=records or {})
        return Artifact(self.root, manifest).verify(check_arch=False)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (arrays as lists, anything else unknown as its str)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))
