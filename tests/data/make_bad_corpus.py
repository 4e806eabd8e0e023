"""Generate a corpus of bad and odd image files for the loader tests.

Nothing binary is committed: every file is built here from numpy, Pillow and pydicom.

    python tests/data/make_bad_corpus.py OUT_DIR     # writes the files + manifest.json

or, from Python, `make_bad_corpus(out_dir) -> {file name: "ok" | expected reason substring}`.

Valid images are all WIDTH x HEIGHT = 64 x 48 (non-square, so a transposed loader shows),
i.e. the loader must return shape (48, 64).
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

try:  # the project's atomic writer when the package is installed; plain writes otherwise
    from cxr.core.atomic import atomic_write_bytes
except ImportError:  # pragma: no cover
    def atomic_write_bytes(target, data: bytes) -> None:
        Path(target).write_bytes(data)

WIDTH, HEIGHT = 64, 48
OK = "ok"

CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage


# --------------------------------------------------------------------------- builders


def gradient(width: int = WIDTH, height: int = HEIGHT, maxval: int = 255, dtype=np.uint8) -> np.ndarray:
    """Deterministic (height, width) ramp from 0 to maxval (both ends present)."""
    x = np.linspace(0.0, 1.0, width)[None, :]
    y = np.linspace(0.0, 1.0, height)[:, None]
    return np.rint((0.7 * x + 0.3 * y) * maxval).astype(dtype)


def rgb_pattern(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def png_bytes(im: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **params)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def crafted_png(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A tiny, well-formed-looking PNG whose IHDR claims width x height.

    The CRCs are right, so only a size check on the header can refuse it; the IDAT holds a
    few compressed bytes, nowhere near width*height, so decoding would fail differently.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def dicom_bytes(
    arr: np.ndarray | None,
    *,
    modality: str | None = "CR",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rows: int | None = None,
    columns: int | None = None,
    pixel_bytes: bytes | None = None,
    **elements,
) -> bytes:
    """Build a Part 10 DICOM file (explicit VR little endian) with pydicom.

    `arr`: (H, W), (H, W, 3) or (frames, H, W) pixel array, or None for no PixelData.
    `pixel_bytes` with `rows`/`columns` overrides the pixel data (to make it inconsistent).
    Extra keyword arguments are set as DICOM elements (e.g. WindowCenter=..., RescaleSlope=...).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = CT_SOP_CLASS if modality == "CT" else CR_SOP_CLASS
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["cxr-test", str(elements), str(modality)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "TEST"
    if modality is not None:
        ds.Modality = modality

    if arr is not None:
        arr = np.asarray(arr)
        is_color = arr.ndim == 3 and arr.shape[-1] == 3
        pi = "RGB" if is_color else photometric
        bs = bits_stored or arr.dtype.itemsize * 8
        ds.set_pixel_data(arr, photometric_interpretation=pi, bits_stored=bs, generate_instance_uid=False)
    else:
        # A hand-made image header: with raw `pixel_bytes` (possibly too few) or none at all.
        ds.Rows, ds.Columns = (rows, columns) if pixel_bytes is not None else (rows or HEIGHT, columns or WIDTH)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored or 16
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if pixel_bytes is not None:
            ds.PixelData = pixel_bytes
            ds["PixelData"].VR = "OW"

    for key, value in elements.items():
        setattr(ds, key, value)

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- the corpus


def _build() -> dict[str, tuple[bytes, str]]:
    gray8 = Image.fromarray(gradient())
    good_png = png_bytes(gray8)
    rgb = Image.fromarray(rgb_pattern())
    good_jpeg = jpeg_bytes(rgb)
    rgba = np.dstack([rgb_pattern(), np.full((HEIGHT, WIDTH), 7, np.uint8)])
    palette = rgb.quantize(colors=16)
    gray16 = Image.fromarray(gradient(maxval=65535, dtype=np.uint16))  # mode I;16
    garbage = np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes()

    return {
        # --- valid ---
        "gray8.png": (good_png, OK),
        "gray16.png": (png_bytes(gray16), OK),
        "rgba.png": (png_bytes(Image.fromarray(rgba, mode="RGBA")), OK),
        "palette.png": (png_bytes(palette), OK),
        "photo.jpg": (good_jpeg, OK),
        "png_named.jpg": (good_png, OK),  # sniffed by magic bytes, not the extension
        "jpeg_named.png": (good_jpeg, OK),
        "cr_mono2_16bit.dcm": (dicom_bytes(gradient(maxval=4095, dtype=np.uint16), bits_stored=12), OK),
        # --- bad ---
        "empty.png": (b"", "empty file"),
        "text.png": (b"hello, this is not a PNG at all\n", "not an image"),
        "truncated.png": (good_png[: len(good_png) // 2], "truncated or corrupt image"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated or corrupt image"),
        "tiny_1x1.png": (png_bytes(Image.new("L", (1, 1), 128)), "smaller than the minimum side of 32 px"),
        "bomb_40000x40000.png": (crafted_png(40000, 40000), "40000\u00d740000 = 1600000000 pixels, over the limit of"),
        # between our limit (60 M) and Pillow's own warning threshold (~89 M): our check alone
        "bomb_9000x7000.png": (crafted_png(9000, 7000), "9000\u00d77000 = 63000000 pixels, over the limit of"),
        "no_pixels.dcm": (dicom_bytes(None), "DICOM has no pixel data"),
        "ct.dcm": (dicom_bytes(gradient(maxval=4095, dtype=np.uint16), modality="CT", bits_stored=12), "modality CT is not a radiograph"),
        "garbage.dcm": (b"\x00" * 128 + b"DICM" + garbage, "corrupt DICOM"),
        "bomb_40000x40000.dcm": (
            dicom_bytes(None, rows=40000, columns=40000, pixel_bytes=b"\x00\x00" * 64),
            "40000\u00d740000 = 1600000000 pixels, over the limit of",
        ),
        "short_pixel_data.dcm": (
            dicom_bytes(None, rows=HEIGHT, columns=WIDTH, pixel_bytes=b"\x00\x01" * 100),
            "corrupt DICOM pixel data",
        ),
    }


def make_bad_corpus(out_dir: str | Path) -> dict[str, str]:
    """Write the corpus into `out_dir`; return {file name: "ok" | expected reason substring}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, str] = {}
    for name, (data, expected) in _build().items():
        atomic_write_bytes(out / name, data)
        manifest[name] = expected
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return manifest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tests/data/make_bad_corpus.py OUT_DIR", file=sys.stderr)
        return 2
    manifest = make_bad_corpus(argv[0])
    print(json.dumps(manifest, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
