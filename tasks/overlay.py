"""Pictures of a scored study: class activation heatmaps and the attention box on the radiograph.

Pure numpy + Pillow: a study's overlay PNG has one panel for the radiograph with its
attention box, then one panel per top finding with that class's activation map blended in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cxr.atomic import atomic_path

# Control points of a jet-like map (blue -> cyan -> yellow -> red): readable on grey film.
_STOPS = np.array([0.0, 0.35, 0.65, 1.0])
_COLOURS = np.array([[0, 0, 160], [0, 220, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float64)
BOX_COLOUR = (0, 255, 0)
TITLE_HEIGHT = 16


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) floats in [0, 1] -> (H, W, 3) uint8 RGB."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


def display_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """(h, w) with the longest side `longest` and the aspect ratio kept."""
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_gray(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float [0, 1] -> (h, w) float32, bilinear (antialiased when shrinking)."""
    if image.shape == shape:
        return image.astype(np.float32, copy=False)
    return np.asarray(Image.fromarray(image.astype(np.float32)).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def scale_box(box: tuple[int, int, int, int], src: tuple[int, int], dst: tuple[int, int]) -> tuple[int, int, int, int]:
    """Inclusive pixel box (y0, x0, y1, x1) in an image of shape `src` -> the same region in `dst`."""
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    y0, x0, y1, x1 = box
    return (int(np.floor(y0 * sy)), int(np.floor(x0 * sx)),
            min(dst[0] - 1, int(np.ceil((y1 + 1) * sy)) - 1), min(dst[1] - 1, int(np.ceil((x1 + 1) * sx)) - 1))


def _panel(rgb: np.ndarray, box, title: str) -> Image.Image:
    h, w = rgb.shape[:2]
    panel = Image.new("RGB", (w, h + TITLE_HEIGHT), (0, 0, 0))
    panel.paste(Image.fromarray(rgb), (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(panel)
    y0, x0, y1, x1 = box
    draw.rectangle((x0, y0 + TITLE_HEIGHT, x1, y1 + TITLE_HEIGHT), outline=BOX_COLOUR, width=max(1, w // 192))
    draw.text((3, 2), title, fill=(255, 255, 255))
    return panel


def render_overlay(gray: np.ndarray, box, cams: np.ndarray, titles: list[str], alpha: float = 0.45) -> Image.Image:
    """One RGB image: the radiograph with its box, then one heatmap panel per finding.

    gray: (h, w) float [0, 1] at display size; box: inclusive (y0, x0, y1, x1) in those
    pixels; cams: (T, h, w) in [0, 1]; titles: the radiograph's title, then T finding titles.
    """
    base = np.repeat((np.clip(gray, 0, 1) * 255.0)[..., None], 3, axis=-1)
    panels = [_panel(np.rint(base).astype(np.uint8), box, titles[0])]
    for cam, title in zip(cams, titles[1:]):
        blended = (1 - alpha) * base + alpha * colormap(cam).astype(np.float64)
        panels.append(_panel(np.rint(blended).astype(np.uint8), box, title))
    out = Image.new("RGB", (sum(p.width for p in panels), panels[0].height))
    for i, p in enumerate(panels):
        out.paste(p, (i * panels[0].width, 0))
    return out


def thumbnail(gray: np.ndarray, box, longest: int = 128) -> Image.Image:
    """Small RGB picture of the radiograph with its box, for the HTML report."""
    shape = display_shape(*gray.shape, longest)
    small = resize_gray(gray, shape)
    rgb = Image.fromarray(np.rint(np.repeat(np.clip(small, 0, 1)[..., None] * 255.0, 3, axis=-1)).astype(np.uint8))
    y0, x0, y1, x1 = scale_box(box, gray.shape, shape)
    ImageDraw.Draw(rgb).rectangle((x0, y0, x1, y1), outline=BOX_COLOUR)
    return rgb


def save_png(image: Image.Image, path: Path) -> None:
    # compress_level 1: overlays are written per study in the hot loop; size matters less.
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=1)
