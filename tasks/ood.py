"""Out of distribution, in two degrees (ARCHITECTURE.md, "Out of distribution has two degrees").

1. `precheck`: is this a chest radiograph at all? Model-free, so a colour photo, a page of
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
     `python -m tasks.ood NIH_IMAGE_DIR`.
2. `OODGate`: a chest radiograph unlike this model's training data. A Gaussian with a
   Ledoit-Wolf covariance on the global branch's pooled features of the train split, fitted
   when the model is registered (`fit_gate`); its threshold is the (1 - ood_false_rejection)
   quantile of the valid split's distances. Stored beside the weights (ood_gate.safetensors), bound to the
   model digest (safetensors, never pickle); `load_gate` refuses a gate fitted for other weights.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.atomic import atomic_path, atomic_write_text
from cxr.errors import DataError

__all__ = [
    "OOD_PREFIX",
    "GATE_FILE",
    "OODGate",
    "colourfulness",
    "fit_gate",
    "image_statistics",
    "load_gate",
    "precheck",
]

OOD_PREFIX = "out of distribution: "
GATE_FILE = "ood_gate.safetensors"
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

# Synthetic renderings of the reference: sizes around the demo's 128 px, and how many findings
# an image shows (0, 1, 2, 3, 4), roughly NIH's shares (54% no finding).
SYNTH_SIZES = (64, 128, 256)
FINDINGS_PER_IMAGE = (0.50, 0.27, 0.13, 0.07, 0.03)
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
    mag = np.hypot(gx, gy)
    # |cos 2θ| is 1 for horizontal and vertical edges, 0 for diagonal ones.
    hv = float((mag * np.abs(np.cos(2 * np.arctan2(gy, gx)))).sum() / max(float(mag.sum()), 1e-9))
    q25, q50, q75 = (np.percentile(w, [25, 50, 75]) - lo) / span
    layout = _resize(w, LAYOUT)
    layout = (layout - layout.mean()) / max(float(layout.std()), 1e-6)
    return np.concatenate([[
        np.log(std + 1e-3), np.log(float((lap**2).mean()) + 1e-3),
        float((z[:, :-1] * z[:, 1:]).mean()), float((z[:-1] * z[1:]).mean()),
        np.sqrt(dark), np.sqrt(min(dark, bright)), np.log(hist.max() / hist.sum()), float((t8 * t8[:, ::-1]).mean()),
        np.sqrt(float((local < 0.05).mean())), np.log(ranked[6] + 0.05), np.log(ranked[32] + 0.05),
        np.log(ranked[57] + 0.05), hv, q25, q50, q75], layout.ravel()])


@dataclass(frozen=True)
class _Gaussian:
    """Standardise, then Mahalanobis distance under a Ledoit-Wolf covariance."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,) standardisation before the covariance
    precision: np.ndarray  # (D, D) of the standardised features

    @classmethod
    def fit(cls, x: np.ndarray) -> "_Gaussian":
        from sklearn.covariance import LedoitWolf

        x = np.asarray(x, dtype=np.float64)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        lw = LedoitWolf().fit((x - mean) / scale)
        return cls(mean, scale, np.asarray(lw.precision_, dtype=np.float64))

    def distance(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) Mahalanobis distance (a D-dim standard Gaussian sits near sqrt(D))."""
        d = (np.atleast_2d(np.asarray(x, dtype=np.float64)) - self.mean) / self.scale
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, self.precision, d), 0.0))

    def to_json(self) -> dict:
        # 6 significant digits: far below the distances' resolution, and the file stays small.
        return {k: np.vectorize(lambda v: float(f"{v:.6g}"))(getattr(self, k)).tolist() for k in ("mean", "scale", "precision")}

    @classmethod
    def from_json(cls, data: dict) -> "_Gaussian":
        return cls(*(np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "precision")))


@dataclass(frozen=True)
class _Reference:
    """Gaussians of the statistics of real and of synthetic radiographs; the nearest counts."""

    components: dict[str, _Gaussian]  # {"real NIH radiographs": ..., "synthetic demo radiographs": ...}
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
            _REFERENCE = _Reference({k: _Gaussian.from_json(v) for k, v in data["components"].items()},
                                    float(data["limit"]), {k: int(v) for k, v in data["counts"].items()})
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"the radiograph reference statistics cannot be read ({exc}); rebuild them with "
                            "`python -m tasks.ood NIH_IMAGE_DIR`", where=str(REFERENCE_FILE)) from None
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
        from tasks.images import RADIOGRAPH_MODALITIES

        if str(modality).strip().upper() not in RADIOGRAPH_MODALITIES:
            return f"{OOD_PREFIX}the DICOM modality is {modality}, not a projection radiograph"
    work = _resize(image, WORK)
    if float(work.std()) < BLANK_LIMIT:
        return (f"{OOD_PREFIX}a blank image (intensity standard deviation {float(work.std()):.3f} at "
                f"{WORK} px; radiographs are above {BLANK_LIMIT:g})")
    ref = _reference()
    stats = image_statistics(canonical_polarity(image))
    name, dist = ref.nearest(stats)
    if dist > ref.limit:
        return (f"{OOD_PREFIX}image statistics unlike a chest radiograph (Mahalanobis distance {dist:.1f} to the "
                f"nearest reference, the statistics of {ref.counts[name]} {name}; limit {ref.limit:.1f}; "
                f"furthest: {', '.join(ref.outliers(name, stats))})")
    return None


def fit_reference(nih_dir: Path, *, folds: int = 5, quantile: float = 0.99, margin: float = 1.05,
                  synthetic: int = 450, seed: int = 0) -> dict:
    """Fit the model-free reference: one Gaussian on the statistics of the real radiographs in
    `nih_dir`, one on `synthetic` demo renderings (tasks/synth.py). The limit is `margin` x
    the larger of the two `quantile`s of out-of-fold distances (each image measured by a
    reference fitted without it), so the limit is not set on the images that made the fit."""
    from cxr.labels import PATHOLOGIES
    from tasks.images import load_image
    from tasks.synth import _anatomy, render_image

    paths = sorted(p for p in Path(nih_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
    if len(paths) < 50:
        raise DataError(f"need at least 50 radiographs to fit the reference, found {len(paths)}", where=str(nih_dir))
    rng = np.random.default_rng(seed)
    real = np.stack([image_statistics(canonical_polarity(load_image(p))) for p in paths])
    renders = []
    for i in range(synthetic):
        size = SYNTH_SIZES[i % len(SYNTH_SIZES)]
        count = int(rng.choice(len(FINDINGS_PER_IMAGE), p=FINDINGS_PER_IMAGE))
        findings = list(rng.choice(PATHOLOGIES, size=count, replace=False))
        pixels, _ = render_image(size, _anatomy(size, rng), findings, rng)
        renders.append(image_statistics(canonical_polarity(pixels / 255.0)))
    synth = np.stack(renders)
    sets = {"real NIH radiographs": real, "synthetic demo radiographs": synth}
    full = {name: _Gaussian.fit(x) for name, x in sets.items()}
    heldout = {}
    for name, x in sets.items():
        fold = rng.permutation(len(x)) % folds
        held = np.empty(len(x))
        for k in range(folds):
            others = {n: g for n, g in full.items() if n != name}
            own = _Gaussian.fit(x[fold != k])
            held[fold == k] = np.minimum(own.distance(x[fold == k]),
                                         *[g.distance(x[fold == k]) for g in others.values()])
        heldout[name] = held
    limit = float(max(np.quantile(h, quantile) for h in heldout.values()) * margin)
    return {"limit": limit, "quantile": quantile, "margin": margin, "folds": folds, "stat_names": list(STAT_NAMES),
            "counts": {name: len(x) for name, x in sets.items()},
            "heldout_pass_rate": {name: float((h <= limit).mean()) for name, h in heldout.items()},
            "heldout_distance_quantiles": {name: dict(zip(("p50", "p99", "max"), np.quantile(h, [0.5, 0.99, 1.0]).round(3).tolist()))
                                           for name, h in heldout.items()},
            "components": {name: g.to_json() for name, g in full.items()}}


# --------------------------------------------------------------------------- degree 2: this model's features


@dataclass
class OODGate:
    """Distance of the global branch's pooled features to the training split's Gaussian."""

    threshold: float
    method: str
    digest: str  # the model digest the gate is bound to
    gaussian: _Gaussian
    false_rejection: float  # target false-rejection rate on the valid split
    valid_false_rejection: float  # achieved on the valid split

    def score(self, pooled) -> np.ndarray:
        """pooled: (B, C) global-branch pooled features (torch.Tensor or array) -> (B,) float64,
        higher = further out."""
        if hasattr(pooled, "detach"):  # a torch tensor (this module itself needs no torch)
            pooled = pooled.detach().cpu().double().numpy()
        return self.gaussian.distance(np.asarray(pooled, dtype=np.float64))

    def reason(self, value: float) -> str:
        return (f"{OOD_PREFIX}unlike this model's training radiographs (Mahalanobis distance {value:.1f} of the "
                f"global branch's pooled features to the training split, threshold {self.threshold:.1f}, set for "
                f"{self.false_rejection:.0%} false rejections on the validation split)")


def fit_gate(train: np.ndarray, valid: np.ndarray, digest: str, false_rejection: float) -> OODGate:
    """train (N, C), valid (M, C) pooled features -> a gate whose threshold rejects about
    `false_rejection` of the valid split."""
    if len(train) < 2 or len(valid) < 1:
        raise DataError(f"too few images to fit the out-of-distribution gate (train {len(train)}, valid {len(valid)})")
    g = _Gaussian.fit(train)
    dist = g.distance(valid)
    threshold = float(np.quantile(dist, 1.0 - false_rejection, method="higher"))
    return OODGate(threshold, "ledoit-wolf mahalanobis on global pooled features", digest, g, float(false_rejection),
                   float((dist > threshold).mean()))


def save_gate(models_dir: Path, gate: OODGate) -> Path:
    """Write the gate beside the weights as safetensors (tensors + JSON metadata, no pickle)."""
    from safetensors.numpy import save_file

    path = Path(models_dir) / GATE_FILE
    tensors = {k: np.ascontiguousarray(getattr(gate.gaussian, k), dtype=np.float64) for k in ("mean", "scale", "precision")}
    meta = {"method": gate.method, "digest": gate.digest, "threshold": gate.threshold,
            "false_rejection": gate.false_rejection, "valid_false_rejection": gate.valid_false_rejection}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"cxr": json.dumps(meta, sort_keys=True)})
    return path


def load_gate(models_dir: Path, digest: str) -> OODGate | None:
    """The gate stored beside the weights; None when there is none (models registered before
    the gate existed); DataError when it belongs to other weights or cannot be read."""
    from safetensors import SafetensorError, safe_open

    path = Path(models_dir) / GATE_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="np") as handle:
            meta = json.loads((handle.metadata() or {})["cxr"])
            arrays = {k: handle.get_tensor(k) for k in ("mean", "scale", "precision")}
        gate = OODGate(float(meta["threshold"]), str(meta["method"]), str(meta["digest"]), _Gaussian(**arrays),
                       float(meta["false_rejection"]), float(meta["valid_false_rejection"]))
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"the out-of-distribution gate cannot be read ({exc}); register the model again",
                        where=str(path)) from None
    if gate.digest != digest:
        raise DataError(f"the out-of-distribution gate was fitted for model {gate.digest[:12]}, not for the weights "
                        f"on disk ({digest[:12]}); register the model again (`cxr train --stage fusion`)", where=str(path))
    return gate


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.ood NIH_IMAGE_DIR`: rebuild tasks/ood_reference.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tasks.ood NIH_IMAGE_DIR", file=sys.stderr)
        return 2
    data = fit_reference(Path(argv[0]))
    # Compact: one line per component matrix row would still be ~1,000 lines of numbers.
    atomic_write_text(REFERENCE_FILE, json.dumps(data, separators=(",", ":")) + "\n")
    print(f"limit {data['limit']:.2f}; out-of-fold pass rates {data['heldout_pass_rate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
