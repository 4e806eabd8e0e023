"""Pictures of a scored study: class activation heatmaps and the attention box on the radiograph.

Pure numpy + Pillow: a study's overlay PNG has one panel for the radiograph with its
attention box, then one panel per top finding with that class's activation map blended in.
Rendering is in the hot loop of batch scoring (one overlay per study), so it works on uint8
arrays: the colour map is a 256-entry lookup table, the blend integer arithmetic, and the
panels one canvas that Pillow only draws boxes and titles on and compresses at level 1.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from isal import isal_zlib
from PIL import Image, ImageDraw

from cxr.core.atomic import atomic_path
from tasks.images.geometry import scale_box

# Control points of a jet-like map (blue -> cyan -> yellow -> red): readable on grey film.
_STOPS = np.array([0.0, 0.35, 0.65, 1.0])
_COLOURS = np.array([[0, 0, 160], [0, 220, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float64)
BOX_COLOUR = (0, 255, 0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TITLE_HEIGHT = 16


def _lut() -> np.ndarray:
    levels = np.linspace(0.0, 1.0, 256)
    return np.rint(np.stack([np.interp(levels, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)).astype(np.uint8)


_LUT = _lut()  # (256, 3) uint8: the map at 256 levels, finer than the eye tells apart


def _blend_table(alpha: float) -> np.ndarray:
    """(256 * 256,) uint32: RGB0 bytes of round((1 - alpha) * grey + alpha * colour), indexed by
    map level * 256 + grey level. Four bytes per entry: one gather of 32-bit words per pixel."""
    grey = np.arange(256, dtype=np.float64)[None, :, None]
    rgb = np.rint((1 - alpha) * grey + alpha * _LUT[:, None, :].astype(np.float64)).astype(np.uint8)
    table = np.zeros((256 * 256, 4), dtype=np.uint8)
    table[:, :3] = rgb.reshape(-1, 3)
    return table.view(np.uint32).ravel()


_BLEND: dict[float, np.ndarray] = {}


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) floats in [0, 1] -> (H, W, 3) uint8 RGB (values quantised to 256 levels)."""
    return _LUT[_levels(values)]


def _levels(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8 levels 0..255 (uint8 input is taken as levels already)."""
    if values.dtype == np.uint8:
        return values
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * 255.0
    return np.rint(v, out=v).astype(np.uint8)


def display_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """(h, w) with the longest side `longest` and the aspect ratio kept."""
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_gray(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float [0, 1] -> (h, w) float32, bilinear (antialiased when shrinking)."""
    if image.shape == shape:
        return image.astype(np.float32, copy=False)
    return np.asarray(Image.fromarray(image.astype(np.float32)).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))




def render_overlay(gray: np.ndarray, box, cams: np.ndarray, titles: list[str], alpha: float = 0.45) -> Image.Image:
    """One RGB image: the radiograph with its box, then one heatmap panel per finding.

    gray: (h, w) float [0, 1] at display size; box: inclusive (y0, x0, y1, x1) in those
    pixels; cams: (T, h, w) float in [0, 1], or uint8 levels (value * 255 rounded); titles: the
    radiograph's title, then T finding titles. Each panel has a TITLE_HEIGHT strip on top; blend = (1 - alpha) * gray + alpha * colour.
    """
    h, w = gray.shape
    panels = 1 + len(cams)
    base = _levels(gray)
    canvas = np.zeros((h + TITLE_HEIGHT, panels * w, 3), dtype=np.uint8)
    canvas[TITLE_HEIGHT:, :w] = base[..., None]
    if len(cams):
        table = _BLEND.get(alpha)
        if table is None:
            table = _BLEND.setdefault(alpha, _blend_table(alpha))
        # One lookup per pixel: (map level, grey level) -> blended RGB, laid out as the panel row.
        index = (_levels(cams).transpose(1, 0, 2).astype(np.int32) << 8) | base[:, None, :]  # (h, T, w)
        rgb0 = np.take(table, index).view(np.uint8).reshape(h, len(cams) * w, 4)
        canvas[TITLE_HEIGHT:, w:] = rgb0[..., :3]
    out = Image.fromarray(canvas)
    draw = ImageDraw.Draw(out)
    y0, x0, y1, x1 = box
    for i, title in enumerate(titles[:panels]):
        left = i * w
        draw.rectangle((left + x0, y0 + TITLE_HEIGHT, left + x1, y1 + TITLE_HEIGHT), outline=BOX_COLOUR,
                       width=max(1, w // 192))
        draw.text((left + 3, 2), title, fill=(255, 255, 255))
    return out


def thumbnail(gray: np.ndarray, box, longest: int = 128) -> Image.Image:
    """Small RGB picture of the radiograph with its box, for the HTML report."""
    shape = display_shape(*gray.shape, longest)
    small = resize_gray(gray, shape)
    rgb = Image.fromarray(np.rint(np.repeat(np.clip(small, 0, 1)[..., None] * 255.0, 3, axis=-1)).astype(np.uint8))
    y0, x0, y1, x1 = scale_box(box, gray.shape, shape)
    ImageDraw.Draw(rgb).rectangle((x0, y0, x1, y1), outline=BOX_COLOUR)
    return rgb


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (8-bit RGB, every row "Up"-filtered, deflate `level` 0-3).

    A fixed Up filter (each byte minus the one above, mod 256) is one numpy subtraction, and
    ISA-L's deflate (standard zlib streams) at level 1 is about 4x faster than zlib's with a
    slightly smaller result: together about a tenth of Pillow's PNG encoder's time at its
    compress_level 1 on an overlay, for the same size (measured on a 1152x400 overlay).
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    rows = rgb.reshape(h, w * 3)
    scan = np.empty((h, 1 + w * 3), dtype=np.uint8)
    scan[:, 0] = 2  # filter type Up; the row above the first is zeros, so it is stored as is
    scan[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=scan[1:, 1:])

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, adaptive, no interlace
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", isal_zlib.compress(scan.tobytes(), level)) + chunk(b"IEND", b"")


def save_png(image: Image.Image | np.ndarray, path: Path) -> None:
    """Write an RGB picture as PNG, atomically. zlib level 1: overlays are written per study
    in the hot loop of scoring, where size matters less than time."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    with atomic_path(path) as tmp:
        tmp.write_bytes(encode_png(rgb))
