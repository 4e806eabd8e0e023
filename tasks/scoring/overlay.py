"""Pictures of a scored study: class activation heatmaps and the attention box on the radiograph.

Pure numpy (+ Pillow for the title glyphs and JPEG): a study's overlay has one panel for the
radiograph with its attention box, then one panel per top finding with that class's
activation map blended in. Rendering is in the hot loop of batch scoring (one overlay and
one thumbnail per study), so the whole canvas is one numpy array built by one table lookup
per pixel (map level, grey level) -> RGBX (4-byte rows: a third of the 3-byte gather's time),
the boxes are array slices and each title is a cached glyph mask.

The overlay is written as a JPEG (`overlay_jpeg`, quality 95, as highdicom encodes the PACS's
Secondary Capture of it, which then carries these very bytes): a display picture, labelled not
for diagnosis, at a fifth of the lossless PNG's bytes and a third of its encoding time
(benchmarks/bench_score.py). The thumbnails and the app's pictures stay PNG (`encode_png`,
straight from the array: no Pillow image round trip).
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from isal import isal_zlib
from PIL import Image, ImageDraw, ImageFont

from cxr.core.atomic import atomic_write_bytes
from tasks.images.geometry import scale_box

# Control points of a jet-like map (blue -> cyan -> yellow -> red): readable on grey film.
_STOPS = np.array([0.0, 0.35, 0.65, 1.0])
_COLOURS = np.array([[0, 0, 160], [0, 220, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float64)
BOX_COLOUR = (0, 255, 0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TITLE_HEIGHT = 16
TITLE_X, TITLE_Y = 3, 2  # where a panel's title starts in its strip
OVERLAY_SUFFIX = ".jpg"
# The overlay's JPEG: highdicom's quality for a JPEG baseline frame, and Pillow's default
# chroma subsampling as highdicom leaves it, so the Secondary Capture can carry the file as is.
OVERLAY_JPEG_QUALITY = 95


def _lut() -> np.ndarray:
    levels = np.linspace(0.0, 1.0, 256)
    return np.rint(np.stack([np.interp(levels, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)).astype(np.uint8)


_LUT = _lut()  # (256, 3) uint8: the map at 256 levels, finer than the eye tells apart


def _blend_table(alpha: float) -> np.ndarray:
    """(256 * 256 + 256,) uint32, each the bytes R, G, B, 255: round((1 - alpha) * grey + alpha
    * colour) at map level * 256 + grey level, then the plain grey levels at GREY + grey level.
    One gather of 4-byte words per pixel draws every panel of an overlay, the radiograph's too."""
    grey = np.arange(256, dtype=np.float64)[None, :, None]
    rgb = np.rint((1 - alpha) * grey + alpha * _LUT[:, None, :].astype(np.float64)).astype(np.uint8)
    plain = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    rows = np.concatenate([rgb.reshape(-1, 3), plain])
    return np.concatenate([rows, np.full((len(rows), 1), 255, np.uint8)], axis=1).view(np.uint32)[:, 0].copy()


GREY = 256 * 256  # offset of the plain grey levels in a blend table
_BLEND: dict[float, np.ndarray] = {}


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) floats in [0, 1] -> (H, W, 3) uint8 RGB (values quantised to 256 levels)."""
    return _LUT[_levels(values)]


def _levels(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8 levels 0..255 (uint8 input is taken as levels already)."""
    if values.dtype == np.uint8:
        return values
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    v *= 255.0
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


_SCRATCH = threading.local()  # per thread: the last array of each kind (canvas, index, maps)


def _scratch(kind: str, shape: tuple, dtype) -> np.ndarray:
    """A reusable array of this thread. Fresh megabyte arrays per study cost more than their
    drawing: the allocator hands such blocks back to the kernel when freed, and every page
    of the next one faults in zeroed (2.5 ms against 0.5 ms for an overlay's canvas)."""
    held = getattr(_SCRATCH, kind, None)
    if held is None or held.shape != shape:
        held = np.empty(shape, dtype=dtype)
        setattr(_SCRATCH, kind, held)
    return held


@lru_cache(maxsize=64)
def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, w_lo, w_hi): the two source indices and weights of every output position of
    1-D bilinear resampling with half-pixel centres (torch's `interpolate(mode="bilinear",
    align_corners=False)` without antialiasing)."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    return lo, hi, 1.0 - frac, frac


@lru_cache(maxsize=64)
def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_in, n_out) float32: `_bilinear_taps` as a matrix (column j holds output j's two
    weights), so that a product with it resamples the last axis."""
    lo, hi, w_lo, w_hi = _bilinear_taps(n_in, n_out)
    matrix = np.zeros((n_in, n_out), dtype=np.float32)
    np.add.at(matrix, (lo, np.arange(n_out)), w_lo)
    np.add.at(matrix, (hi, np.arange(n_out)), w_hi)
    return matrix


def upsample_maps(grid: np.ndarray, shape: tuple[int, int], *, levels: bool = False) -> np.ndarray:
    """(T, fh, fw) float maps -> (T, h, w) float32, bilinear with half-pixel centres; with
    `levels`, as uint8 levels of those floats (clipped to [0, 1], times 255, rounded).

    Floats: two gathers and blends (rows, then columns) in numpy, each output a convex blend
    of two grid values (a map within [0, 1] stays within it). Levels, what the overlay draws
    in the hot loop of batch scoring: the clip and the scale on the small grid, then two
    matrix products with the resampling weights (a seventh of the gathers' time; at most a
    level apart from them where a value sits on a rounding edge), into this thread's scratch
    array (no fresh megabyte per study, see `_scratch`). A batch run holds numpy's BLAS to
    one thread (`tasks.scoring.run`): its second thread would spin on the forward's core.
    """
    grid = np.asarray(grid, dtype=np.float32)
    if levels:
        scaled = np.clip(grid, 0.0, 1.0) * np.float32(255.0)
        rows = np.matmul(_bilinear_matrix(grid.shape[-2], shape[0]).T, scaled)  # (T, h, fw)
        out = _scratch("maps", (grid.shape[0], *shape), np.float32)
        np.matmul(rows, _bilinear_matrix(grid.shape[-1], shape[1]), out=out)
        np.rint(out, out=out)
        return out.astype(np.uint8)
    ylo, yhi, ya, yb = _bilinear_taps(grid.shape[-2], shape[0])
    xlo, xhi, xa, xb = _bilinear_taps(grid.shape[-1], shape[1])
    rows = grid[:, ylo, :] * ya[:, None] + grid[:, yhi, :] * yb[:, None]  # (T, h, fw)
    out = rows[:, :, xlo] * xa
    out += rows[:, :, xhi] * xb
    return out


def levels(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8 levels 0..255 (value * 255 rounded; uint8 input is taken as levels already)."""
    return _levels(values)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's default font is decoded from its embedded data on every load: once per process.
    return ImageFont.load_default()


@lru_cache(maxsize=512)
def _glyph(ch: str) -> tuple[np.ndarray, int, int]:
    """(coverage, left, advance) of one character drawn at (TITLE_X, TITLE_Y) in a title strip:
    its columns from `left` on, and how far the pen moves after it."""
    font = _font()
    left, _, right, _ = (int(np.floor(v)) for v in ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((TITLE_X, TITLE_Y), ch, font=font))
    left = max(0, min(left, TITLE_X))  # a glyph reaching left of the strip is cut there
    strip = Image.new("L", (max(1, right + 2), TITLE_HEIGHT))
    ImageDraw.Draw(strip).text((TITLE_X, TITLE_Y), ch, fill=255, font=font)
    return np.asarray(strip)[:, left:], left - TITLE_X, int(round(font.getlength(ch)))


@lru_cache(maxsize=2048)  # a finding's title recurs (name, two decimals, flag); a study id's does not
def _title_mask(title: str, room: int) -> np.ndarray:
    """(TITLE_HEIGHT, <= room) uint8 coverage of `title` drawn at (TITLE_X, TITLE_Y), cut at
    `room` columns. Put together from cached glyphs: a title holds the study's id, new for
    every study, and drawing its text through the font cost half a millisecond a study. The
    default font's advances are whole pixels and it has no kerning, so the glyphs side by side
    are the string as the font draws it (but for a few levels where two glyphs touch, "ff")."""
    pens, x = [], TITLE_X
    for ch in title:
        mask, left, advance = _glyph(ch)
        pens.append((x + left, mask))
        x += advance
    width = max([TITLE_X + 1] + [p + m.shape[1] for p, m in pens])
    strip = np.zeros((TITLE_HEIGHT, max(1, min(room, width))), dtype=np.uint8)
    for pen, mask in pens:
        if pen >= strip.shape[1]:
            break
        cols = min(mask.shape[1], strip.shape[1] - pen)
        np.maximum(strip[:, pen : pen + cols], mask[:, :cols], out=strip[:, pen : pen + cols])
    return strip


def _outline(rgb: np.ndarray, box, width: int, colour=BOX_COLOUR) -> None:
    """Draw an inclusive (y0, x0, y1, x1) box outline `width` pixels thick, inward, on (H, W, 3) `rgb`
    (what Pillow's `rectangle(outline=..., width=...)` draws)."""
    y0, x0, y1, x1 = (int(v) for v in box)
    k = max(1, int(width))
    for ys, xs in ((slice(y0, min(y0 + k, y1 + 1)), slice(x0, x1 + 1)), (slice(max(y1 - k + 1, y0), y1 + 1), slice(x0, x1 + 1)),
                   (slice(y0, y1 + 1), slice(x0, min(x0 + k, x1 + 1))), (slice(y0, y1 + 1), slice(max(x1 - k + 1, x0), x1 + 1))):
        rgb[ys, xs] = colour


def render_overlay(gray: np.ndarray, box, cams: np.ndarray, titles: list[str], alpha: float = 0.45) -> np.ndarray:
    """One (h + TITLE_HEIGHT, (1 + T) * w, 3) uint8 RGB picture: the radiograph with its box,
    then one heatmap panel per finding (a view of `render_overlay_rgbx`'s canvas).

    gray: (h, w) float [0, 1] at display size, or uint8 levels; box: inclusive (y0, x0, y1, x1)
    in those pixels; cams: (T, h, w) float in [0, 1], or uint8 levels (value * 255 rounded);
    titles: the radiograph's title, then T finding titles, white on the black TITLE_HEIGHT strip
    above each panel. blend = (1 - alpha) * gray + alpha * colour.
    """
    return render_overlay_rgbx(gray, box, cams, titles, alpha)[..., :3]


def render_overlay_rgbx(gray: np.ndarray, box, cams: np.ndarray, titles: list[str], alpha: float = 0.45,
                        *, scratch: bool = False) -> np.ndarray:
    """`render_overlay`'s picture as a contiguous (H, W, 4) RGBX canvas (the fourth byte is
    padding), what `overlay_jpeg` hands the JPEG encoder without a copy. `scratch`: drawn in
    this thread's reusable canvas, valid until the thread's next scratch drawing."""
    h, w = gray.shape
    panels = 1 + len(cams)
    base = _levels(gray)
    table = _BLEND.get(alpha)
    if table is None:
        table = _BLEND.setdefault(alpha, _blend_table(alpha))
    shape = (h + TITLE_HEIGHT, panels, w)
    canvas = _scratch("canvas", shape, np.uint32) if scratch else np.empty(shape, dtype=np.uint32)
    # One lookup per pixel of every panel: (map level, grey level) -> blended RGBX, and
    # GREY + grey level for the radiograph itself; written in place, row by row of panels.
    index = _scratch("index", (h, panels, w), np.int32)
    index[:, 0] = base
    index[:, 0] += GREY
    if len(cams):
        np.left_shift(_levels(cams).transpose(1, 0, 2), 8, out=index[:, 1:], dtype=np.int32)
        index[:, 1:] |= base[:, None, :]
    np.take(table, index, out=canvas[TITLE_HEIGHT:], mode="clip")  # "raise" would buffer `out`
    rgbx = canvas.view(np.uint8).reshape(h + TITLE_HEIGHT, panels * w, 4)
    out = rgbx[..., :3]
    strip = np.zeros((TITLE_HEIGHT, panels * w), dtype=np.uint8)
    for i, title in enumerate(titles[:panels]):
        mask = _title_mask(title, (panels - i) * w)
        np.maximum(strip[:, i * w : i * w + mask.shape[1]], mask, out=strip[:, i * w : i * w + mask.shape[1]])
    out[:TITLE_HEIGHT] = strip[..., None]
    y0, x0, y1, x1 = box
    for i in range(panels):
        _outline(out, (y0 + TITLE_HEIGHT, i * w + x0, y1 + TITLE_HEIGHT, i * w + x1), max(1, w // 192))
    return rgbx


def thumbnail(gray: np.ndarray, box, longest: int = 128) -> np.ndarray:
    """Small (h, w, 3) uint8 RGB picture of the radiograph with its box, for the HTML report.

    gray: (h, w) float [0, 1] or uint8 levels. Shrunk from the levels (Pillow's 8-bit
    resampling, a tenth of its float path's time): a thumbnail needs no finer grey. When the
    picture is a whole multiple of the thumbnail (the 256-px display picture of a batch run,
    halved), by averaging each block of pixels (Pillow's `reduce`: a sixth of the bilinear
    resampling's time, 0.16 -> 0.02 ms)."""
    shape = display_shape(*gray.shape, longest)
    base = _levels(gray)
    factor = base.shape[0] // shape[0]
    if base.shape == shape:
        small = base
    elif factor > 1 and base.shape == (shape[0] * factor, shape[1] * factor):
        small = np.asarray(Image.fromarray(base).reduce(factor))
    else:
        small = np.asarray(Image.fromarray(base).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    rgb = np.repeat(small[..., None], 3, axis=2)
    _outline(rgb, scale_box(box, gray.shape, shape), 1)
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


def encode_jpeg(picture: np.ndarray, quality: int = OVERLAY_JPEG_QUALITY) -> bytes:
    """(H, W, 3) RGB or contiguous (H, W, 4) RGBX uint8 -> baseline JPEG bytes (JFIF, YCbCr,
    Pillow's default chroma subsampling), through libjpeg-turbo. The same bytes for an RGB
    array and its RGBX canvas."""
    h, w, channels = picture.shape
    if channels == 4 and picture.flags.c_contiguous:
        image = Image.frombuffer("RGBX", (w, h), picture, "raw", "RGBX", 0, 1)
    else:
        image = Image.fromarray(np.ascontiguousarray(picture[..., :3], dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def overlay_jpeg(gray: np.ndarray, box, cams: np.ndarray, titles: list[str], alpha: float = 0.45) -> bytes:
    """`render_overlay`'s picture as JPEG bytes (what the scorer writes as a study's overlay)."""
    return encode_jpeg(render_overlay_rgbx(gray, box, cams, titles, alpha, scratch=True))


def save_png(image: Image.Image | np.ndarray, path: Path, *, durable: bool = True) -> None:
    """Write an RGB picture (an (H, W, 3) uint8 array or a Pillow image) as PNG, atomically
    (`durable=False`: flushed later, by the batch that commits it: `cxr.core.atomic`).
    Deflate level 1: overlays are written per study in the hot loop of scoring, where size
    matters less than time."""
    rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
    atomic_write_bytes(path, encode_png(rgb), durable=durable)
