"""Patient-level train/valid/test split and the class weights of the weighted loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr.core.atomic import atomic_write_json, atomic_path
from cxr.core.errors import DataError
from cxr.core.labels import LABEL_COLUMNS, PATHOLOGIES

SPLITS = ("train", "valid", "test")
SPLIT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)


def patient_split(meta: pd.DataFrame, ratios: dict[str, float], seed: int) -> pd.DataFrame:
    """Assign every patient (so all their images) to one split, stratified by rare labels.

    Iterative stratification (Sechidis et al., 2011) at the patient level: each split wants
    its ratio of every label's positive images and of all images. Patients are visited by
    their rarest label first (seeded random order within), and each goes to the split that
    still wants the most of that label, ties broken by the images it still wants. Rare
    classes (Hernia: 227 images of ~110 patients) therefore land in every split in
    proportion instead of by luck.
    """
    grouped = meta.groupby("patient_id", sort=True)
    counts = grouped[list(LABEL_COLUMNS)].sum().to_numpy(dtype=float)
    sizes = grouped.size()
    n_images = sizes.to_numpy(dtype=float)
    frequency = counts.sum(axis=0)
    label_of_rank = np.argsort(frequency, kind="stable")
    rank = np.argsort(label_of_rank, kind="stable")
    stratum = np.where(counts > 0, rank[None, :], len(LABEL_COLUMNS)).min(axis=1)

    order = np.lexsort((np.random.default_rng(seed).random(len(sizes)), stratum))
    share = np.asarray([ratios[s] for s in SPLITS], dtype=float)
    wanted_labels = share[:, None] * frequency[None, :]
    wanted_images = share * n_images.sum()
    choice = np.empty(len(sizes), dtype=np.int64)
    # A plain loop over patients: 30,805 on the full file take well under a second.
    for p in order:
        k = stratum[p]
        primary = wanted_labels[:, label_of_rank[k]] if k < len(LABEL_COLUMNS) else wanted_images
        best = int(np.lexsort((-wanted_images, -primary))[0])
        choice[p] = best
        wanted_labels[best] -= counts[p]
        wanted_images[best] -= n_images[p]
    assignment = pd.Series(np.asarray(SPLITS)[choice], index=sizes.index)
    return pd.DataFrame(
        {"image_id": meta["image_id"], "patient_id": meta["patient_id"], "split": meta["patient_id"].map(assignment).to_numpy()}
    )


def read_assignments(path: str | Path, meta: pd.DataFrame) -> pd.DataFrame:
    """An external image-level split (CSV with `Image Index`, `split`) joined to the metadata."""
    path = Path(path)
    if not path.exists():
        raise DataError("assignments file not found", where=str(path))
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot be parsed as CSV ({exc})", where=str(path)) from None
    missing = [c for c in ("Image Index", "split") if c not in raw.columns]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; expected `Image Index, split`", where=str(path))
    frame = raw.rename(columns={"Image Index": "image_id"})[["image_id", "split"]]
    frame["split"] = frame["split"].str.strip().str.lower()
    patients = meta.set_index("image_id")["patient_id"]
    unknown = ~frame["image_id"].isin(patients.index)
    if unknown.any():
        shown = ", ".join(frame.loc[unknown, "image_id"].head(5))
        raise DataError(f"{int(unknown.sum())} image id(s) not in the metadata: {shown}", where=str(path))
    frame["patient_id"] = frame["image_id"].map(patients).astype(np.int32)
    return frame[["image_id", "patient_id", "split"]]


def class_weights(meta: pd.DataFrame, splits: pd.DataFrame) -> dict:
    """Per-class weights from the train split: pos_weight = neg_freq, neg_weight = pos_freq.

    With these, each class's positive and negative terms contribute equally to the loss:
    pos_freq * pos_weight == neg_freq * neg_weight.
    """
    train_ids = splits.loc[splits["split"] == "train", "image_id"]
    train = meta[meta["image_id"].isin(train_ids)]
    if train.empty:
        raise DataError("the train split is empty; class weights cannot be computed", where="splits")
    pos_freq = train[list(LABEL_COLUMNS)].mean().to_numpy(dtype=float)
    neg_freq = 1.0 - pos_freq
    return {
        "labels": list(PATHOLOGIES),
        "n_train_images": int(len(train)),
        "pos_freq": pos_freq.round(8).tolist(),
        "neg_freq": neg_freq.round(8).tolist(),
        "pos_weight": neg_freq.round(8).tolist(),
        "neg_weight": pos_freq.round(8).tolist(),
    }


def write_splits(splits: pd.DataFrame, weights: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    table = pa.Table.from_pandas(splits[["image_id", "patient_id", "split"]], schema=SPLIT_SCHEMA, preserve_index=False)
    with atomic_path(out_dir / "splits.parquet") as tmp:
        pq.write_table(table, tmp)
    weights_path = out_dir / "class_weights.json"
    atomic_write_json(weights_path, weights)
    return out_dir / "splits.parquet", weights_path


def read_splits(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DataError("splits.parquet not found; run `cxr split` first", where=str(path))
    return pq.read_table(path).to_pandas()


LEAKS_CSV = "leaking_patients.csv"


def leaking_patients(splits: pd.DataFrame) -> pd.DataFrame:
    """Every patient with images in more than one split: patient_id, splits ("train, test"),
    n_images and image_ids (space-separated), one row per patient, sorted by patient id."""
    frame = splits.dropna(subset=["patient_id"])
    per = frame.groupby("patient_id", sort=True).agg(
        splits=("split", lambda s: ", ".join(x for x in SPLITS if x in set(s))),
        n_images=("image_id", "size"), image_ids=("image_id", lambda s: " ".join(sorted(s))),
        n_splits=("split", "nunique"))
    return per.loc[per["n_splits"] > 1].drop(columns="n_splits").reset_index()


def run_split(
    metadata_parquet: str | Path,
    out_dir: str | Path,
    *,
    ratios: dict[str, float],
    tolerance: float,
    seed: int,
    assignments: str | Path | None = None,
    check_only: bool = False,
) -> dict:
    """Split (or take `assignments`), gate it with the GE split suite, write splits + weights.

    `check_only` takes the suite's quick look only and writes nothing but a leak listing (the
    CLI refuses bad input this way before Great Expectations or Prefect load).
    """
    from tasks.metadata.ingest import read_metadata
    from tasks.metadata.suites import validate_split

    out_dir = Path(out_dir)
    meta = read_metadata(metadata_parquet)
    if assignments is not None:
        splits = read_assignments(assignments, meta)
        source = str(assignments)
    else:
        splits = patient_split(meta, ratios, seed)
        source = "patient_split"
    listing = out_dir / "validation" / LEAKS_CSV
    try:
        validate_split(splits, ratios, tolerance, out_dir / "validation", source=source, quick=check_only)
    except DataError as exc:
        leaks = leaking_patients(splits)
        if leaks.empty:
            raise
        # The message names the first few; the file names them all, so a user can fix the split.
        with atomic_path(listing) as tmp:
            leaks.to_csv(tmp, index=False)
        error = DataError(f"{exc} Every leaking patient ({len(leaks)}: patient id, the splits they are in, their "
                          f"image ids) is listed in {listing}.")
        error.summary = getattr(exc, "summary", None)
        raise error from None
    if check_only:
        return {"checked": source, "images": int(len(splits))}
    listing.unlink(missing_ok=True)  # a listing from an earlier refused split no longer applies
    weights = class_weights(meta, splits)
    write_splits(splits, weights, out_dir)
    counts = splits["split"].value_counts()
    return {
        "splits": str(out_dir / "splits.parquet"),
        "class_weights": str(out_dir / "class_weights.json"),
        "images": {s: int(counts.get(s, 0)) for s in SPLITS},
        "patients": {s: int(splits.loc[splits["split"] == s, "patient_id"].nunique()) for s in SPLITS},
    }
