"""Out of distribution, degree 1 (ARCHITECTURE.md, "Out of distribution has two degrees").

`precheck`: is this a chest radiograph at all? Model-free, so a colour photo, a page of
   text, noise, a blank frame, microscopy or an MR/CT slice is refused under every model,
   including the demo model that learned from synthetic images. It compares
   * facts the loader saw while decoding (`tasks.images.load_image(..., facts=...)`): colour
     saturation (a radiograph has none) and the DICOM body part;
   * a vector of image statistics (`image_statistics`: contrast, smoothness, histogram shape,
     flat-background fraction, edge orientation, a coarse layout) against a Gaussian reference
     with a Ledoit-Wolf shrinkage covariance fitted once on the 800 real NIH radiographs of the
     shared sample, their intensity-inverted copies (MONOCHROME1 files mislabelled the other
     way round are still radiographs) and the project's synthetic demo renderings. The
     reference is a few-KB JSON committed beside this module (`ood_reference.json`), rebuilt by
     `python -m tasks.evaluation.reference NIH_IMAGE_DIR`.
Degree 2, this model's gate, is `tasks.bundle.ood_gate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.core.errors import DataError
from tasks.bundle.ood_gate import OOD_PREFIX, Gaussian
from tasks.images.loader import RADIOGRAPH_MODALITIES

REFERENCE_FILE = Path(__file__).with_name("ood_reference.json")

#: Hasler & Suesstrunk (2003) colourfulness on 0..255 RGB: ~0 for gray, 15 "slightly
#: colourful", 33 "moderately". Gray radiographs stored as RGB score exactly 0; a tinted scan
#: of a film a few units. Above this the image is a colour picture.
COLOUR_LIMIT = 10.0
#: Standard deviation of intensities (0..1 scale, at the working size) below which an image
#: is a blank frame; the NIH sample's lowest is 0.11.
BLANK_LIMIT = 0.02
#: DICOM Body Part Examined values that are certainly not a chest. A missing or unknown
#: value is left to the image statistics (sites write free text, in many languages).
NON_CHEST_PARTS = frozenset({
    "HEAD", "BRAIN", "SKULL", "HEADNECK", "NECK", "CSPINE", "LSPINE", "SSPINE", "TSPINE", "PELVIS", "HIP", "KNEE",
    "LEG", "LOWLEG", "FOOT", "ANKLE", "HEEL", "TOE", "HAND", "WRIST", "FINGER", "ELBOW", "ARM", "FOREARM", "UPPERARM",
    "FEMUR", "TIBIA", "FIBULA", "HUMERUS", "SHOULDER", "CLAVICLE", "BREAST", "ABDOMEN", "SELLA", "SINUS", "JAW", "TMJ",
    "ORBIT", "EYE", "EAR", "FACE", "NOSE", "IAC", "ZYGOMA", "MANDIBLE", "SACRUM", "COCCYX", "KIDNEY", "LIVER",
})

WORK = 64  # working size of the statistics: the NIH sample the reference is fitted on is 64 px
LAYOUT = 4  # coarse layout grid (LAYOUT x LAYOUT cells)
STAT_NAMES = (
    "log contrast", "log high-frequency energy", "horizontal neighbour correlation", "vertical neighbour correlation",
    "dark-floor fraction", "dark-and-bright floor fraction", "log histogram peak", "left-right symmetry",
    "flat-block fraction", "log low local contrast", "log median local contrast", "log high local contrast",
    "horizontal/vertical edge dominance", "25th percentile", "median", "75th percentile",
) + tuple(f"layout cell {r},{c}" for r in range(LAYOUT) for c in range(LAYOUT))


# --------------------------------------------------------------------------- degree 1: model-free


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float -> (size, size) float64 by box averaging (every pixel counts once)."""
    if image.shape == (size, size):  # what Pillow gives at the same size: the float32 values
        return np.asarray(image, dtype=np.float32).astype(np.float64)
    return np.asarray(Image.fromarray(np.asarray(image, dtype=np.float32)).resize((size, size), Image.Resampling.BOX),
                      dtype=np.float64)


def image_statistics(image: np.ndarray) -> np.ndarray:
    """(H, W) float [0, 1] -> (len(STAT_NAMES),) float64 statistics at WORK x WORK px.

    Chosen to be what chest radiographs share and other pictures do not: a smooth intensity
    field (neighbour correlation near 1, little Laplacian energy; noise, text and textures
    have much), a broad unimodal histogram (text pages: one dominant paper mode), few flat
    blocks (a CT/MR slice sits in a uniform black frame), no dominance of horizontal and
    vertical edges (man-made scenes, text), and a coarse layout (bright mediastinum between
    two darker lung fields). Contrast-normalised, so a different window or exposure moves
    little. The layout cells are polarity-dependent; the reference holds both polarities.
    """
    w = _resize(image, WORK)
    std = float(w.std())
    z = (w - w.mean()) / max(std, 1e-6)
    lap = 4 * z[1:-1, 1:-1] - z[:-2, 1:-1] - z[2:, 1:-1] - z[1:-1, :-2] - z[1:-1, 2:]
    lo, hi = float(w.min()), float(w.max())
    span = max(hi - lo, 1e-6)
    dark = float((w <= lo + 0.02 * span).mean())
    bright = float((w >= hi - 0.02 * span).mean())
    hist, _ = np.histogram(w, bins=20, range=(lo, lo + span))
    t8 = _resize(w, 8)
    t8 = (t8 - t8.mean()) / max(float(t8.std()), 1e-6)
    block = WORK // 8
    local = z.reshape(8, block, 8, block).std(axis=(1, 3))  # (8, 8) contrast inside each block
    ranked = np.sort(local.ravel())
    gy, gx = np.gradient(z)
    gx2, gy2 = gx * gx, gy * gy
    mag = np.sqrt(gx2 + gy2)
    # |cos 2θ| is 1 for horizontal and vertical edges, 0 for diagonal ones; with θ the gradient's
    # angle, mag * |cos 2θ| = |gx² - gy²| / mag (no angle computed: a third of the time).
    hv_sum = float(np.divide(np.abs(gx2 - gy2), mag, out=np.zeros_like(mag), where=mag > 0).sum())
    hv = hv_sum / max(float(mag.sum()), 1e-9)
    q25, q50, q75 = (_quartiles(w) - lo) / span
    layout = _resize(w, LAYOUT)
    layout = (layout - layout.mean()) / max(float(layout.std()), 1e-6)
    return np.concatenate([[
        np.log(std + 1e-3), np.log(float((lap**2).mean()) + 1e-3),
        float((z[:, :-1] * z[:, 1:]).mean()), float((z[:-1] * z[1:]).mean()),
        np.sqrt(dark), np.sqrt(min(dark, bright)), np.log(hist.max() / hist.sum()), float((t8 * t8[:, ::-1]).mean()),
        np.sqrt(float((local < 0.05).mean())), np.log(ranked[6] + 0.05), np.log(ranked[32] + 0.05),
        np.log(ranked[57] + 0.05), hv, q25, q50, q75], layout.ravel()])


def _quartiles(values: np.ndarray) -> np.ndarray:
    """np.percentile(values, [25, 50, 75]) (its default linear method, its rounding), from one
    partial sort: the six order statistics the three interpolate between."""
    flat = values.ravel()
    pos = np.array([0.25, 0.5, 0.75]) * (flat.size - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, flat.size - 1)
    part = np.partition(flat, np.unique(np.concatenate([lo, hi])))
    a, b, t = part[lo], part[hi], pos - lo
    # numpy's lerp: from the lower value below t = 0.5, from the upper one from 0.5 on.
    return np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)


@dataclass(frozen=True)
class _Reference:
    """Gaussians of the statistics of real and of synthetic radiographs; the nearest counts."""

    components: dict[str, Gaussian]  # {"real NIH radiographs": ..., "synthetic demo radiographs": ...}
    limit: float
    counts: dict[str, int]

    def nearest(self, stats: np.ndarray) -> tuple[str, float]:
        """(name, distance) of the component nearest to one (D,) statistics vector."""
        return min(((name, float(g.distance(stats)[0])) for name, g in self.components.items()), key=lambda t: t[1])

    def outliers(self, name: str, stats: np.ndarray, n: int = 2) -> list[str]:
        """The n statistics furthest from a component's mean, in its standard deviations."""
        g = self.components[name]
        z = (stats - g.mean) / g.scale
        return [f"{STAT_NAMES[i]} {z[i]:+.1f} sd" for i in np.argsort(-np.abs(z))[:n]]


_REFERENCE: _Reference | None = None


def _reference() -> _Reference:
    global _REFERENCE
    if _REFERENCE is None:
        try:
            data = json.loads(REFERENCE_FILE.read_text())
            if data.get("stat_names") != list(STAT_NAMES):
                raise ValueError("it was fitted on other statistics than this code computes")
            _REFERENCE = _Reference({k: Gaussian.from_json(v) for k, v in data["components"].items()},
                                    float(data["limit"]), {k: int(v) for k, v in data["counts"].items()})
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"the radiograph reference statistics cannot be read ({exc}); rebuild them with "
                            "`python -m tasks.evaluation.reference NIH_IMAGE_DIR`", where=str(REFERENCE_FILE)) from None
    return _REFERENCE


def canonical_polarity(image: np.ndarray) -> np.ndarray:
    """The image with bone bright: inverted when the central column (mediastinum, spine) is
    darker than the two lateral bands where the lungs lie.

    A MONOCHROME1 file mislabelled, or a film scanned as a negative, is still a radiograph;
    statistics are compared in one polarity so that the reference need not hold both.
    """
    w = _resize(image, 16)
    centre = float(w[4:12, 6:10].mean())
    lungs = float(np.concatenate([w[4:12, 2:5].ravel(), w[4:12, 11:14].ravel()]).mean())
    return image if centre >= lungs else 1.0 - image


def precheck(image: np.ndarray, facts: dict) -> str | None:
    """Model-free: is this a chest radiograph at all?

    image: (H, W) float32 [0, 1] as the loader returns it; facts: what the loader saw
    (`colourfulness`, `modality`, `body_part`; missing keys are not checked). Returns a full
    reason starting with OOD_PREFIX that says what was compared, or None for a radiograph.
    """
    colour = facts.get("colourfulness")
    if colour is not None and colour > COLOUR_LIMIT:
        return (f"{OOD_PREFIX}a colour picture, not a radiograph (colourfulness {colour:.1f} on the 0-255 "
                f"Hasler-Suesstrunk scale; gray radiographs are 0, the limit is {COLOUR_LIMIT:g})")
    part = str(facts.get("body_part") or "").strip().upper().replace(" ", "")
    if part in NON_CHEST_PARTS:
        return f"{OOD_PREFIX}the DICOM Body Part Examined is {facts.get('body_part')!r}, not a chest"
    modality = facts.get("modality")
    if modality:
        if str(modality).strip().upper() not in RADIOGRAPH_MODALITIES:
            return f"{OOD_PREFIX}the DICOM modality is {modality}, not a projection radiograph"
    # One pass over the full-size image: every statistic below is taken at WORK px, and box
    # averaging commutes with the polarity flip, so the work image serves them all (a 1024-px
    # film was resized three times and inverted whole before).
    work = _resize(image, WORK)
    if float(work.std()) < BLANK_LIMIT:
        return (f"{OOD_PREFIX}a blank image (intensity standard deviation {float(work.std()):.3f} at "
                f"{WORK} px; radiographs are above {BLANK_LIMIT:g})")
    ref = _reference()
    stats = image_statistics(canonical_polarity(work))
    name, dist = ref.nearest(stats)
    if dist > ref.limit:
        return (f"{OOD_PREFIX}image statistics unlike a chest radiograph (Mahalanobis distance {dist:.1f} to the "
                f"nearest reference, the statistics of {ref.counts[name]} {name}; limit {ref.limit:.1f}; "
                f"furthest: {', '.join(ref.outliers(name, stats))})")
    return None
