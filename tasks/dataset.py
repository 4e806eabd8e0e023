"""Labelled image tensors for training and evaluation, read through the one image loader.

The network input geometry is defined here and nowhere else: every image is resized to
`model.load_size` (= `model.resize`, or `model.image_size` when unset) by the loader or the
image cache, and the network sees an `image_size` crop of it: the centre crop everywhere
(validation, evaluation, thresholds, the crop cache, scoring), a random crop per image and
epoch in stage-I training only (`train.random_crop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import math

import numpy as np
import torch
import torch.nn.functional as F

from cxr.config import AugmentParams, ModelParams
from cxr.errors import DataError
from cxr.labels import LABEL_COLUMNS
from tasks.images import load_image_uint8, to_uint8
from tasks.overlay import scale_box

# Grayscale radiographs are fed as three identical channels, normalised as torchvision's
# ImageNet backbones expect, so `pretrained: imagenet` and `none` share one input pipeline.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- input geometry


def center_offset(side: int, size: int) -> int:
    """Top (= left) of the centre (size, size) crop of a (side, side) image; 0 without a crop.

    An odd margin leaves the extra pixel at the bottom/right.
    """
    return (side - size) // 2


def crop(pixels, top: int, left: int, size: int):
    """The (size, size) window at (top, left) of (..., H, W) pixels: one slice for the whole
    batch, a view, tensor or numpy alike."""
    return pixels[..., top : top + size, left : left + size]


def center_crop(pixels, size: int):
    """The centre (size, size) window of (..., H, W) square pixels (the pixels themselves when H == size)."""
    top = center_offset(pixels.shape[-1], size)
    return crop(pixels, top, top, size)


def random_crop_offsets(n: int, model: ModelParams, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) int64 (top, left) per image, uniform over every crop that fits, drawn from `generator`."""
    return torch.randint(0, model.load_size - model.image_size + 1, (n, 2), generator=generator)


def network_pixels_from_image(image: np.ndarray, model: ModelParams) -> np.ndarray:
    """Float (H, W) in [0, 1] -> (image_size, image_size) uint8: the pixels evaluation sees.

    Resized exactly as the loader and the image cache resize (`to_uint8` at load_size), then
    centre-cropped, so a scored study gets the same input as a test image from the same file.
    """
    return np.ascontiguousarray(center_crop(to_uint8(image, model.load_size), model.image_size))


def input_box_to_image(box: tuple[int, int, int, int], model: ModelParams, image_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Inclusive (y0, x0, y1, x1) in network-input pixels -> the same region in an image of
    `image_shape` (H, W) that was resized to load_size and centre-cropped to make that input."""
    side = model.load_size
    off = center_offset(side, model.image_size)
    y0, x0, y1, x1 = (int(v) for v in box)
    return scale_box((y0 + off, x0 + off, y1 + off, x1 + off), (side, side), tuple(image_shape))


# --------------------------------------------------------------------------- splits


@dataclass
class SplitData:
    ids: list[str]
    loaded: torch.Tensor  # (N, R, R) uint8, resized to model.load_size
    labels: torch.Tensor  # (N, K) float32 0/1
    size: int  # network input side (model.image_size)

    @property
    def pixels(self) -> torch.Tensor:
        """(N, S, S) uint8 network input without augmentation: the centre crop (a view)."""
        return center_crop(self.loaded, self.size)


def load_pixels(ids: list[str], image_dir: Path, size: int) -> torch.Tensor:
    """(N, size, size) uint8; every unreadable image is named in one DataError."""
    out = torch.empty((len(ids), size, size), dtype=torch.uint8)
    problems = []
    for i, image_id in enumerate(ids):
        try:
            out[i] = torch.from_numpy(load_image_uint8(Path(image_dir) / image_id, size))
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"{len(problems)} of {len(ids)} training images cannot be used: {shown}", where=str(image_dir))
    return out


def load_split(meta, splits, split: str, image_dir: Path, model: ModelParams, cache_dir: Path | None = None) -> SplitData:
    """A split's pixels at `model.load_size` and its labels; from the image cache at
    `cache_dir` when it holds `image_dir` at that size (same pixels, no decoding), else
    through the loader."""
    ids = splits.loc[splits["split"] == split, "image_id"].tolist()
    if not ids:
        raise DataError(f"the {split} split is empty", where="splits.parquet")
    rows = meta.set_index("image_id").loc[ids, list(LABEL_COLUMNS)]
    labels = torch.from_numpy(rows.to_numpy(dtype=np.float32, copy=True))
    pixels = None
    if cache_dir is not None:
        from tasks.image_cache import cached_pixels  # the cache builds on this module's loader

        pixels = cached_pixels(Path(cache_dir), ids, image_dir, model.load_size)
    if pixels is None:
        pixels = load_pixels(ids, image_dir, model.load_size)
    return SplitData(ids, pixels, labels, model.image_size)


def augment_draws(n: int, augment: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) float32 per image: rotation (radians), zoom, contrast factor, brightness offset,
    uniform in the ranges `augment` allows, drawn from `generator` in one call."""
    u = torch.rand(n, 4, generator=generator) * 2 - 1  # uniform in [-1, 1)
    half = torch.tensor([math.radians(augment.rotation), augment.scale, augment.contrast, augment.brightness])
    return u * half + torch.tensor([0.0, 1.0, 1.0, 0.0])


def augment_batch(x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Apply `augment_draws` rows to a batch of [0, 1] pixels x (B, H, W) float: one affine
    resampling per image about its centre (rotation, zoom; bilinear, border extended) and the
    intensity change p * c + b clipped to [0, 1]. Batched: one affine_grid + grid_sample."""
    draws = draws.to(x.device, x.dtype)
    angle, zoom, contrast, brightness = draws.unbind(1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # The grid maps output to input coordinates: zooming in (zoom > 1) samples a smaller window.
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1), torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(theta, [x.shape[0], 1, *x.shape[-2:]], align_corners=False)
    x = F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False).squeeze(1)
    return (x * contrast.view(-1, 1, 1) + brightness.view(-1, 1, 1)).clamp_(0.0, 1.0)


def to_input(pixels: torch.Tensor, device: torch.device | str = "cpu", augment: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 3, H, W) float normalised network input on `device`; with
    `augment` ((B, 4) `augment_draws` rows) augmented first. uint8 travels, float is made on
    the device."""
    x = pixels.to(device, non_blocking=True).float().div_(255.0)
    if augment is not None:
        x = augment_batch(x, augment)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    x = (x - IMAGENET_MEAN.to(device)) / IMAGENET_STD.to(device)
    # NHWC on CUDA matches a channels-last model; on the CPU NCHW is what the kernels like.
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" else x


class PixelDataset(torch.utils.data.Dataset):
    """Indexable (pixels, labels) with a per-epoch crop and horizontal flip decided up front.

    The flips and crop offsets (N, 2) are drawn from the epoch's seeded generator before
    loading starts, so the result does not depend on the number of DataLoader workers; without
    offsets every item is the centre crop.
    """

    def __init__(self, data: SplitData, flips: torch.Tensor | None = None, offsets: torch.Tensor | None = None):
        self.data = data
        self.flips = flips
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.data.ids)

    def __getitem__(self, i: int):
        if self.offsets is None:
            pixels = self.data.pixels[i]
        else:
            top, left = self.offsets[i].tolist()
            pixels = crop(self.data.loaded[i], top, left, self.data.size)
        if self.flips is not None and bool(self.flips[i]):
            pixels = pixels.flip(-1)
        return pixels, self.data.labels[i]


class TrainBatches(torch.utils.data.Dataset):
    """One epoch's training batches, fetched whole: `batches[i]` is the list of split positions
    of batch i, and item i is (*inputs, labels) for all of them at once, by tensor indexing
    (no per-image __getitem__ + collate).

    inputs: (pixels (B, S, S) uint8,) from a `SplitData` (per-image crop offsets and flips
    applied), or (crops (B, L, L) uint8, pooled (B, C) float32) from the crop cache (a
    `tasks.crop_cache.CropSplit`, the flipped view where flipped); plus the (B, 4) augmentation
    draws when given. Used with DataLoader(batch_size=None) so workers prefetch whole batches.
    """

    def __init__(self, data, batches: list[list[int]], flips: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None, augment: torch.Tensor | None = None):
        self.data, self.batches, self.flips, self.offsets, self.augment = data, batches, flips, offsets, augment

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        idx = torch.as_tensor(self.batches[i], dtype=torch.int64)
        flips = self.flips[idx] if self.flips is not None else None
        if hasattr(self.data, "pixels"):
            inputs = (self._pixels(idx, flips),)
        else:
            inputs = self._cached(idx, flips)
        extra = (self.augment[idx],) if self.augment is not None else ()
        return (*inputs, *extra, self.data.labels[idx])

    def _pixels(self, idx: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        size = self.data.size
        if self.offsets is None:
            pixels = self.data.pixels[idx]
        else:  # each image's own window: gather rows, then columns
            span = torch.arange(size)
            rows = (self.offsets[idx, 0, None] + span)[:, :, None]
            cols = (self.offsets[idx, 1, None] + span)[:, None, :]
            pixels = self.data.loaded[idx[:, None, None], rows, cols]
        if flips is not None:
            pixels = torch.where(flips.view(-1, 1, 1), pixels.flip(-1), pixels)
        return pixels

    def _cached(self, idx: torch.Tensor, flips: torch.Tensor | None):
        rows = self.data.rows[idx.numpy()]
        view = flips.long() if flips is not None else torch.zeros(len(idx), dtype=torch.long)
        pick = torch.arange(len(idx))
        crops = torch.from_numpy(self.data.cache.get("crops", rows))[pick, view]
        pooled = torch.from_numpy(self.data.cache.get("pooled", rows))[pick, view]
        return crops, pooled
