"""The one image loader used by the cache, training and scoring.

Every radiograph enters the workflow through `load_image` (float32 in [0, 1]) or
`load_image_uint8`. Formats are told apart by their magic bytes, never by the file
extension: PNG and JPEG are read with Pillow, DICOM with pydicom. Anything that cannot be
used as a radiograph raises `cxr.core.errors.DataError` with `where` naming the file and a
one-paragraph reason; sizes are checked from the header before any pixel data is decoded,
so a decompression bomb costs a few bytes of reading, not gigabytes of memory.

Intensity conventions (bright = dense, like a normal chest film):

* 8-bit PNG/JPEG: value / 255.
* 16-bit PNG (Pillow modes "I;16", "I;16B", "I;16L", or "I" holding 16-bit samples):
  value / 65535. The PNG specification requires encoders to scale samples to the full
  16-bit range (sBIT is only a hint), so the dtype maximum is the right divisor.
* Colour (RGB, RGBA, palette, CMYK, ...) and grey+alpha: ITU-R BT.601 luma
  0.299 R + 0.587 G + 0.114 B computed in float; alpha is ignored.
* DICOM: Modality LUT / Rescale Slope+Intercept (`apply_modality_lut`), then the first
  VOI LUT (applied here, see `_voi_lut_sequence`) or else the first window
  (`apply_voi_lut`), its output range mapped onto [0, 1]. An unusable window (width < 1)
  is ignored as display metadata.
  Without a usable VOI LUT or window, data of at most 8 bits stored is divided by its
  nominal range (like an 8-bit PNG); deeper data (typically 10-16-bit detector values that
  use only part of their nominal range) is min-max normalised over the frame.
  MONOCHROME1 is inverted (1 - x) so bone is bright; the tag is trusted, never guessed. Multi-frame: first frame only.
  Colour DICOM (SamplesPerPixel 3) is decoded to RGB by pydicom and reduced to luma.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr.core.digest import reading as _reading
from cxr.core.errors import DataError

__all__ = [
    "LoaderLimits",
    "RADIOGRAPH_MODALITIES",
    "colourfulness",
    "load_image",
    "load_image_uint8",
    "to_uint8",
    "sniff_kind",
]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"

#: Modalities accepted as projection radiographs. A DICOM without (0008,0060) Modality,
#: or with an empty one, is accepted too.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})

# ITU-R BT.601 luma weights (the same ones Pillow's convert("L") uses).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

# Everything Pillow / zlib / struct raise for a broken stream (not programming errors).
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, IndexError)


@dataclass(frozen=True)
class LoaderLimits:
    """Sanity limits applied to every image, checked from the header before decoding."""

    max_pixels: int = 60_000_000  # decompression-bomb guard (width * height)
    min_side: int = 32  # smaller than this cannot be a radiograph


_DEFAULT_LIMITS = LoaderLimits()


# --------------------------------------------------------------------------- public API


def sniff_kind(path: str | os.PathLike) -> str:
    """Return "png", "jpeg" or "dicom" from the file's magic bytes (the extension is ignored).

    DICOM is recognised by the Part 10 preamble: "DICM" at byte offset 128.
    Raises DataError for a missing, unreadable or empty file, or one with no known signature.
    """
    path = Path(path)
    head = _read_head(path, DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
        return "dicom"
    raise DataError(
        f"not an image (no PNG, JPEG or DICOM signature; the file starts with {head[:16]!r})",
        where=str(path),
    )


def load_image(path: str | os.PathLike, limits: LoaderLimits = _DEFAULT_LIMITS, *, facts: dict | None = None) -> np.ndarray:
    """Load a radiograph as grayscale float32 of shape (H, W) with values in [0, 1].

    With `facts` (a dict), also fill in model-free facts seen while decoding, for
    `tasks.scoring.precheck.precheck`: "format" (png/jpeg/dicom), "channels" (1 gray, 3 colour),
    "colourfulness" (Hasler-Suesstrunk on 0..255, 0.0 for grayscale), "modality" and
    "body_part" (DICOM tags, None when absent or not DICOM).
    """
    path = Path(path)
    kind = sniff_kind(path)
    if facts is not None:
        facts.update(format=kind, channels=1, colourfulness=0.0, modality=None, body_part=None)
    if kind == "dicom":
        arr = _load_dicom(path, limits, facts)
    else:
        arr = _load_pillow(path, kind, limits, facts)
    arr = np.clip(arr, 0.0, 1.0, out=arr)
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_image_uint8(
    path: str | os.PathLike, size: int | None = None, limits: LoaderLimits = _DEFAULT_LIMITS
) -> np.ndarray:
    """Load a radiograph as uint8 (H, W), or resized to (size, size) when `size` is given.

    Resizing uses Pillow's bilinear filter on the float image (Pillow widens the filter
    support when shrinking, so downscaling is antialiased) and rounds once at the end. The
    aspect ratio is not preserved: non-square images are stretched to a square.
    """
    return to_uint8(load_image(path, limits), size)


def to_uint8(image: np.ndarray, size: int | None = None) -> np.ndarray:
    """Float (H, W) in [0, 1] -> uint8 (H, W), or resized to (size, size) as described in
    `load_image_uint8` (callers that already hold the float image use this directly)."""
    if size is not None:
        if int(size) < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        size = int(size)
        if image.shape != (size, size):
            image = np.asarray(
                Image.fromarray(image)  # float32 (H, W) -> mode "F"
                .resize((size, size), Image.Resampling.BILINEAR),
                dtype=np.float32,
            )
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- helpers


def _read_head(path: Path, n: int) -> bytes:
    with _reading(path):
        with open(path, "rb") as handle:
            head = handle.read(n)
    if not head:
        raise DataError("empty file", where=str(path))
    return head


def _check_size(width: int, height: int, limits: LoaderLimits, path: Path) -> None:
    n = int(width) * int(height)
    if n > limits.max_pixels:
        raise DataError(
            f"image is {width}\u00d7{height} = {n} pixels, over the limit of {limits.max_pixels}"
            " (refused before decoding as a possible decompression bomb)",
            where=str(path),
        )
    if min(width, height) < limits.min_side:
        raise DataError(
            f"image is {width}\u00d7{height}, smaller than the minimum side of "
            f"{limits.min_side} px; too small to be a radiograph",
            where=str(path),
        )


def _brief(exc: BaseException, limit: int = 200) -> str:
    """`Type: message`, cut to one short line (pydicom quotes whole raw byte strings)."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of the first three channels of (..., C>=3), in float64."""
    return rgb[..., :3].astype(np.float64) @ _LUMA


def _header_dims(path: Path, kind: str) -> tuple[int, int] | None:
    """Width and height read straight from a PNG IHDR or JPEG SOF marker (None if not found).

    Only used to word the message when Pillow itself refuses an image as a bomb.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 16)
    except OSError:
        return None
    if kind == "png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        return None
    found = jpeg_start_of_frame(data)
    if found is None or found[1] + 9 > len(data):
        return None
    height, width = struct.unpack(">HH", data[found[1] + 5 : found[1] + 9])
    return width, height


def jpeg_start_of_frame(data: bytes) -> tuple[int, int] | None:
    """(marker, offset) of a JPEG's first start-of-frame segment (0xC0: baseline sequential
    DCT; its height and width at offset + 5), found by walking the marker segments after the
    start of image. None when the bytes end, leave the marker structure, or reach the start
    of scan first."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a segment
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker, i
        if marker == 0xDA:
            return None
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


# --------------------------------------------------------------------------- PNG / JPEG


def _load_pillow(path: Path, kind: str, limits: LoaderLimits, facts: dict | None = None) -> np.ndarray:
    where = str(path)
    fmt = "PNG" if kind == "png" else "JPEG"
    with _open_pillow(path, kind, fmt, limits) as im:
        width, height = im.size  # from the header; nothing is decoded yet
        _check_size(width, height, limits, path)
        if kind == "png":
            # Walks every chunk checking its CRC, through IEND, without decoding pixels
            # (~0.5 ms): catches files cut after the last pixel row, which load() accepts.
            try:
                im.verify()
            except _PIL_DECODE_ERRORS as exc:
                raise DataError(f"truncated or corrupt image ({_brief(exc)})", where=where) from None
    with _open_pillow(path, kind, fmt, limits) as im:  # verify() leaves the image unusable
        try:
            im.load()
            if kind == "jpeg":
                im = ImageOps.exif_transpose(im)  # a camera's orientation tag, if any
            return _pil_to_gray(im, path, facts)
        except _PIL_DECODE_ERRORS as exc:
            raise DataError(f"truncated or corrupt image ({_brief(exc)})", where=where) from None


def _open_pillow(path: Path, kind: str, fmt: str, limits: LoaderLimits) -> Image.Image:
    """Image.open restricted to the sniffed format, every failure turned into DataError."""
    where = str(path)
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check on the header is the authority; Pillow's
            # DecompressionBombWarning would only duplicate it as noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path, formats=[fmt])
    except Image.DecompressionBombError as exc:
        # Pillow refuses images over 2 * Image.MAX_IMAGE_PIXELS already in open(); word it
        # like our own check. Image.MAX_IMAGE_PIXELS is left as is (it is process-global), so
        # a max_pixels above 2 * Image.MAX_IMAGE_PIXELS is capped at Pillow's limit.
        dims = _header_dims(path, kind)
        if dims is not None:
            _check_size(dims[0], dims[1], limits, path)
        raise DataError(f"image is over the pixel limit ({_brief(exc)})", where=where) from None
    except UnidentifiedImageError as exc:
        raise DataError(
            f"truncated or corrupt image (it has the {fmt} signature but its header cannot be read: {_brief(exc)})",
            where=where,
        ) from None
    except _PIL_DECODE_ERRORS as exc:
        raise DataError(f"truncated or corrupt image ({_brief(exc)})", where=where) from None


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler-Suesstrunk colourfulness of an (H, W, 3) RGB array on the 0..255 scale.

    sqrt(sd(rg)^2 + sd(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2), rg = R - G,
    yb = (R + G) / 2 - B. Large images are subsampled to about 512 x 512 first.
    """
    step = max(1, int(np.ceil(max(rgb.shape[:2]) / 512)))
    a = np.asarray(rgb[::step, ::step, :3], dtype=np.float64)
    rg = a[..., 0] - a[..., 1]
    yb = 0.5 * (a[..., 0] + a[..., 1]) - a[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _colour_facts(rgb: np.ndarray, facts: dict | None) -> None:
    """Record the colour facts of an (H, W, >=3) uint8 image (gray stored as RGB scores 0)."""
    if facts is not None:
        facts.update(channels=3, colourfulness=colourfulness(rgb))


def _pil_to_gray(im: Image.Image, path: Path, facts: dict | None = None) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.float64) / 255.0
    if mode in ("LA", "La"):
        return np.asarray(im.getchannel(0), dtype=np.float64) / 255.0
    if mode == "1":
        return np.asarray(im, dtype=np.float64)
    if mode.startswith("I;16"):
        # "I;16", "I;16B", "I;16L": numpy reads the byte order from the array interface.
        return np.asarray(im).astype(np.float64) / 65535.0
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(
                "32-bit integer pixel values outside the 16-bit range 0..65535; "
                "cannot tell what the intensities mean",
                where=str(path),
            )
        return arr / 65535.0
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        rgb = np.asarray(im)
        _colour_facts(rgb, facts)
        return _luma(rgb) / 255.0
    if mode == "P" and "transparency" not in im.info:
        rgb = np.asarray(im.convert("RGB"))
        _colour_facts(rgb, facts)
        return _luma(rgb) / 255.0
    # P with transparency, PA, CMYK, YCbCr, LAB, HSV, F, ...: let Pillow go via RGB(A).
    if mode == "F":
        raise DataError("32-bit float pixels are not supported in PNG/JPEG input", where=str(path))
    rgb = np.asarray(im.convert("RGBA"))
    _colour_facts(rgb, facts)
    return _luma(rgb) / 255.0


# --------------------------------------------------------------------------- DICOM

_PYDICOM_ERRORS: tuple[type[BaseException], ...] | None = None


def _pydicom_errors() -> tuple[type[BaseException], ...]:
    global _PYDICOM_ERRORS
    if _PYDICOM_ERRORS is None:
        from pydicom.errors import BytesLengthException, InvalidDicomError

        _PYDICOM_ERRORS = (
            InvalidDicomError,
            BytesLengthException,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            EOFError,
            OSError,
            struct.error,
            zlib.error,
            NotImplementedError,
            RuntimeError,
            OverflowError,
            UnicodeDecodeError,
        )
    return _PYDICOM_ERRORS


def _first(value):
    """First value of a possibly multi-valued DICOM element."""
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        return value[0] if len(value) else None
    return value


def _load_dicom(path: Path, limits: LoaderLimits, facts: dict | None = None) -> np.ndarray:
    import pydicom
    from pydicom.pixels import pixel_array

    where = str(path)
    errors = _pydicom_errors()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about many harmless oddities
            ds = pydicom.dcmread(path, force=False)
    except errors as exc:
        raise DataError(f"corrupt DICOM ({_brief(exc)})", where=where) from None
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not tsyntax or not re.fullmatch(r"[0-9]+(\.[0-9]+)+", str(tsyntax)):
        raise DataError("corrupt DICOM (the file meta header has no valid Transfer Syntax UID)", where=where)

    # Elements are parsed lazily, on first access: read the few we use under one guard, so a
    # malformed one is reported as such (a broken private tag elsewhere does not matter).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = _DicomHeader.read(ds)
    except errors as exc:
        raise DataError(f"corrupt DICOM header ({_brief(exc)})", where=where) from None

    if facts is not None:
        facts.update(modality=header.modality or None, body_part=header.body_part or None)
    if not header.has_pixels:
        raise DataError("DICOM has no pixel data", where=where)
    if header.modality and header.modality not in RADIOGRAPH_MODALITIES:
        raise DataError(
            f"modality {header.modality} is not a radiograph (accepted: "
            f"{', '.join(sorted(RADIOGRAPH_MODALITIES))} or no Modality)",
            where=where,
        )
    if header.missing:
        raise DataError(f"corrupt DICOM (missing {', '.join(header.missing)})", where=where)
    _check_size(header.columns, header.rows, limits, path)  # before any pixel data is decoded

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = pixel_array(ds, index=0)  # first frame only; colour YBR -> RGB
    except (RuntimeError, NotImplementedError) as exc:  # no installed plugin can decode it
        name = getattr(tsyntax, "name", str(tsyntax))
        raise DataError(
            f"cannot decode DICOM pixel data in transfer syntax {name} ({_brief(exc)})", where=where
        ) from None
    except (*errors, AttributeError) as exc:  # AttributeError: a required pixel element missing
        raise DataError(f"corrupt DICOM pixel data ({_brief(exc)})", where=where) from None

    photometric = header.photometric
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if header.samples >= 3 or frame.ndim == 3:
                if frame.ndim != 3 or frame.shape[-1] < 3:
                    raise DataError(f"DICOM colour frame has unexpected shape {frame.shape}", where=where)
                maxval = float(2 ** min(header.bits_stored, header.bits_allocated) - 1)
                _colour_facts(frame * (255.0 / maxval), facts)
                gray = _luma(frame) / maxval
            elif photometric in ("MONOCHROME1", "MONOCHROME2"):
                gray = _dicom_gray(frame, ds, header)
                if photometric == "MONOCHROME1":
                    gray = 1.0 - gray  # the minimum value is displayed white
            elif photometric == "PALETTE COLOR":
                from pydicom.pixels import apply_color_lut

                rgb = apply_color_lut(frame, ds)
                _colour_facts(rgb * (255.0 / float(np.iinfo(rgb.dtype).max)), facts)
                gray = _luma(rgb) / float(np.iinfo(rgb.dtype).max)
            else:
                raise DataError(f"unsupported DICOM Photometric Interpretation {photometric!r}", where=where)
    except (*errors, AttributeError) as exc:
        raise DataError(f"corrupt DICOM intensity transform ({_brief(exc)})", where=where) from None

    if gray.shape != (header.rows, header.columns):
        raise DataError(
            f"decoded DICOM frame is {gray.shape}, the header says {header.rows}\u00d7{header.columns}",
            where=where,
        )
    return np.nan_to_num(gray.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)


@dataclass(frozen=True)
class _DicomHeader:
    has_pixels: bool
    modality: str
    body_part: str
    missing: tuple[str, ...]
    rows: int
    columns: int
    photometric: str
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool

    @classmethod
    def read(cls, ds) -> "_DicomHeader":
        required = ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
        missing = tuple(k for k in required if ds.get(k) in (None, ""))
        bits_allocated = int(ds.get("BitsAllocated") or 0)
        return cls(
            # Float/Double Float Pixel Data are parametric maps, never radiographs.
            has_pixels="PixelData" in ds,
            modality=str(ds.get("Modality", "") or "").strip().upper(),
            body_part=str(ds.get("BodyPartExamined", "") or "").strip(),
            missing=missing,
            rows=int(ds.get("Rows") or 0),
            columns=int(ds.get("Columns") or 0),
            photometric=str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
            samples=int(ds.get("SamplesPerPixel") or 1),
            bits_allocated=bits_allocated,
            bits_stored=int(ds.get("BitsStored") or bits_allocated),
            signed=int(ds.get("PixelRepresentation") or 0) == 1,
        )


def _dicom_gray(frame: np.ndarray, ds, header: _DicomHeader) -> np.ndarray:
    """Monochrome frame -> [0, 1]: modality LUT / rescale, then VOI LUT / window or a fallback."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(frame, ds)
    lut = _voi_lut_sequence(ds)
    if lut is not None:
        index = np.clip(np.rint(np.asarray(values, dtype=np.float64)) - lut.first_map, 0, lut.table.size - 1)
        return lut.table[index.astype(np.intp)] / lut.maxval
    out_range = _window_output_range(ds, header.bits_stored, header.signed)
    if out_range is not None:
        try:
            windowed = apply_voi_lut(values, ds, index=0)
        except (ValueError, TypeError, IndexError, KeyError):
            windowed = None  # an unusable window is display metadata only: fall back below
        lo, hi = out_range
        if windowed is not None and hi != lo:
            return (np.asarray(windowed, dtype=np.float64) - lo) / (hi - lo)

    values = np.asarray(values, dtype=np.float64)
    has_rescale = bool(ds.get("ModalityLUTSequence")) or (
        "RescaleSlope" in ds
        and "RescaleIntercept" in ds
        and (float(ds.RescaleSlope) != 1.0 or float(ds.RescaleIntercept) != 0.0)
    )
    if header.bits_stored <= 8 and not has_rescale:
        # Already an 8-bit rendering: divide by the nominal range, like an 8-bit PNG.
        lo = -(2 ** (header.bits_stored - 1)) if header.signed else 0
        return (values - lo) / float(2**header.bits_stored - 1)
    # Deeper detector data rarely spans its nominal range; use the frame's own range.
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


@dataclass(frozen=True)
class _VoiLut:
    table: np.ndarray  # (entries,) float64 output values
    first_map: int  # stored value mapped to entry 0
    maxval: float  # 2**bits - 1, bits per entry from the LUT Descriptor


def _voi_lut_sequence(ds) -> _VoiLut | None:
    """First item of (0028,3010) VOI LUT Sequence, or None.

    Applied here rather than by pydicom's `apply_voi`, which (3.0.2) builds its index array
    in the LUT's entry dtype, so an 8-bit LUT with more than 256 entries wraps its indices.
    """
    seq = ds.get("VOILUTSequence")
    if not seq:
        return None
    item = seq[0]
    desc, data = item.get("LUTDescriptor"), item.get("LUTData")
    if desc is None or data is None:
        return None
    entries, first_map, bits = int(desc[0]) or 65536, int(desc[1]), int(desc[2])
    if isinstance(data, (bytes, bytearray)):  # OW: raw 16-bit words in the file's byte order
        from pydicom.uid import UID

        little = UID(str(ds.file_meta.TransferSyntaxUID)).is_little_endian
        table = np.frombuffer(bytes(data), dtype="<u2" if little else ">u2")
    else:
        table = np.atleast_1d(np.asarray(data))
    table = table[:entries].astype(np.float64)
    if table.size == 0 or not 1 <= bits <= 16:
        return None
    return _VoiLut(table=table, first_map=first_map, maxval=float(2**bits - 1))


def _window_output_range(ds, bits_stored: int, signed: bool) -> tuple[float, float] | None:
    """The value range pydicom's `apply_voi_lut` windows onto, or None without a window."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or _first(center) is None or _first(width) is None:
        return None
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif signed:
        y_min, y_max = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    else:
        y_min, y_max = 0.0, float(2**bits_stored - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    return y_min, y_max
