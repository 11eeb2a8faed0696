"""Distillation: a few steps lower the loss; augmentation and runs are deterministic."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lprnet_edge.compress.distill import (  # noqa: E402
    DistillConfig,
    EpochRecord,
    ProgressBar,
    augment_image,
    distill,
    distill_loss,
)
from lprnet_edge.compress.prune import channel_widths, prune_channels  # noqa: E402
from lprnet_edge.model.calib import CalibrationSet, forward_per_sample  # noqa: E402

PLATES = ["京A12345", "沪B6789C", "粤C1D234", "川A0K123", "苏E88888", "浙F1234G"]


def _calib(n: int = 12) -> CalibrationSet:
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 255, (36, 136, 3), dtype=np.uint8) for _ in range(n)]
    from lprnet_edge.runtime.preprocess import Preprocess

    pre = Preprocess()
    x = np.concatenate([pre(r) for r in raw])
    labels = [PLATES[i % len(PLATES)] for i in range(n)]
    return CalibrationSet(x, labels, [f"{i}.jpg" for i in range(n)], raw=raw)


def test_augment_is_small_and_deterministic():
    img = np.random.default_rng(0).integers(0, 255, (36, 136, 3), dtype=np.uint8)
    a = augment_image(img, np.random.default_rng(1))
    b = augment_image(img, np.random.default_rng(1))
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_per_sample_forward_is_batch_one_semantics(tiny_model):
    x = torch.from_numpy(_calib(4).x)
    with torch.no_grad():
        one = torch.cat([tiny_model(x[i:i + 1]) for i in range(4)])
        batched = forward_per_sample(tiny_model, x)
    assert torch.allclose(one, batched, atol=1e-4 * float(one.abs().max()))


def test_short_distillation_lowers_loss(tiny_model):
    cal = _calib()
    widths = channel_widths(tiny_model, 0.5, drop_dead=False)
    student, _ = prune_channels(tiny_model, widths, cal.x)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a student clearly off the teacher
        for m in student.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * m.weight.std() * 0.5)
    cfg = DistillConfig(epochs=3, batch_size=6, lr=1e-3, augment=False, seed=0, ctc_weight=0.0)
    x = torch.from_numpy(cal.x)

    def loss_of(m) -> float:
        with torch.no_grad():
            return float(distill_loss(forward_per_sample(m, x), forward_per_sample(tiny_model, x),
                                      cfg)[0])

    before = loss_of(student)
    bn_before = student.backbone[1].weight.detach().clone()
    out, hist = distill(tiny_model, student, cal, cfg, progress=None)
    after = loss_of(out)
    assert after < before
    assert len(hist["epochs"]) == 3 and hist["epochs"][-1]["steps"] == 6
    # BatchNorm frozen: affine and running statistics unchanged
    assert torch.equal(out.backbone[1].weight, bn_before)
    assert torch.equal(out.backbone[1].running_var, student.backbone[1].running_var)
    # the input student is untouched, and the run is reproducible
    assert loss_of(student) == pytest.approx(before)
    out2, _ = distill(tiny_model, student, cal, cfg, progress=None)
    for a, b in zip(out.state_dict().values(), out2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_distill_with_augmentation_ctc_and_val(tiny_model):
    cal = _calib()
    train, val = cal.split(0.25, 0)
    student, _ = prune_channels(tiny_model, channel_widths(tiny_model, 0.5, drop_dead=False))
    seen: list[EpochRecord] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, hist = distill(tiny_model, student, train,
                            DistillConfig(epochs=1, batch_size=4, max_steps=2, ctc_weight=0.1),
                            val=val, progress=seen.append)
    # No PyTorch warning from the training loop (e.g. a scalar taken from a grad tensor).
    assert not [w for w in caught if issubclass(w.category, UserWarning)], \
        [str(w.message) for w in caught]
    assert seen and seen[0].val_accuracy is not None and "val_accuracy_best" in hist
    assert hist["epochs"][0] == seen[0].to_dict()
    assert out(torch.zeros(1, 3, 24, 94)).shape == (1, 68, 18)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_steps_loss_and_val_accuracy(tiny_model):
    cal = _calib()
    train, val = cal.split(0.25, 0)
    student, _ = prune_channels(tiny_model, channel_widths(tiny_model, 0.5, drop_dead=False))
    cfg = DistillConfig(epochs=2, batch_size=6, augment=False, ctc_weight=0.0)
    log = io.StringIO()  # not a terminal: one line per epoch
    distill(tiny_model, student, train, cfg, val=val, progress=ProgressBar(log))
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert lines[0].startswith("distill [") and "2/4 steps" in lines[0]
    assert "epoch 1/2" in lines[0] and "loss " in lines[0] and "val acc " in lines[0]
    assert "100% 4/4 steps" in lines[1] and "epoch 2/2" in lines[1]
    assert "{" not in log.getvalue()  # no dict dumps
    tty = _Tty()  # a terminal: redrawn in place after every step, one final newline
    distill(tiny_model, student, train, cfg, val=val, progress=ProgressBar(tty))
    out = tty.getvalue()
    assert out.count("\r") >= 4 and out.endswith("\n") and out.count("\n") == 1
    rec = EpochRecord(3, 8, 30, 0.41234, 12.0, 0.5, 0.52)
    assert str(rec) == "epoch 3/8, loss 0.4123, val acc 0.500 (best 0.520), 12s"
