"""Calibration / fine-tuning data: ``calib/`` only, never the test split (host side, torch).

Every compression step that looks at images (quantization calibration, sensitivity scans,
distillation, accuracy-guarded selection) gets them through :class:`CalibrationSet`, which
*refuses* a folder that is, or looks like, the evaluation split:

- its name is ``test`` (or it resolves to ``$LPRNET_EDGE_DATA/test``, symlinks included);
- it contains a marker file (``.lprnet-test-split`` / ``TEST_SPLIT``);
- it shares an image (same bytes) with the test split (``test_dir`` or
  ``$LPRNET_EDGE_DATA/test``), so a copy or a mixed folder is caught too.

Evaluation on ``test/`` goes through :func:`load_eval_set`, which is a different function on
purpose: nothing that trains or calibrates takes its output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lprnet_edge.paths import data_root
from lprnet_edge.runtime.charset import Charset, load_charset
from lprnet_edge.runtime.dataset import PlateFolder
from lprnet_edge.runtime.errors import DataError
from lprnet_edge.runtime.preprocess import Preprocess

TEST_MARKERS = (".lprnet-test-split", "TEST_SPLIT")


class TestSplitError(DataError):
    """Raised when calibration / training data would come from the evaluation split."""

    __test__ = False  # a "Test*" name, not a test class (pytest would try to collect it)


def default_calib_dir() -> Path:
    root = data_root()
    if root is None or not (root / "calib").is_dir():
        raise DataError("no calib/ folder: set LPRNET_EDGE_DATA or pass the folder explicitly")
    return root / "calib"


def default_test_dir() -> Path | None:
    root = data_root()
    return root / "test" if root is not None and (root / "test").is_dir() else None


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def check_not_test(folder: str | Path, test_dir: str | Path | None = None) -> Path:
    """``folder`` resolved, or :class:`TestSplitError` if it is (or overlaps) the test split."""
    p = Path(folder).resolve()
    tdir = Path(test_dir) if test_dir is not None else default_test_dir()
    why = None
    if tdir is not None and tdir.exists() and p == tdir.resolve():
        why = f"it resolves to the test split {tdir}"
    elif p.name.lower() == "test":
        why = "it is named 'test'"
    elif any((p / m).exists() for m in TEST_MARKERS):
        why = "it carries a test-split marker file"
    elif tdir is not None and tdir.is_dir() and p.is_dir():
        test_hashes = {_digest(f) for f in _image_files(tdir.resolve())}
        same = [f.name for f in _image_files(p) if _digest(f) in test_hashes]
        if same:
            why = f"{len(same)} of its images are test images (e.g. {same[0]})"
    if why:
        raise TestSplitError(
            f"{folder}: refusing to calibrate / fine-tune / distill on the test split ({why}); "
            "use calib/ (the test split is for evaluation only)")
    return p


def _load_arrays(folder: Path, charset: Charset, limit: int | None = None
                 ) -> tuple[np.ndarray, list[str], list[str]]:
    pre = Preprocess()
    pf = PlateFolder(folder, charset, skip_bad=True, limit=limit)
    xs, labels, names = [], [], []
    for s in pf:
        xs.append(pre(s.image)[0])
        labels.append(s.label)
        names.append(s.path.name)
    if not xs:
        raise DataError(f"{folder}: no usable plate images")
    return np.stack(xs).astype(np.float32), labels, names


@dataclass
class CalibrationSet:
    """Preprocessed ``calib/`` images (N x 3 x 24 x 94 float32) and their plate labels.

    ``split(val_fraction, seed)`` gives a fixed (train, val) partition: hyper-parameters and
    accuracy guards are decided on ``val``, distillation uses ``train``. A set that carries its
    own partition (``val_index``: a fine-tuning's validation split) returns that one whatever
    the arguments: a model trained on some of these images must never be measured on them, so
    every later step (quantization, the accuracy guard, distillation, selection) sees the same
    held-out plates.
    """

    x: np.ndarray
    labels: list[str]
    names: list[str]
    root: Path | None = None
    raw: list[np.ndarray] | None = None  # original-resolution BGR images (for augmentation)
    val_index: tuple[int, ...] | None = None  # a partition fixed by whoever trained on it
    skipped: tuple[tuple[str, str], ...] = ()  # (file, why) left out while loading

    @classmethod
    def load(cls, folder: str | Path | None = None, charset: Charset | None = None,
             limit: int | None = None, test_dir: str | Path | None = None,
             keep_raw: bool = False) -> CalibrationSet:
        folder = Path(folder) if folder is not None else default_calib_dir()
        root = check_not_test(folder, test_dir)
        cs = charset or load_charset()
        x, labels, names = _load_arrays(root, cs, limit)
        raw = None
        if keep_raw:
            from lprnet_edge.runtime.preprocess import read_image

            raw = [read_image(root / n) for n in names]
        return cls(x, labels, names, root, raw)

    def __len__(self) -> int:
        return len(self.labels)

    def ensure_raw(self) -> CalibrationSet:
        """Load the original-resolution crops (for augmentation) if they are not loaded."""
        if self.raw is None and self.root is not None:
            from lprnet_edge.runtime.preprocess import read_image

            self.raw = [read_image(self.root / n) for n in self.names]
        return self

    def subset(self, idx: np.ndarray | list[int]) -> CalibrationSet:
        idx = list(map(int, idx))
        return CalibrationSet(self.x[idx], [self.labels[i] for i in idx],
                              [self.names[i] for i in idx], self.root,
                              [self.raw[i] for i in idx] if self.raw is not None else None)

    def split(self, val_fraction: float = 0.3, seed: int = 0
              ) -> tuple[CalibrationSet, CalibrationSet]:
        if self.val_index is not None:
            val = set(self.val_index)
            return (self.subset([i for i in range(len(self)) if i not in val]),
                    self.subset(sorted(val)))
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(self))
        n_val = max(1, int(round(len(self) * val_fraction)))
        return self.subset(np.sort(perm[n_val:])), self.subset(np.sort(perm[:n_val]))

    def take(self, n: int, seed: int = 0) -> CalibrationSet:
        if n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        return self.subset(np.sort(rng.permutation(len(self))[:n]))


@dataclass
class EvalSet:
    """Preprocessed evaluation images (e.g. ``test/``): for measuring only."""

    x: np.ndarray
    labels: list[str]
    root: Path


def load_eval_set(folder: str | Path | None = None, charset: Charset | None = None,
                  limit: int | None = None) -> EvalSet:
    folder = Path(folder) if folder is not None else default_test_dir()
    if folder is None:
        raise DataError("no test/ folder: set LPRNET_EDGE_DATA or pass the folder explicitly")
    x, labels, _ = _load_arrays(Path(folder), charset or load_charset(), limit)
    return EvalSet(x, labels, Path(folder))


# ---------------------------------------------------------------- batch-1 evaluation (torch)


def forward_per_sample(model, x):  # noqa: ANN001, ANN201
    """LPRNet logits with batch-1 semantics for every row of a batch.

    The original head divides each context map by its mean square over the *whole batch*;
    here the mean is taken per sample, which is exactly what running the images one at a
    time computes, but in one batched call (fast evaluation, and per-sample distillation).
    """
    import torch

    if hasattr(model, "forward_per_sample"):  # a folded model (model.channel_fold)
        return model.forward_per_sample(x)
    f0, f1, f2, f3 = model.features(x)
    ctx = []
    for f in (model.pool0(f0), model.pool1(f1), model.pool2(f2), f3):
        ctx.append(f / torch.mean(f * f, dim=(1, 2, 3), keepdim=True))
    return torch.mean(model.container(torch.cat(ctx, 1)), dim=2)


def predict_logits(model, x: np.ndarray, batch: int = 100) -> np.ndarray:  # noqa: ANN001
    """``(N, classes, 18)`` logits at batch-1 semantics, computed in chunks."""
    import torch

    was = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(forward_per_sample(model, torch.from_numpy(x[i:i + batch])).numpy())
    model.train(was)
    return np.concatenate(out)


def decode_batch(logits: np.ndarray, charset: Charset | None = None) -> list[str]:
    cs = charset or load_charset()
    best = logits.argmax(axis=1)
    texts = []
    for row in best:
        prev, out = -1, []
        for c in row.tolist():
            if c != prev and c != cs.blank:
                out.append(cs.chars[c])
            prev = c
        texts.append("".join(out))
    return texts


def accuracy(model, data: CalibrationSet | EvalSet, charset: Charset | None = None  # noqa: ANN001
             ) -> float:
    """Exact-plate accuracy at batch-1 semantics."""
    preds = decode_batch(predict_logits(model, data.x), charset)
    return float(np.mean([p == t for p, t in zip(preds, data.labels, strict=True)]))


def agreement(model, reference, data: CalibrationSet) -> float:  # noqa: ANN001
    """Fraction of plates on which ``model`` reads the same text as ``reference``."""
    a = decode_batch(predict_logits(model, data.x))
    b = decode_batch(predict_logits(reference, data.x))
    return float(np.mean([p == q for p, q in zip(a, b, strict=True)]))
