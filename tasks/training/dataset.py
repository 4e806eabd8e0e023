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
from tasks.images.cache_store import CacheReader
from tasks.images.image_cache import cached_rows
from tasks.images.loader import load_image_uint8


# --------------------------------------------------------------------------- splits


@dataclass
class SplitData:
    """A split's labels and its pixels at `model.load_size`, in one of two homes:

    * the image cache (`cache`, `rows`: the cache's index positions of `ids`, in split order):
      nothing of the split is held; every batch is read from the cache's shards when asked
      for (`take`, `inputs`), so memory does not grow with the split;
    * memory (`loaded`, (N, R, R) uint8): the loader's fallback for a folder the image cache
      does not serve, decoded once (small folders: tests, a first look at a few images).

    Both give the same pixels, so which one a split came from never changes a result.
    """

    ids: list[str]
    loaded: torch.Tensor | None  # (N, R, R) uint8 in memory, or None when read from the cache
    labels: torch.Tensor  # (N, K) float32 0/1
    size: int  # network input side (model.image_size)
    cache: CacheReader | None = None
    rows: np.ndarray | None = None  # (N,) int64 cache index positions of ids

    def __post_init__(self):
        if (self.loaded is None) == (self.cache is None):
            raise ValueError("a split's pixels are either in memory (loaded) or in the image cache (cache, rows)")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx) -> torch.Tensor:
        """(B, R, R) uint8 at load_size of the split positions `idx` (sequence, array or int64
        tensor), in that order: a copy, read from the cache's shards when the split lives there."""
        if self.loaded is not None:
            return self.loaded[torch.as_tensor(idx, dtype=torch.int64)]
        return torch.from_numpy(self.cache.get("pixels", self.rows[np.asarray(idx, dtype=np.int64)]))

    def inputs(self, start: int, stop: int) -> torch.Tensor:
        """(B, S, S) uint8 network inputs without augmentation (the centre crop) of split
        positions start..stop-1: what validation, evaluation and registration read, batch by batch."""
        if self.loaded is not None:
            return center_crop(self.loaded[start:stop], self.size)
        return center_crop(torch.from_numpy(self.cache.get("pixels", self.rows[start:stop])), self.size)

    @property
    def pixels(self) -> torch.Tensor:
        """(N, S, S) uint8 network input of the whole split (centre crop): a view in memory, a
        copy of the whole split from the cache. Only for small splits and samples; training,
        validation and evaluation read `inputs` / `take` per batch."""
        return self.inputs(0, len(self.ids))


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
    """A split's labels and where its pixels at `model.load_size` are read from: the image
    cache at `cache_dir` when it holds `image_dir` at that size (batch by batch, no decoding,
    nothing of the split in memory), else decoded through the loader into memory."""
    ids = splits.loc[splits["split"] == split, "image_id"].tolist()
    if not ids:
        raise DataError(f"the {split} split is empty", where="splits.parquet")
    rows = meta.set_index("image_id").loc[ids, list(LABEL_COLUMNS)]
    labels = torch.from_numpy(rows.to_numpy(dtype=np.float32, copy=True))
    if cache_dir is not None:
        found = cached_rows(Path(cache_dir), ids, image_dir, model.load_size)
        if found is not None:
            reader, positions = found
            return SplitData(ids, None, labels, model.image_size, reader, positions)
    return SplitData(ids, load_pixels(ids, image_dir, model.load_size), labels, model.image_size)


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
        loaded = self.data.take([i])[0]
        if self.offsets is None:
            pixels = center_crop(loaded, self.data.size)
        else:
            top, left = self.offsets[i].tolist()
            pixels = crop(loaded, top, left, self.data.size)
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
        if isinstance(self.data, SplitData):  # (not hasattr "pixels": that property reads the whole split)
            inputs = (self._pixels(idx, flips),)
        else:
            inputs = self._cached(idx, flips)
        extra = (self.augment[idx],) if self.augment is not None else ()
        return (*inputs, *extra, self.data.labels[idx])

    def _pixels(self, idx: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        size = self.data.size
        loaded = self.data.take(idx)  # this batch only, read from the cache's shards (or memory)
        if self.offsets is None:
            pixels = center_crop(loaded, size)
        else:  # each image's own window: gather rows, then columns
            span = torch.arange(size)
            rows = (self.offsets[idx, 0, None] + span)[:, :, None]
            cols = (self.offsets[idx, 1, None] + span)[:, None, :]
            pixels = loaded[torch.arange(len(idx))[:, None, None], rows, cols]
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
