"""Fine-tuning the pretrained LPRNet on a user's labelled plates (host side, torch).

Made for a few hundred crops:

- CTC on the plate labels, SGD (Nesterov) with a cosine schedule, augmentation of the raw crops
  (:data:`lprnet_edge.model.augment.PLATES`: small affine and perspective, blur, noise,
  brightness, colour) before the runtime's own 94x24 resize;
- BatchNorm frozen (:func:`lprnet_edge.model.training.freeze_bn`): its running statistics
  are never re-estimated from so few images;
- batch-1 semantics (:func:`lprnet_edge.model.calib.forward_per_sample`): a batch trains
  exactly the function that is evaluated one image at a time;
- learning without forgetting (``distill``): a frame KL from the pretrained model's outputs
  on the same augmented images, optionally only on the images it reads right
  (``distill_read_only``), so that the function stays where the new labels do not ask for
  another; also a pull towards the pretrained weights (``anchor``, L2-SP) and the first
  backbone layers frozen (``freeze_below``);
- how far the model moved is measured on the validation split alone (``val_kept``,
  ``val_drift`` in the history), the only forgetting signal that needs no other data;
- the epoch kept is the best by exact-plate accuracy on the validation split, with early
  stopping; ``on_best`` is called at each new best (the CLI writes the checkpoint there, so
  Ctrl-C leaves the best weights so far on disk);
- the best epoch's weights are then mixed with the pretrained ones (WiSE-FT,
  :mod:`lprnet_edge.model.interpolate`), the mixing weight chosen on the validation split;
- the test split is only *evaluated* (before and after, what was forgotten), never trained or
  selected on.
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lprnet_edge.model.augment import PLATES, AugmentConfig, augment_image
from lprnet_edge.model.calib import (
    CalibrationSet,
    EvalSet,
    accuracy,
    decode_batch,
    default_test_dir,
    forward_per_sample,
    load_eval_set,
)
from lprnet_edge.model.checkpoint import save_checkpoint
from lprnet_edge.model.interpolate import Drift, Interpolation, blend
from lprnet_edge.model.plates import describe_skipped, files_sha256, load_plates
from lprnet_edge.model.training import (
    EpochRecord,
    Progress,
    ProgressBar,
    ctc_loss,
    ctc_targets,
    frame_kl,
    freeze_bn,
)
from lprnet_edge.runtime.charset import Charset, load_charset
from lprnet_edge.runtime.errors import LprnetEdgeError
from lprnet_edge.runtime.files import atomic_file, sha256_file, write_json_atomic
from lprnet_edge.runtime.preprocess import Preprocess


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train on and how; ``val`` (a folder or CSV) overrides ``val_split``.

    The defaults are the setting chosen among those compared on calib/'s held-out split
    (docs/finetuning.md, chosen there without looking at test/). One thread: the weights a
    seed gives do not depend on the machine's core count (torch orders its reductions by
    thread).
    """

    data: Path
    val: Path | None = None
    val_split: float = 0.2
    epochs: int = 30
    patience: int = 10  # early stopping: epochs without a better validation accuracy
    batch_size: int = 32
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam"
    lr: float = 0.02
    anchor: float = 0.0  # L2-SP weight: pull towards the pretrained weights
    distill: float = 2.0  # learning without forgetting: weight of the KL to the pretrained
    temperature: float = 2.0  # of that KL
    distill_read_only: bool = True  # only on the images the pretrained model reads right
    freeze_below: int = 0  # backbone layers [0, freeze_below) are not trained
    # a plate is drawn with weight (plates sharing its first character) ** -balance:
    # 0 each plate once an epoch, 1 each province equally often
    balance: float = 0.0
    keep_dead: bool = True  # filters whose weights are all zero stay zero
    bn_affine: bool = False  # train BatchNorm's scale and shift (statistics stay frozen)
    augment: AugmentConfig = PLATES
    seed: int = 0
    threads: int = 1
    test_dir: Path | None = None  # forgetting, evaluated only (default: $LPRNET_EDGE_DATA/test)
    time_budget_s: float | None = None
    evaluate_test: bool = True  # False: test/ is not even evaluated (exploratory runs)
    # WiSE-FT mixing weight towards the fine-tuned weights (1: the fine-tuned model as is);
    # None: chosen on the validation split (lprnet_edge.model.interpolate.RULE)
    interpolate: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.val_split < 1:
            raise LprnetEdgeError(f"--val-split must be between 0 and 1, got {self.val_split}")
        if self.optimizer not in ("sgd", "adam"):
            raise LprnetEdgeError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.threads < 1:
            raise LprnetEdgeError("epochs, patience, batch size and threads must be >= 1")
        if self.distill < 0 or self.anchor < 0 or self.temperature <= 0:
            raise LprnetEdgeError("--distill and the anchor must be >= 0, the temperature > 0")
        if not 0 <= self.balance <= 1:
            raise LprnetEdgeError(f"--balance must be between 0 and 1, got {self.balance}")
        if self.interpolate is not None and not 0 <= self.interpolate <= 1:
            raise LprnetEdgeError(f"--interpolate must be auto or between 0 and 1, got "
                                  f"{self.interpolate}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("data", "val", "test_dir"):
            d[k] = str(d[k]) if d[k] is not None else None
        d["interpolate"] = "auto" if self.interpolate is None else self.interpolate
        return d


@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned model, the data it was trained and selected on, and the record."""

    model: nn.Module = field(repr=False)
    data: CalibrationSet = field(repr=False)  # carries the split (``val_index``)
    config: FinetuneConfig
    files_sha256: str
    best_epoch: int  # 0: no epoch beat the pretrained model, which is kept
    stopped: str  # "epochs", "early stopping", "time budget" or "interrupted"
    val_before: float
    val_after: float
    test_before: float | None
    test_after: float | None
    history: tuple[EpochRecord, ...]
    seconds: float
    interpolation: Interpolation | None = None  # None: the best epoch's weights as they are

    def to_dict(self) -> dict[str, Any]:
        train, val = self.data.split()
        return {
            "data": {"source": str(self.config.data), "files_sha256": self.files_sha256,
                     "plates": len(self.data),
                     "skipped": describe_skipped(self.data.skipped)},
            "split": {"train": len(train), "val": len(val),
                      "val_source": str(self.config.val) if self.config.val else
                      f"{self.config.val_split:g} of the data, by file, seed "
                      f"{self.config.seed}", "val_files": list(val.names)},
            "config": self.config.to_dict(),
            "best_epoch": self.best_epoch, "stopped": self.stopped,
            "interpolation": self.interpolation.to_dict() if self.interpolation else None,
            "accuracy": {"val": {"before": self.val_before, "after": self.val_after},
                         "test": {"before": self.test_before, "after": self.test_after}},
            "history": [r.to_dict() for r in self.history],
            "seconds": round(self.seconds, 1), "threads": self.config.threads,
        }


def load_split(cfg: FinetuneConfig, charset: Charset | None = None) -> CalibrationSet:
    """The training data with its validation split fixed in it (``val_index``)."""
    data = load_plates(cfg.data, charset, cfg.test_dir)
    if cfg.val is None:
        if len(data) < 2:
            raise LprnetEdgeError(f"{cfg.data}: {len(data)} usable plate; a validation split "
                                  "needs at least 2 (or give --val DIR)")
        rng = np.random.default_rng(cfg.seed)
        n_val = max(1, int(round(len(data) * cfg.val_split)))
        data.val_index = tuple(sorted(int(i) for i in rng.permutation(len(data))[:n_val]))
        return data
    val = load_plates(cfg.val, charset, cfg.test_dir)
    both = CalibrationSet(np.concatenate([data.x, val.x]), data.labels + val.labels,
                          data.names + [str(val.root / n) for n in val.names], data.root,
                          (data.raw or []) + (val.raw or []),
                          skipped=data.skipped + val.skipped)
    both.val_index = tuple(range(len(data), len(both)))
    return both


OnBest = Callable[[nn.Module, int], None]


def record_path(weights: str | Path) -> Path:
    """Where the JSON record of a fine-tuned checkpoint goes: beside it, ``.json``."""
    return Path(weights).with_suffix(".json")


def checkpoint_writer(path: str | Path, base_sha256: str) -> OnBest:
    """An ``on_best`` that (re)writes the checkpoint atomically at each new best epoch, in
    the toolchain's checkpoint format (``--weights`` everywhere)."""
    def write(model: nn.Module, epoch: int) -> None:
        with atomic_file(Path(path)) as tmp:
            save_checkpoint(model, tmp, finetuned_from=base_sha256, epoch=epoch)
    return write


def write_record(result: FinetuneResult, weights: str | Path, base: str | Path,
                 machine: dict[str, Any] | None = None) -> Path:
    """The JSON record beside ``weights``: data hash, split, settings, accuracy before and
    after (validation split and test/), and the pretrained weights it started from."""
    path = record_path(weights)
    write_json_atomic(path, {"weights": Path(weights).name,
                             "weights_sha256": sha256_file(weights),
                             "base_weights": {"file": Path(base).name,
                                              "sha256": sha256_file(base)},
                             **result.to_dict(), "machine": machine})
    return path


def finetune(model: nn.Module, cfg: FinetuneConfig, data: CalibrationSet | None = None,
             progress: Progress | str = "bar", on_best: OnBest | None = None,
             charset: Charset | None = None) -> FinetuneResult:
    """A fine-tuned copy of ``model`` (left unchanged) and its record. ``data``: the output
    of :func:`load_split` (loaded from ``cfg`` if None). ``on_best(model, epoch)`` is called
    with the pretrained model (epoch 0) and then at each better epoch; the model returned is
    the best epoch's mixed with the pretrained one (``cfg.interpolate``)."""
    cs = charset or load_charset()
    data = data if data is not None else load_split(cfg, cs)
    test = _test_set(cfg, cs)
    bar = ProgressBar(label="finetune") if progress == "bar" else progress
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        t0 = time.time()
        before_test = accuracy(model, test, cs) if test is not None else None
        run = _Run(model, cfg, data, cs, bar, on_best)
        run.train()
        best, val_after, interp = _interpolated(model, run, cfg, cs)
        after_test = accuracy(best, test, cs) if test is not None else None
    finally:
        torch.set_num_threads(threads)
        if isinstance(bar, ProgressBar):
            bar.close()
    return FinetuneResult(best, data, cfg, files_sha256(data), run.best_epoch,
                          run.stopped, run.val_before, val_after, before_test, after_test,
                          tuple(run.history), time.time() - t0, interp)


def _interpolated(start: nn.Module, run: _Run, cfg: FinetuneConfig, cs: Charset
                  ) -> tuple[nn.Module, float, Interpolation | None]:
    """The kept model (the best epoch's weights mixed with the pretrained ones, unless
    ``interpolate`` is 1 or no epoch beat the pretrained model), its validation accuracy, and
    the sweep that chose the mixing weight."""
    if run.best_epoch == 0 or cfg.interpolate == 1.0:
        return run.best_model, run.best_acc, None
    model, interp = blend(start, run.best_model, run.val_set, cs, cfg.interpolate)
    for p in model.parameters():
        p.requires_grad_(True)
    val = next(p.val_accuracy for p in interp.sweep if p.a == interp.a)
    return model, val, interp


def _test_set(cfg: FinetuneConfig, cs: Charset) -> EvalSet | None:
    if not cfg.evaluate_test:
        return None
    folder = cfg.test_dir or default_test_dir()
    return load_eval_set(folder, cs) if folder is not None and Path(folder).is_dir() else None


def keep_dead_filters(model: nn.Module) -> int:
    """Convolution filters whose weights are all zero get no gradient, so they stay dead.

    The pretrained model has hundreds of such filters; the compiler folds their constant
    output away (:mod:`lprnet_edge.model.channel_fold`), which is half of its work. Training
    them back to life would give a slower artifact for a few hundred plates' worth of
    capacity. Returns how many filters are held.
    """
    held = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
            dead = m.weight.detach().flatten(1).abs().amax(1) == 0
            if dead.any():
                mask = (~dead).to(m.weight.dtype).view(-1, 1, 1, 1)
                m.weight.register_hook(lambda g, mask=mask: g * mask)
                held += int(dead.sum())
    return held


def province_draw(labels: list[str], balance: float) -> np.ndarray | None:
    """How often each plate is drawn: ``(plates of its province) ** -balance``, normalised.

    A user's plates come from where their cameras are, so one province can make most of
    them: trained on as they come, the model learns that province's prior along with the
    characters, and reads the others' plates worse. None: each plate once an epoch.
    """
    if balance == 0:
        return None
    count = Counter(label[:1] for label in labels)
    w = np.array([count[label[:1]] ** -balance for label in labels], dtype=np.float64)
    return w / w.sum()


def freeze_layers(model: nn.Module, below: int) -> None:
    """The first ``below`` backbone layers keep their pretrained weights: the early filters
    (edges, strokes) serve every plate, and a few hundred crops are better spent on the
    layers that read the characters."""
    for layer in list(model.backbone)[:below]:
        for p in layer.parameters():
            p.requires_grad_(False)


class _Run:
    """One training run: the loop's state, so that each part stays small."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, data: CalibrationSet,
                 cs: Charset, progress: Progress, on_best: OnBest | None) -> None:
        self.cfg, self.cs, self.progress, self.on_best = cfg, cs, progress, on_best
        self.train_set, self.val_set = data.split()
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.model = copy.deepcopy(model).eval()  # BN frozen, dropout off
        freeze_bn(self.model, affine=cfg.bn_affine)
        freeze_layers(self.model, cfg.freeze_below)
        self.anchor = {n: p.detach().clone() for n, p in self.model.named_parameters()
                       if p.requires_grad}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.keep_dead:
            keep_dead_filters(self.model)
        self.opt = (torch.optim.SGD(self.params, lr=cfg.lr, momentum=0.9, nesterov=True)
                    if cfg.optimizer == "sgd" else torch.optim.Adam(self.params, lr=cfg.lr))
        self.steps_per_epoch = -(-len(self.train_set) // cfg.batch_size)
        self.total = cfg.epochs * self.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=self.total)
        self.pre = Preprocess()
        self.draw = province_draw(self.train_set.labels, cfg.balance)
        self.history: list[EpochRecord] = []
        self.step_count, self.best_epoch, self.stopped = 0, 0, "epochs"
        self.teacher = copy.deepcopy(model).eval() if cfg.distill else None
        # The pretrained model's outputs for a batch are computed in a second thread while
        # the model trains on it: on two cores the pull costs no time, and each pass is
        # still the single computation it would be in one thread (the same weights).
        self.beside = ThreadPoolExecutor(1, thread_name_prefix="pretrained",
                                         initializer=torch.set_num_threads,
                                         initargs=(cfg.threads,))
        self.val_before = self.best_acc = accuracy(self.model, self.val_set, cs)
        self.watch = Drift(model, self.val_set, cs)
        self.best_model = copy.deepcopy(model).eval()
        self.t0 = time.time()
        if on_best is not None:
            on_best(self.best_model, 0)

    def train(self) -> None:
        try:
            for epoch in range(1, self.cfg.epochs + 1):
                losses = self._epoch()
                self._evaluate(epoch, losses)
                if self.stopped != "epochs":
                    break
                if epoch - self.best_epoch >= self.cfg.patience:
                    self.stopped = "early stopping"
                    break
        except KeyboardInterrupt:
            self.stopped = "interrupted"
        finally:
            self.beside.shutdown(cancel_futures=True)
        for p in self.best_model.parameters():
            p.requires_grad_(True)

    def _epoch(self) -> list[float]:
        cfg, n = self.cfg, len(self.train_set)
        perm = (self.rng.choice(n, size=n, p=self.draw) if self.draw is not None
                else self.rng.permutation(n))
        losses = []
        for b in range(self.steps_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            losses.append(self._step(idx))
            if isinstance(self.progress, ProgressBar):
                self.progress.step(self.step_count, self.total, float(np.mean(losses)))
            if cfg.time_budget_s and time.time() - self.t0 > cfg.time_budget_s:
                self.stopped = "time budget"
                break
        return losses

    def _step(self, idx: np.ndarray) -> float:
        data = self.train_set
        images = [augment_image(data.raw[i], self.rng, self.cfg.augment) for i in idx]
        x = torch.from_numpy(self.pre.batch(images))
        labels = [data.labels[i] for i in idx]
        ref = self.beside.submit(self._reference, x) if self.teacher is not None else None
        logits = forward_per_sample(self.model, x)
        loss = ctc_loss(logits, ctc_targets(labels, self.cs), self.cs.blank)
        if ref is not None:
            loss = loss + self.cfg.distill * self._keep(logits, ref, labels)
        if self.cfg.anchor:
            drift = sum(((p - self.anchor[n]) ** 2).sum()
                        for n, p in self.model.named_parameters() if n in self.anchor)
            loss = loss + self.cfg.anchor * drift
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step_count += 1
        return float(loss.detach())

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return forward_per_sample(self.teacher, x)

    def _keep(self, logits: torch.Tensor, pending: Future, labels: list[str]) -> torch.Tensor:
        """Learning without forgetting: the frame KL to the pretrained model on the same
        (augmented) images (``pending``: its outputs, being computed); with
        ``distill_read_only``, only where that model reads the label, so the pull never
        argues with a correction the labels demand."""
        ref = pending.result()
        if not self.cfg.distill_read_only:
            return frame_kl(logits, ref, self.cfg.temperature)
        read = [i for i, t in enumerate(decode_batch(ref.numpy(), self.cs)) if t == labels[i]]
        if not read:
            return logits.sum() * 0
        return frame_kl(logits[read], ref[read], self.cfg.temperature) * len(read) / len(labels)

    def _evaluate(self, epoch: int, losses: list[float]) -> None:
        acc, kept, drift = self.watch.measure_all(self.model)
        if acc > self.best_acc:
            self.best_acc, self.best_epoch = acc, epoch
            self.best_model = copy.deepcopy(self.model).eval()
            if self.on_best is not None:
                self.on_best(self.best_model, epoch)
        rec = EpochRecord(epoch, self.cfg.epochs, self.step_count,
                          float(np.mean(losses)) if losses else None,
                          round(time.time() - self.t0, 1), acc, self.best_acc,
                          kept, drift)
        self.history.append(rec)
        if isinstance(self.progress, ProgressBar):
            self.progress.epoch(rec, self.total)
        elif self.progress is not None:
            self.progress(rec)


def run_finetune(model: nn.Module, cfg: FinetuneConfig, base: str | Path, out: str | Path,
                 log: Callable[[str], None] | None = None, progress: Progress | str = "bar"
                 ) -> tuple[FinetuneResult, Path]:
    """Load the data (listing what is skipped, and why, on ``log``), fine-tune with the
    checkpoint written to ``out`` at each best epoch, then the record beside it."""
    data = load_split(cfg)
    say = log or (lambda _m: None)
    for line in describe_skipped(data.skipped):
        say(f"skipped {line}")
    train, val = data.split()
    say(f"{len(data)} plates from {cfg.data}" + (f" ({len(data.skipped)} skipped)"
                                                 if data.skipped else "")
        + f": {len(train)} to train, {len(val)} to validate")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_start, cpu_start = _load_average(), time.process_time()
    write = checkpoint_writer(out, sha256_file(base))
    result = finetune(model, cfg, data, progress, on_best=write)
    if result.interpolation is not None:
        say(f"interpolated: a = {result.interpolation.a:g} of the way from the pretrained "
            f"weights to the best epoch's (validation {result.val_after:.3f}; the best "
            f"epoch alone {result.interpolation.finetuned_val_accuracy:.3f})")
        write(result.model, result.best_epoch)
    if result.stopped == "interrupted":
        say(f"interrupted: {out} holds the best epoch so far ({result.best_epoch})")
    # CPU seconds of this process: on a shared machine, the figure the load does not inflate.
    machine = {"cpus": os.cpu_count(), "load_average_start": load_start,
               "load_average_end": _load_average(),
               "cpu_seconds": round(time.process_time() - cpu_start, 1)}
    return result, write_record(result, out, base, machine)


def _load_average() -> list[float] | None:
    """The 1/5/15-minute load: training time on a shared machine means little without it."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
