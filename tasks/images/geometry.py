"""The network input geometry and augmentation, defined here and nowhere else.

Every image is resized to `model.load_size` (= `model.resize`, or `model.image_size` when
unset) by the loader or the image cache, and the network sees an `image_size` crop of it: the
centre crop everywhere (validation, evaluation, thresholds, the crop cache, scoring), a random
crop per image and epoch in stage-I training only (`train.random_crop`). Boxes are inclusive
(y0, x0, y1, x1) pixel boxes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cxr.core.config import AugmentParams, ModelParams
from tasks.images.loader import to_uint8

# Grayscale radiographs are fed as three identical channels, normalised as torchvision's
# ImageNet backbones expect, so `pretrained: imagenet` and `none` share one input pipeline.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


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


def scale_box(box: tuple[int, int, int, int], src: tuple[int, int], dst: tuple[int, int]) -> tuple[int, int, int, int]:
    """Inclusive pixel box (y0, x0, y1, x1) in an image of shape `src` -> the same region in `dst`."""
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    y0, x0, y1, x1 = box
    return (int(np.floor(y0 * sy)), int(np.floor(x0 * sx)),
            min(dst[0] - 1, int(np.ceil((y1 + 1) * sy)) - 1), min(dst[1] - 1, int(np.ceil((x1 + 1) * sx)) - 1))


# --------------------------------------------------------------------------- augmentation


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
