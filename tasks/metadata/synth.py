"""Synthetic chest-like radiographs for real NIH metadata rows (the offline demo data).

No image download is possible offline, so the default run draws, for a patient-level sample
of the real metadata, grayscale PNGs under NIH's file names. Anatomy (thorax, lungs,
mediastinum, ribs) is shared by a patient's images; each positive finding is a
class-specific texture at a class-specific place, and its box is recorded, so a model can
learn the labels and its attention boxes can be scored against the truth.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr.core.atomic import atomic_path, atomic_write_text
from cxr.core.errors import DataError
from cxr.core.labels import LABEL_COLUMNS, PATHOLOGIES
from tasks.metadata.ingest import normalize, HEADER_MAP

# Where each finding sits, as (center y, center x, height, width) in fractions of the image,
# and the grating that marks it (period in pixels at 128 px, orientation in degrees).
# Places follow anatomy loosely (Cardiomegaly at the heart, Effusion at the costophrenic
# angle); textures are distinct so that a small CNN can tell the classes apart.
FINDING_STYLE = {
    "Atelectasis": ((0.62, 0.30, 0.14, 0.22), 6.0, 0.0),
    "Cardiomegaly": ((0.62, 0.52, 0.30, 0.36), 10.0, 90.0),
    "Effusion": ((0.78, 0.72, 0.14, 0.26), 5.0, 45.0),
    "Infiltration": ((0.45, 0.70, 0.22, 0.20), 4.0, 135.0),
    "Mass": ((0.40, 0.32, 0.18, 0.18), 8.0, 30.0),
    "Nodule": ((0.35, 0.68, 0.09, 0.09), 3.0, 60.0),
    "Pneumonia": ((0.55, 0.28, 0.22, 0.20), 7.0, 120.0),
    "Pneumothorax": ((0.25, 0.72, 0.18, 0.20), 12.0, 0.0),
    "Consolidation": ((0.66, 0.70, 0.18, 0.18), 4.5, 90.0),
    "Edema": ((0.50, 0.50, 0.24, 0.50), 9.0, 15.0),
    "Emphysema": ((0.30, 0.30, 0.20, 0.22), 3.5, 165.0),
    "Fibrosis": ((0.28, 0.50, 0.14, 0.40), 5.5, 75.0),
    "Pleural_Thickening": ((0.45, 0.86, 0.34, 0.08), 6.5, 105.0),
    "Hernia": ((0.86, 0.50, 0.10, 0.18), 8.5, 150.0),
}

BOX_COLUMNS = ["image_id", "label", "x", "y", "w", "h"]


def sample_patients(meta_raw: pd.DataFrame, patients: int, max_images: int, min_per_class: int, seed: int) -> pd.DataFrame:
    """A patient-level sample of NIH rows: every class gets `min_per_class` patients first."""
    norm = normalize(meta_raw.rename(columns={c: HEADER_MAP.get(c, c) for c in meta_raw.columns}))
    rng = np.random.default_rng(seed)
    per_patient = norm.groupby("patient_id")[list(LABEL_COLUMNS)].max()
    chosen: list[int] = []
    # Rarest classes first, so Hernia (0.2% of images) is in the demo at all.
    for column in per_patient.sum().sort_values().index:
        have = per_patient.loc[chosen, column].sum() if chosen else 0
        candidates = per_patient.index[(per_patient[column] > 0) & ~per_patient.index.isin(chosen)].to_numpy()
        need = max(0, min(min_per_class - int(have), len(candidates)))
        chosen.extend(rng.choice(candidates, size=need, replace=False).tolist())
    rest = per_patient.index[~per_patient.index.isin(chosen)].to_numpy()
    fill = max(0, patients - len(chosen))
    chosen.extend(rng.choice(rest, size=min(fill, len(rest)), replace=False).tolist())
    rows = meta_raw[norm["patient_id"].isin(chosen).to_numpy()].copy()
    rows["_pid"] = norm.loc[rows.index, "patient_id"]
    # Keep each patient's first follow-ups only: the demo must stay small on a CPU.
    rows = rows.groupby("_pid", sort=False).head(max_images)
    return rows.drop(columns="_pid").sort_values("Image Index").reset_index(drop=True)


def _seed_of(seed: int, key: str) -> int:
    return zlib.crc32(f"{seed}:{key}".encode())


def anatomy(size: int, rng: np.random.Generator) -> np.ndarray:
    """A chest-like background in [0, 1]: body, two dark lungs, mediastinum, spine, ribs."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((x - 0.5) / 0.46) ** 8 + ((y - 0.55) / 0.52) ** 8))
    cx = 0.5 + rng.normal(0, 0.015)
    lung_w, lung_h = 0.17 + rng.normal(0, 0.01), 0.30 + rng.normal(0, 0.015)
    lungs = sum(
        np.exp(-(((x - (cx + side * 0.2)) / lung_w) ** 2 + ((y - 0.48) / lung_h) ** 2) ** 2)
        for side in (-1, 1)
    )
    spine = np.exp(-(((x - cx) / 0.05) ** 2))
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (y * 9 + rng.uniform(0, 1)) + 3 * np.abs(x - cx))
    image = 0.25 + 0.45 * body - 0.35 * lungs + 0.15 * spine + 0.06 * ribs * lungs
    return image


def render_image(size: int, anatomy: np.ndarray, findings: list[str], rng: np.random.Generator) -> tuple[np.ndarray, list[tuple]]:
    """One uint8 radiograph and its finding boxes `(label, x, y, w, h)` in pixels."""
    shift = rng.integers(-2, 3, size=2)
    image = np.roll(anatomy, tuple(shift), axis=(0, 1)) * rng.uniform(0.92, 1.08)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    boxes = []
    for label in findings:
        (cy, cx, h, w), period, angle = FINDING_STYLE[label]
        cy, cx = cy + rng.normal(0, 0.03), cx + rng.normal(0, 0.03)
        h, w = h * rng.uniform(0.85, 1.15), w * rng.uniform(0.85, 1.15)
        y0, x0 = int(round((cy - h / 2) * size)), int(round((cx - w / 2) * size))
        y1, x1 = int(round((cy + h / 2) * size)), int(round((cx + w / 2) * size))
        y0, x0, y1, x1 = max(0, y0), max(0, x0), min(size - 1, y1), min(size - 1, x1)
        theta = np.deg2rad(angle)
        scale = size / 128.0
        grating = np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / (period * scale) + rng.uniform(0, 6.3))
        # A soft-edged window: the pattern fades out at the box border like a lesion.
        wy = np.clip(np.minimum(y - y0, y1 - y) / max(1.0, (y1 - y0) * 0.2), 0, 1)
        wx = np.clip(np.minimum(x - x0, x1 - x) / max(1.0, (x1 - x0) * 0.2), 0, 1)
        window = wy * wx
        image = image + window * (0.18 + 0.22 * grating)
        boxes.append((label, x0, y0, x1 - x0 + 1, y1 - y0 + 1))
    image = image + rng.normal(0, 0.02, size=image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), boxes


def synthesize(
    metadata_csv: Path,
    out_dir: Path,
    *,
    patients: int,
    image_size: int,
    max_images_per_patient: int,
    min_patients_per_class: int,
    seed: int,
) -> dict:
    """Write `out_dir/Data_Entry_synth.csv`, `out_dir/images/*.png` and `out_dir/boxes.csv`."""
    try:
        meta_raw = pd.read_csv(metadata_csv, dtype=str, keep_default_na=False, index_col=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read the NIH metadata to sample from ({exc})", where=str(metadata_csv)) from None
    rows = sample_patients(meta_raw, patients, max_images_per_patient, min_patients_per_class, seed)
    norm = normalize(rows.rename(columns={c: HEADER_MAP.get(c, c) for c in rows.columns}))
    images_dir = Path(out_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    anatomies: dict[int, np.ndarray] = {}
    box_rows = []
    for row in norm.itertuples(index=False):
        pid = int(row.patient_id)
        if pid not in anatomies:
            anatomies[pid] = anatomy(image_size, np.random.default_rng(_seed_of(seed, f"patient{pid}")))
        findings = [p for p, c in zip(PATHOLOGIES, LABEL_COLUMNS) if getattr(row, c)]
        pixels, boxes = render_image(image_size, anatomies[pid], findings, np.random.default_rng(_seed_of(seed, row.image_id)))
        with atomic_path(images_dir / row.image_id) as tmp:
            Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
        box_rows.extend((row.image_id, *box) for box in boxes)
    with atomic_path(Path(out_dir) / "Data_Entry_synth.csv") as tmp:
        rows.to_csv(tmp, index=False)
    boxes = pd.DataFrame(box_rows, columns=BOX_COLUMNS)
    atomic_write_text(Path(out_dir) / "boxes.csv", boxes.to_csv(index=False))
    return {"images": len(norm), "patients": int(norm["patient_id"].nunique()), "boxes": len(boxes)}
