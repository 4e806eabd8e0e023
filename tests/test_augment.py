"""Radiograph augmentation and whole-batch feeding: seeded draws, batched tensor ops, and the
batches the training loop sees (the resume test in test_train.py runs them end to end)."""

from __future__ import annotations

import math

import pytest
import torch

from cxr.core.config import AugmentParams, Params
from tasks.training.dataset import PixelDataset, SplitData, TrainBatches
from tasks.images.geometry import augment_batch, augment_draws, to_input
from tasks.training.stages import augments, epoch_loader
from tests.conftest import NIH_SAMPLE, make_params

ON = {"rotation": 8, "scale": 0.1, "brightness": 0.1, "contrast": 0.2}


def with_augment(params: Params, **augment) -> Params:
    return params.model_copy(update={"train": params.train.model_copy(update={"augment": AugmentParams(**augment)})})


def test_draws_are_seeded_and_within_the_ranges():
    a = augment_draws(500, AugmentParams(**ON), torch.Generator().manual_seed(5))
    assert torch.equal(a, augment_draws(500, AugmentParams(**ON), torch.Generator().manual_seed(5)))
    assert not torch.equal(a, augment_draws(500, AugmentParams(**ON), torch.Generator().manual_seed(6)))
    angle, zoom, contrast, brightness = a.unbind(1)
    assert angle.abs().max() <= math.radians(8) and angle.abs().max() > math.radians(7)
    assert ((zoom >= 0.9) & (zoom <= 1.1)).all() and ((contrast >= 0.8) & (contrast <= 1.2)).all()
    assert brightness.abs().max() <= 0.1 and brightness.std() > 0.03
    # Off: every draw is the identity.
    off = augment_draws(4, AugmentParams(), torch.Generator().manual_seed(5))
    assert torch.equal(off, torch.tensor([[0.0, 1.0, 1.0, 0.0]] * 4))


def test_identity_draws_leave_the_batch_and_each_image_gets_its_own():
    torch.manual_seed(0)
    x = torch.rand(3, 32, 32)
    identity = torch.tensor([[0.0, 1.0, 1.0, 0.0]] * 3)
    torch.testing.assert_close(augment_batch(x, identity), x, atol=1e-6, rtol=0)
    # A bright square in the middle: zooming in grows it, zooming out shrinks it, brightness
    # lifts the background; all three in one batched call.
    square = torch.zeros(3, 32, 32)
    square[:, 12:20, 12:20] = 1.0
    out = augment_batch(square, torch.tensor([[0.0, 1.4, 1.0, 0.0], [0.0, 0.7, 1.0, 0.0], [0.0, 1.0, 1.0, 0.2]]))
    area = (out > 0.5).sum((1, 2))
    assert area[0] > 64 * 1.6 and area[1] < 64 * 0.7
    assert out[2, 0, 0] == pytest.approx(0.2) and out[2, 16, 16] == 1.0  # clipped to [0, 1]
    # A rotation moves a dot off-centre along the circle around the centre, never across the
    # vertical axis (no vertical flip): a dot at the top stays in the top half.
    dot = torch.zeros(1, 33, 33)
    dot[0, 4, 16] = 1.0
    turned = augment_batch(dot, torch.tensor([[math.radians(20), 1.0, 1.0, 0.0]]))
    y, x_ = divmod(int(turned[0].argmax()), 33)
    assert y < 8 and x_ != 16


def test_to_input_augments_before_normalising():
    pixels = torch.full((2, 8, 8), 100, dtype=torch.uint8)
    draws = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.1]])
    x = to_input(pixels, "cpu", draws)
    plain = to_input(pixels, "cpu")
    torch.testing.assert_close(x[0], plain[0])
    assert (x[1] > plain[1]).all()
    assert x.shape == (2, 3, 8, 8)


def test_batches_equal_the_per_item_dataset():
    """TrainBatches fetches whole batches by indexing; the pixels are the per-item dataset's."""
    loaded = torch.randint(0, 255, (7, 10, 10), dtype=torch.uint8)
    data = SplitData(list("abcdefg"), loaded, torch.rand(7, 14), 8)
    offsets = torch.randint(0, 3, (7, 2))
    flips = torch.rand(7) < 0.5
    draws = torch.rand(7, 4)
    batches = TrainBatches(data, [[3, 0, 6], [5, 1], [2, 4]], flips, offsets, draws)
    per_item = PixelDataset(data, flips, offsets)
    for batch in batches.batches:
        pixels, d, labels = batches[batches.batches.index(batch)]
        assert torch.equal(pixels, torch.stack([per_item[i][0] for i in batch]))
        assert torch.equal(labels, data.labels[batch]) and torch.equal(d, draws[batch])
    # No offsets: the centre crop, as everywhere else.
    pixels, _ = TrainBatches(data, [[0, 1]])[0]
    assert torch.equal(pixels, data.pixels[:2])


def test_epoch_loader_is_the_same_from_the_seed_alone():
    params = with_augment(make_params(NIH_SAMPLE), **ON)
    loaded = torch.randint(0, 255, (70, 64, 64), dtype=torch.uint8)
    data = SplitData([str(i) for i in range(70)], loaded, torch.rand(70, 14), 64)
    first = [tuple(t.clone() for t in b) for b in epoch_loader(params, "global", 2, data, 16, torch.device("cpu"))]
    again = list(epoch_loader(params, "global", 2, data, 16, torch.device("cpu")))
    assert len(first) == 5 and [len(b[0]) for b in first] == [16, 16, 16, 16, 6]
    assert all(torch.equal(x, y) for a, b in zip(first, again) for x, y in zip(a, b))
    other = list(epoch_loader(params, "global", 3, data, 16, torch.device("cpu")))
    assert not torch.equal(first[0][1], other[0][1])  # new draws each epoch
    # The draws come after the order, flips and crops: switching augmentation on leaves those.
    plain = list(epoch_loader(make_params(NIH_SAMPLE), "global", 2, data, 16, torch.device("cpu")))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, plain)) and len(plain[0]) == 2
    # Stages I and II augment; the fusion head never does; all-zero ranges are off.
    assert augments(params, "global") and augments(params, "local") and not augments(params, "fusion")
    assert not augments(make_params(NIH_SAMPLE), "global")
