"""Labelled image tensors for training and evaluation, read through the one image loader
(or the image cache) at the input geometry of `tasks.images.geometry`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


import numpy as np
import torch

from cxr.core.config import ModelParams
from cxr.core.errors import DataError
from cxr.core.labels import LABEL_COLUMNS
from tasks.images.geometry import center_crop, crop
from tasks.images.image_cache import cached_pixels
from tasks.images.loader import load_image_uint8

















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
        pixels = cached_pixels(Path(cache_dir), ids, image_dir, model.load_size)
    if pixels is None:
        pixels = load_pixels(ids, image_dir, model.load_size)
    return SplitData(ids, pixels, labels, model.image_size)








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
    `tasks.training.crop_cache.CropSplit`, the flipped view where flipped); plus the (B, 4) augmentation
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
