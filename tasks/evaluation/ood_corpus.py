"""The out-of-distribution corpus: inputs that are not chest radiographs at all (far) and a
radiograph shown the wrong way (near), for the tests and the evaluation's detector report.

Nothing binary is committed: every file is built here, offline, from scikit-image's bundled
sample images, pydicom's bundled MR and CT test files, numpy and Pillow.
`make_ood_corpus(out_dir, studies=None) -> {file name: "far" | "near"}` (also written to
OUT_DIR/manifest.json); `python tests/data/make_ood_corpus.py OUT_DIR` is its command line.
The near cases are made from the shared real NIH radiograph `00000001_000.png` and are
skipped when `studies` is None or lacks it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr.core.atomic import atomic_write_bytes

FAR, NEAR = "far", "near"
NEAR_SOURCE = "00000001_000.png"
#: Where the shared real studies sit beside a checkout (../shared/data/studies); may be absent.
SHARED_STUDIES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "studies"

# scikit-image's sample images that ship inside the wheel (no pooch download).
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
GRAY_PHOTOS = ("camera", "coins", "moon", "clock", "brick", "grass", "gravel", "cell", "page", "text", "horse")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max to 0..255 (a DICOM slice or float phantom as a viewer would export it)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    return np.rint((values - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return image


def _dicom_slices() -> dict[str, object]:
    """pydicom's bundled MR and CT test images (both in the wheel; nothing is downloaded)."""
    import pydicom
    from pydicom.data import get_testdata_file

    return {"mr": pydicom.dcmread(get_testdata_file("MR_small.dcm")), "ct": pydicom.dcmread(get_testdata_file("CT_small.dcm"))}


def _text_page(width: int = 620, height: int = 820) -> np.ndarray:
    """A rendered page of text: black lines of words on white paper."""
    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        font = ImageFont.load_default()
    rng = np.random.default_rng(7)
    words = ("chest", "radiograph", "report", "findings", "the", "of", "and", "no", "acute", "lung", "heart",
             "normal", "size", "pleural", "effusion", "impression", "patient", "history", "view", "study")
    y = 40
    while y < height - 50:
        line = " ".join(rng.choice(words, size=int(rng.integers(6, 11))))
        draw.text((40, y), line.capitalize() + ".", fill=0, font=font)
        y += 24
    return np.asarray(page)


def make_ood_corpus(out_dir: str | Path, studies: str | Path | None = None) -> dict[str, str]:
    """Write the corpus into `out_dir`; returns {file name: "far" | "near"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, str] = {}

    def put(name: str, data: bytes, kind: str) -> None:
        atomic_write_bytes(out / name, data)
        manifest[name] = kind

    for name in COLOUR_PHOTOS:
        put(f"photo_colour_{name}.png", _png(_skimage(name)), FAR)
    for name in GRAY_PHOTOS:
        put(f"photo_gray_{name}.png", _png(_skimage(name)), FAR)
    import skimage.data

    put("phantom_shepp_logan.png", _png(_to_uint8(skimage.data.shepp_logan_phantom())), FAR)

    slices = _dicom_slices()
    put("mr_slice.png", _png(_to_uint8(slices["mr"].pixel_array)), FAR)
    put("ct_slice.png", _png(_to_uint8(slices["ct"].pixel_array)), FAR)
    # An MR slice whose DICOM header claims it is a computed radiograph: the loader's modality
    # check lets it through, so only the image itself can give it away.
    mr = slices["mr"]
    mr.Modality = "CR"
    mr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    mr.file_meta.MediaStorageSOPClassUID = mr.SOPClassUID
    buf = io.BytesIO()
    mr.save_as(buf, enforce_file_format=True)
    put("mr_relabelled_cr.dcm", buf.getvalue(), FAR)

    rng = np.random.default_rng(0)
    put("noise_uniform.png", _png(rng.integers(0, 256, size=(512, 512), dtype=np.uint8)), FAR)
    put("noise_gaussian.png", _png(np.clip(rng.normal(128, 40, size=(384, 512)), 0, 255).astype(np.uint8)), FAR)
    put("noise_colour.png", _png(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)), FAR)
    put("text_page.png", _png(_text_page()), FAR)
    put("blank_black.png", _png(np.zeros((256, 256), np.uint8)), FAR)
    put("blank_gray.png", _png(np.full((300, 300), 128, np.uint8)), FAR)

    source = Path(studies) / NEAR_SOURCE if studies is not None else None
    if source is not None and source.exists():
        film = np.asarray(Image.open(source).convert("L"))
        put("near_rotated_90.png", _png(np.ascontiguousarray(np.rot90(film))), NEAR)
        put("near_upside_down.png", _png(np.ascontiguousarray(film[::-1])), NEAR)
        put("near_inverted.png", _png(255 - film), NEAR)

    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest
