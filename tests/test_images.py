"""The one image loader: PNG/JPEG/DICOM in, grayscale float32 [0, 1] out, DataError for bad data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.core.errors import DataError
from tasks.images.loader import LoaderLimits, load_image, load_image_uint8, sniff_kind
from cxr.core.digest import file_sha256

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
NIH_PNG = SHARED / "studies" / "00000001_000.png"
MONO1_DCM = SHARED / "studies" / "Fake_MONOHR1.dcm"
NIH_SAMPLE = SHARED / "nih-sample-64" / "images"

_spec = importlib.util.spec_from_file_location("make_bad_corpus", REPO / "tests" / "data" / "make_bad_corpus.py")
corpus_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus_mod)

LUMA = np.array([0.299, 0.587, 0.114])
SHAPE = (corpus_mod.HEIGHT, corpus_mod.WIDTH)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("corpus")
    return out, corpus_mod.make_bad_corpus(out)


def _manifest_names() -> list[str]:
    return list(corpus_mod._build())


def _strips(img: np.ndarray) -> tuple[float, float, float]:
    """Means of the central vertical strip and the left/right lung fields (middle half of rows)."""
    h, w = img.shape
    rows = slice(h // 4, 3 * h // 4)
    centre = img[rows, w // 2 - w // 16 : w // 2 + w // 16].mean()
    left = img[rows, w // 5 : w // 3].mean()
    right = img[rows, 2 * w // 3 : 4 * w // 5].mean()
    return float(centre), float(left), float(right)


def _write_dicom(path: Path, arr, **kw) -> Path:
    path.write_bytes(corpus_mod.dicom_bytes(arr, **kw))
    return path


# --------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("name", _manifest_names())
def test_corpus_entry(corpus, name):
    out, manifest = corpus
    path = out / name
    expected = manifest[name]
    if expected == "ok":
        img = load_image(path)
        assert img.shape == SHAPE
        assert img.dtype == np.float32
        assert 0.0 <= img.min() <= img.max() <= 1.0
        assert img.flags.c_contiguous
    else:
        with pytest.raises(DataError) as info:
            load_image(path)
        assert expected in str(info.value)
        assert info.value.where == str(path)
        assert str(info.value).startswith(f"{path}: ")


def test_corpus_manifest_file_and_cli(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "data" / "make_bad_corpus.py"), str(out)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads(proc.stdout) == manifest
    assert set(manifest) == set(_manifest_names())
    assert all((out / name).is_file() for name in manifest)
    assert {"ok"} < set(manifest.values())  # both valid and rejected entries


def test_corpus_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    corpus_mod.make_bad_corpus(a)
    corpus_mod.make_bad_corpus(b)
    for name in _manifest_names():
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# --------------------------------------------------------------------------- real inputs


def test_real_nih_png():
    img = load_image(NIH_PNG)
    assert img.shape == (512, 512) and img.dtype == np.float32
    with Image.open(NIH_PNG) as im:
        assert im.mode == "L"
        np.testing.assert_allclose(img, np.asarray(im) / 255.0, atol=1e-7)
    centre, left, right = _strips(img)
    assert centre > left and centre > right  # mediastinum brighter than the lungs


def test_real_dicom_monochrome1_is_inverted():
    import pydicom

    img = load_image(MONO1_DCM)
    assert img.shape == (1024, 1024) and img.dtype == np.float32
    ds = pydicom.dcmread(MONO1_DCM)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 8
    raw = ds.pixel_array.astype(np.float64)  # JPEG baseline, decoded through Pillow
    np.testing.assert_allclose(img, 1.0 - raw / 255.0, atol=1e-6)

    # This file is synthetic (torchxrayvision test data): a MONOCHROME2 SIIM-ACR film whose
    # Photometric Interpretation tag was relabelled MONOCHROME1 (same SOP Instance UID
    # 1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819). Its stored pixels already
    # look like a normal film, so honouring the tag - as the standard requires - yields a
    # negative. Pin both facts so that a change in either shows up here.
    raw_centre, raw_left, raw_right = _strips(raw)
    assert raw_centre > raw_left and raw_centre > raw_right
    centre, left, right = _strips(img)
    assert centre < left and centre < right


def _chest_phantom(h: int = 128, w: int = 128) -> np.ndarray:
    """Attenuation map in [0, 1]: dense body and spine, air-filled lungs, air outside."""
    yy, xx = np.mgrid[0:h, 0:w]
    att = np.zeros((h, w))
    body = ((xx - w / 2) / (0.45 * w)) ** 2 + ((yy - h / 2) / (0.48 * h)) ** 2 < 1
    att[body] = 0.6
    for cx in (0.3 * w, 0.7 * w):  # the two lungs
        lung = ((xx - cx) / (0.14 * w)) ** 2 + ((yy - h / 2) / (0.3 * h)) ** 2 < 1
        att[lung] = 0.15
    att[:, int(0.45 * w) : int(0.55 * w)] = 0.95  # mediastinum and spine
    return att


def test_genuine_monochrome1_reads_like_a_film(tmp_path):
    att = _chest_phantom()
    # MONOCHROME1: the minimum value is displayed white, so dense tissue has LOW values.
    mono1 = np.rint((1.0 - att) * 4095).astype(np.uint16)
    mono2 = np.rint(att * 4095).astype(np.uint16)
    p1 = _write_dicom(tmp_path / "m1.dcm", mono1, photometric="MONOCHROME1", bits_stored=12)
    p2 = _write_dicom(tmp_path / "m2.dcm", mono2, photometric="MONOCHROME2", bits_stored=12)
    img1, img2 = load_image(p1), load_image(p2)
    centre, left, right = _strips(img1)
    assert centre > left and centre > right  # bone bright, lungs dark
    np.testing.assert_allclose(img1, img2, atol=1e-6)


def test_nih_sample_pngs_all_load():
    paths = sorted(NIH_SAMPLE.glob("*.png"))
    assert len(paths) == 800
    for path in paths:
        img = load_image(path)
        assert img.shape == (64, 64) and img.dtype == np.float32
    with Image.open(paths[0]) as im:
        assert im.mode == "RGB"
        rgb = np.asarray(im, dtype=np.float64)
    np.testing.assert_allclose(load_image(paths[0]), rgb @ LUMA / 255.0, atol=1e-6)


# --------------------------------------------------------------------------- PNG / JPEG modes


def test_16bit_png_scaled_by_65535(corpus):
    out, _ = corpus
    expected = corpus_mod.gradient(maxval=65535, dtype=np.uint16) / 65535.0
    with Image.open(out / "gray16.png") as im:
        assert im.mode.startswith("I;16")
    img = load_image(out / "gray16.png")
    np.testing.assert_allclose(img, expected, atol=1e-7)
    assert img.min() == 0.0 and img.max() == 1.0


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_modes_in_memory(mode):
    from tasks.images.loader import _pil_to_gray

    values = np.array([[0, 1000, 32768, 65535]] * 2, dtype=np.uint16)
    if mode == "I":
        im = Image.fromarray(values.astype(np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        im = Image.frombytes(mode, (4, 2), values.astype(dtype).tobytes())
    assert im.mode == mode
    np.testing.assert_allclose(_pil_to_gray(im, Path("x.png")), values / 65535.0, atol=1e-12)


def test_rgb_png_equals_luma(tmp_path):
    rgb = corpus_mod.rgb_pattern()
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    np.testing.assert_allclose(load_image(path), rgb.astype(np.float64) @ LUMA / 255.0, atol=1e-6)


def test_rgba_ignores_alpha_and_palette_uses_its_colours(corpus):
    out, _ = corpus
    luma = corpus_mod.rgb_pattern().astype(np.float64) @ LUMA / 255.0
    np.testing.assert_allclose(load_image(out / "rgba.png"), luma, atol=1e-6)
    with Image.open(out / "palette.png") as im:
        assert im.mode == "P"
        pal_rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    np.testing.assert_allclose(load_image(out / "palette.png"), pal_rgb @ LUMA / 255.0, atol=1e-6)


def test_grey_alpha_png(tmp_path):
    g = corpus_mod.gradient()
    la = np.dstack([g, np.full_like(g, 3)])
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    np.testing.assert_allclose(load_image(path), g / 255.0, atol=1e-7)


# --------------------------------------------------------------------------- sniffing


def test_sniff_by_magic_bytes_not_extension(corpus):
    out, _ = corpus
    assert sniff_kind(out / "png_named.jpg") == "png"
    assert sniff_kind(out / "jpeg_named.png") == "jpeg"
    assert sniff_kind(out / "cr_mono2_16bit.dcm") == "dicom"
    assert sniff_kind(MONO1_DCM) == "dicom"
    np.testing.assert_array_equal(load_image(out / "png_named.jpg"), load_image(out / "gray8.png"))
    np.testing.assert_array_equal(load_image(out / "jpeg_named.png"), load_image(out / "photo.jpg"))
    for name, reason in (("text.png", "not an image"), ("empty.png", "empty file")):
        with pytest.raises(DataError, match=reason) as info:
            sniff_kind(out / name)
        assert info.value.where == str(out / name)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    for fn in (load_image, sniff_kind, file_sha256):
        with pytest.raises(DataError, match="file not found") as info:
            fn(missing)
        assert info.value.where == str(missing)


# --------------------------------------------------------------------------- limits


def test_limits_are_configurable(corpus):
    out, _ = corpus
    with pytest.raises(DataError, match="64\u00d748 = 3072 pixels, over the limit of 1000"):
        load_image(out / "gray8.png", LoaderLimits(max_pixels=1000))
    with pytest.raises(DataError, match="smaller than the minimum side of 50 px"):
        load_image(out / "cr_mono2_16bit.dcm", LoaderLimits(min_side=50))
    assert load_image(out / "gray8.png", LoaderLimits(min_side=48)).shape == SHAPE


def test_pillow_bomb_warning_becomes_our_error_without_noise(tmp_path):
    # 100 M pixels: above Pillow's warning threshold (~89 M), below its error (~179 M).
    path = tmp_path / "bomb.png"
    path.write_bytes(corpus_mod.crafted_png(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="10000\u00d710000 = 100000000 pixels, over the limit"):
            load_image(path)


# --------------------------------------------------------------------------- DICOM details


def test_dicom_16bit_no_window_is_min_max(corpus):
    out, _ = corpus
    stored = corpus_mod.gradient(maxval=4095, dtype=np.uint16).astype(np.float64)
    np.testing.assert_allclose(load_image(out / "cr_mono2_16bit.dcm"), stored / 4095.0, atol=1e-6)


def test_dicom_window_maps_values_onto_the_window(tmp_path):
    stored = corpus_mod.gradient(maxval=4095, dtype=np.uint16)
    path = _write_dicom(tmp_path / "w.dcm", stored, bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    img = load_image(path)
    s = stored.astype(np.float64)
    assert np.all(img[s <= 2048 - 512 - 1] == 0.0)
    assert np.all(img[s >= 2048 + 512] == 1.0)
    inside = (s > 1600) & (s < 2500)
    expected = ((s - 2047.5) / 1023.0 + 0.5)[inside]  # DICOM LINEAR window
    np.testing.assert_allclose(img[inside], expected, atol=1e-6)


def test_dicom_rescale_then_window(tmp_path):
    stored = corpus_mod.gradient(maxval=4095, dtype=np.uint16)
    path = _write_dicom(
        tmp_path / "rw.dcm", stored, bits_stored=12,
        RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3096, WindowWidth=2048,
    )
    img = load_image(path)
    hu = stored.astype(np.float64) * 2 - 1000
    inside = (hu > 2200) & (hu < 4000)
    np.testing.assert_allclose(img[inside], ((hu - 3095.5) / 2047.0 + 0.5)[inside], atol=1e-6)
    assert img.min() == 0.0 and img.max() == 1.0


def test_dicom_multiframe_uses_first_frame(tmp_path):
    frames = np.stack([corpus_mod.gradient(), 255 - corpus_mod.gradient(), np.zeros(SHAPE, np.uint8)])
    path = _write_dicom(tmp_path / "mf.dcm", frames, modality="DX")
    np.testing.assert_allclose(load_image(path), corpus_mod.gradient() / 255.0, atol=1e-7)


def test_dicom_colour_and_missing_modality(tmp_path):
    rgb = corpus_mod.rgb_pattern()
    path = _write_dicom(tmp_path / "rgb.dcm", rgb, modality=None)
    np.testing.assert_allclose(load_image(path), rgb.astype(np.float64) @ LUMA / 255.0, atol=1e-6)


# --------------------------------------------------------------------------- uint8 and digest


def test_load_image_uint8(corpus):
    out, _ = corpus
    full = load_image_uint8(out / "gray8.png")
    assert full.dtype == np.uint8 and full.shape == SHAPE
    np.testing.assert_array_equal(full, corpus_mod.gradient())
    small = load_image_uint8(out / "gray8.png", size=32)
    assert small.dtype == np.uint8 and small.shape == (32, 32)
    big = load_image_uint8(MONO1_DCM, size=224)
    assert big.shape == (224, 224) and big.dtype == np.uint8
    assert load_image_uint8(NIH_PNG, size=512).shape == (512, 512)
    with pytest.raises(DataError, match="empty file"):
        load_image_uint8(out / "empty.png", size=32)


def test_file_sha256(corpus):
    out, _ = corpus
    path = out / "photo.jpg"
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(NIH_PNG) == hashlib.sha256(NIH_PNG.read_bytes()).hexdigest()


def test_dicom_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = corpus_mod.gradient(maxval=4095, dtype=np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 8])  # LUT Descriptor: 4096 entries of 8 bits
    item.add_new(0x00283006, "US", [min(255, i // 8) for i in range(4096)])  # LUT Data
    path = _write_dicom(tmp_path / "lut.dcm", stored, bits_stored=12, VOILUTSequence=Sequence([item]))
    np.testing.assert_allclose(load_image(path), np.minimum(255, stored // 8) / 255.0, atol=1e-7)


def test_dicom_unusable_window_falls_back_to_min_max(tmp_path):
    stored = corpus_mod.gradient(maxval=4095, dtype=np.uint16)
    path = _write_dicom(tmp_path / "w0.dcm", stored, bits_stored=12, WindowCenter=100, WindowWidth=0)
    np.testing.assert_allclose(load_image(path), stored / 4095.0, atol=1e-6)


def test_dicom_without_preamble_is_not_an_image(tmp_path):
    data = corpus_mod.dicom_bytes(corpus_mod.gradient())
    path = tmp_path / "raw.dcm"
    path.write_bytes(data[132:])  # the dataset without the 128-byte preamble and "DICM"
    with pytest.raises(DataError, match="not an image"):
        load_image(path)
