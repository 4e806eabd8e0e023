"""Straightforward per-image AG-CNN attention crop: numpy + skimage, one image at a time.

The oracle for `models.attention` (tests and benchmark). Upsampling uses
torch.nn.functional.interpolate on each single image with the same bilinear,
align_corners=False setting, so results are comparable bit for bit. Crops come in two
per-image flavours: skimage's bilinear resize (the numpy way; float64, so equal to ~1e-5)
and torch's native F.interpolate on each crop (the strongest per-image baseline).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label
from skimage.transform import resize


def _size2(image_size):
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])


def reference_heatmap(feature: np.ndarray, mode: str = "max_abs") -> np.ndarray:
    """feature: (C, h, w) -> (h, w) float32."""
    if mode == "max_abs":
        return np.abs(feature).max(axis=0).astype(np.float32)
    if mode == "l1":
        return np.abs(feature).sum(axis=0, dtype=np.float64).astype(np.float32)
    raise ValueError(mode)


def reference_mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Largest 8-connected region's inclusive bbox (y0, x0, y1, x1) of mask (H, W); whole image if empty."""
    height, width = mask.shape
    labels = label(mask, connectivity=2)
    if labels.max() == 0:
        return 0, 0, height - 1, width - 1
    sizes = np.bincount(labels.ravel())
    biggest = int(np.argmax(sizes[1:])) + 1
    ys, xs = np.nonzero(labels == biggest)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def reference_boxes(features_np: np.ndarray, image_size, threshold: float = 0.7, mode: str = "max_abs") -> np.ndarray:
    """features_np: (B, C, h, w) -> (B, 4) int64 boxes y0, x0, y1, x1 inclusive."""
    height, width = _size2(image_size)
    out = np.zeros((len(features_np), 4), dtype=np.int64)
    for i, feature in enumerate(features_np):
        heat = reference_heatmap(feature, mode)
        lo, hi = heat.min(), heat.max()
        if hi == lo:
            out[i] = (0, 0, height - 1, width - 1)
            continue
        norm = (heat - lo) / (hi - lo)
        up = F.interpolate(torch.from_numpy(norm)[None, None], size=(height, width), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        out[i] = reference_mask_box(up > threshold)
    return out


def reference_crops(images: torch.Tensor, boxes, size) -> torch.Tensor:
    """images (B, C, H, W), boxes (B, 4) inclusive y0, x0, y1, x1 -> (B, C, S, S) per-image crops."""
    size = _size2(size)
    crops = []
    for img, (y0, x0, y1, x1) in zip(images, np.asarray(boxes).tolist()):
        crops.append(F.interpolate(img[:, y0:y1 + 1, x0:x1 + 1][None], size=size, mode="bilinear",
                                   align_corners=False)[0])
    return torch.stack(crops)


def reference_crops_skimage(images: np.ndarray, boxes, size) -> np.ndarray:
    """images (B, C, H, W) float32 array -> (B, C, S, S) per-image skimage bilinear crops."""
    size = _size2(size)
    out = np.empty((len(images), images.shape[1], *size), dtype=np.float32)
    for i, (y0, x0, y1, x1) in enumerate(np.asarray(boxes).tolist()):
        # order=1 with edge mode is bilinear with the half-pixel convention of align_corners=False.
        out[i] = resize(images[i, :, y0 : y1 + 1, x0 : x1 + 1], (images.shape[1], *size), order=1, mode="edge",
                        anti_aliasing=False, preserve_range=True)
    return out
