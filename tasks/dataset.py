"""Labelled image tensors for training and evaluation, read through the one image loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxr.errors import DataError
from cxr.labels import LABEL_COLUMNS
from tasks.images import load_image_uint8

# Grayscale radiographs are fed as three identical channels, normalised as torchvision's
# ImageNet backbones expect, so `pretrained: imagenet` and `none` share one input pipeline.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class SplitData:
    ids: list[str]
    pixels: torch.Tensor  # (N, S, S) uint8
    labels: torch.Tensor  # (N, K) float32 0/1


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


def load_split(meta, splits, split: str, image_dir: Path, size: int, cache_dir: Path | None = None) -> SplitData:
    """A split's pixels and labels; from the image cache at `cache_dir` when it holds
    `image_dir` at `size` (same pixels, no decoding), else through the loader."""
    ids = splits.loc[splits["split"] == split, "image_id"].tolist()
    if not ids:
        raise DataError(f"the {split} split is empty", where="splits.parquet")
    rows = meta.set_index("image_id").loc[ids, list(LABEL_COLUMNS)]
    labels = torch.from_numpy(rows.to_numpy(dtype=np.float32, copy=True))
    pixels = None
    if cache_dir is not None:
        from tasks.image_cache import cached_pixels  # the cache builds on this module's loader

        pixels = cached_pixels(Path(cache_dir), ids, image_dir, size)
    return SplitData(ids, pixels if pixels is not None else load_pixels(ids, image_dir, size), labels)


def to_input(pixels: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 3, H, W) float normalised network input on `device`."""
    x = pixels.to(device, non_blocking=True).float().div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    x = (x - IMAGENET_MEAN.to(device)) / IMAGENET_STD.to(device)
    # NHWC on CUDA matches a channels-last model; on the CPU NCHW is what the kernels like.
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" else x


class PixelDataset(torch.utils.data.Dataset):
    """Indexable (pixels, labels) with a per-epoch horizontal flip decided up front.

    The flips are drawn from the epoch's seeded generator before loading starts, so the
    result does not depend on the number of DataLoader workers.
    """

    def __init__(self, data: SplitData, flips: torch.Tensor | None = None):
        self.data = data
        self.flips = flips

    def __len__(self) -> int:
        return len(self.data.ids)

    def __getitem__(self, i: int):
        pixels = self.data.pixels[i]
        if self.flips is not None and bool(self.flips[i]):
            pixels = pixels.flip(-1)
        return pixels, self.data.labels[i]
