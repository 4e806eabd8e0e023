"""Refitting the precheck's model-free reference (`tasks/scoring/ood_reference.json`).

`python -m tasks.evaluation.reference NIH_IMAGE_DIR` fits one Gaussian on the image
statistics of the real radiographs in the folder and one on synthetic demo renderings, and
writes the reference the precheck reads. Rarely run: only when the statistics change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from cxr.core.atomic import atomic_write_text
from cxr.core.errors import DataError
from cxr.core.labels import PATHOLOGIES
from tasks.bundle.ood_gate import Gaussian
from tasks.images.loader import load_image
from tasks.metadata.synth import anatomy, render_image
from tasks.scoring.precheck import REFERENCE_FILE, STAT_NAMES, canonical_polarity, image_statistics

# Synthetic renderings of the reference: sizes around the demo's 128 px, and how many findings
# an image shows (0, 1, 2, 3, 4), roughly NIH's shares (54% no finding).
SYNTH_SIZES = (64, 128, 256)
FINDINGS_PER_IMAGE = (0.50, 0.27, 0.13, 0.07, 0.03)


def fit_reference(nih_dir: Path, *, folds: int = 5, quantile: float = 0.99, margin: float = 1.05,
                  synthetic: int = 450, seed: int = 0) -> dict:
    """Fit the model-free reference: one Gaussian on the statistics of the real radiographs in
    `nih_dir`, one on `synthetic` demo renderings (tasks/synth.py). The limit is `margin` x
    the larger of the two `quantile`s of out-of-fold distances (each image measured by a
    reference fitted without it), so the limit is not set on the images that made the fit."""
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
        pixels, _ = render_image(size, anatomy(size, rng), findings, rng)
        renders.append(image_statistics(canonical_polarity(pixels / 255.0)))
    synth = np.stack(renders)
    sets = {"real NIH radiographs": real, "synthetic demo radiographs": synth}
    full = {name: Gaussian.fit(x) for name, x in sets.items()}
    heldout = {}
    for name, x in sets.items():
        fold = rng.permutation(len(x)) % folds
        held = np.empty(len(x))
        for k in range(folds):
            others = {n: g for n, g in full.items() if n != name}
            own = Gaussian.fit(x[fold != k])
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


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.evaluation.reference NIH_IMAGE_DIR`: rebuild tasks/scoring/ood_reference.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tasks.evaluation.reference NIH_IMAGE_DIR", file=sys.stderr)
        return 2
    data = fit_reference(Path(argv[0]))
    # Compact: one line per component matrix row would still be ~1,000 lines of numbers.
    atomic_write_text(REFERENCE_FILE, json.dumps(data, separators=(",", ":")) + "\n")
    print(f"limit {data['limit']:.2f}; out-of-fold pass rates {data['heldout_pass_rate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
