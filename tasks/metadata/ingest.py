"""Read NIH Data_Entry CSVs (2017 and v2020 headers) into one typed metadata table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr.core.atomic import atomic_path
from cxr.core.errors import DataError
from cxr.core.labels import LABEL_COLUMNS, NO_FINDING_COLUMN, PATHOLOGIES, NO_FINDING

# NIH's header names -> our snake_case columns. The bracketed names contain commas, so a CSV
# reader splits "OriginalImage[Width,Height]" into two header cells; both spellings are mapped.
# The v2020 file renamed "Patient Gender" to "Patient Sex" in some copies.
HEADER_MAP = {
    "Image Index": "image_id",
    "Finding Labels": "finding_labels",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "Patient Sex": "sex",
    "View Position": "view",
    "OriginalImage[Width": "width",
    "Height]": "height",
    "OriginalImagePixelSpacing[x": "pixel_spacing_x",
    "y]": "pixel_spacing_y",
}
REQUIRED = ("image_id", "finding_labels", "patient_id", "age", "sex", "view")
INT_COLUMNS = {"follow_up": pa.int32(), "patient_id": pa.int32(), "age": pa.int32(), "width": pa.int32(), "height": pa.int32()}

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("finding_labels", pa.string(), nullable=False),
        pa.field("follow_up", pa.int32()),
        pa.field("patient_id", pa.int32(), nullable=False),
        pa.field("age", pa.int32()),
        pa.field("sex", pa.string()),
        pa.field("view", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("pixel_spacing_x", pa.float64()),
        pa.field("pixel_spacing_y", pa.float64()),
    ]
    + [pa.field(c, pa.int8(), nullable=False) for c in LABEL_COLUMNS + (NO_FINDING_COLUMN,)]
)


def packaged_metadata_path() -> Path:
    """The full NIH Data_Entry_2017_v2020 file shipped in the torchxrayvision wheel.

    Found via the package spec, not imported: importing torchxrayvision would load torch and
    its models only to locate a CSV.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("torchxrayvision is not installed, so the packaged NIH metadata is missing; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "Data_Entry_2017_v2020.csv.gz"
    if not path.exists():
        raise DataError("packaged NIH metadata file not found", where=str(path))
    return path


def read_metadata_csv(path: str | Path) -> pd.DataFrame:
    """Read one Data_Entry-format CSV into the normalized frame (no validation beyond types)."""
    path = Path(path)
    if not path.exists():
        raise DataError("metadata file not found", where=str(path))
    if path.stat().st_size == 0:
        raise DataError("metadata file is empty (0 bytes); expected an NIH Data_Entry CSV with a header row", where=str(path))
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot be parsed as CSV ({exc})", where=str(path)) from None
    # The 2017 file ends every line with a comma: an unnamed, empty trailing column.
    raw = raw.loc[:, [c for c in raw.columns if not (str(c).startswith("Unnamed:") and (raw[c] == "").all())]]
    raw = raw.rename(columns={c: HEADER_MAP.get(c.strip(), c) for c in raw.columns})
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise DataError(
            f"missing required column(s) {', '.join(missing)}; found {', '.join(map(str, raw.columns))}. "
            "Expected the NIH Data_Entry header (Image Index, Finding Labels, Follow-up #, Patient ID, "
            "Patient Age, Patient Gender, View Position, ...)",
            where=str(path),
        )
    return normalize(raw, source=str(path))


def _to_int(series: pd.Series, name: str, source: str, ids: pd.Series) -> np.ndarray:
    # The 2017 release wrote some ages as "058Y"; strip a trailing unit letter before parsing.
    cleaned = series.str.strip().str.replace(r"^(\d+)[YyMmDd]$", r"\1", regex=True)
    numeric = pd.to_numeric(cleaned, errors="coerce")
    bad = numeric.isna() | (numeric != numeric.round())
    if bad.any():
        rows = np.flatnonzero(bad.to_numpy())[:5]
        shown = ", ".join(f"row {r + 2} ({ids.iloc[r]}): {series.iloc[r]!r}" for r in rows)
        raise DataError(f"column {name} has {int(bad.sum())} non-integer value(s): {shown}", where=source)
    return numeric.to_numpy(dtype=np.int64)


def normalize(raw: pd.DataFrame, source: str = "metadata") -> pd.DataFrame:
    """Typed snake_case columns plus one 0/1 column per pathology and No Finding."""
    ids = raw["image_id"].str.strip()
    out = pd.DataFrame({"image_id": ids, "finding_labels": raw["finding_labels"].str.strip()})
    for name in ("follow_up", "patient_id", "age", "width", "height"):
        if name in raw.columns:
            out[name] = _to_int(raw[name], name, source, ids).astype(np.int32)
        else:
            out[name] = pd.array([pd.NA] * len(raw), dtype="Int32")
    out["sex"] = raw["sex"].str.strip()
    out["view"] = raw["view"].str.strip()
    for name in ("pixel_spacing_x", "pixel_spacing_y"):
        out[name] = pd.to_numeric(raw[name], errors="coerce") if name in raw.columns else np.nan
    # Exact label membership: split on "|" so "Mass" never matches inside another name.
    labels = out["finding_labels"].str.get_dummies(sep="|")
    for label, column in zip(PATHOLOGIES + (NO_FINDING,), LABEL_COLUMNS + (NO_FINDING_COLUMN,)):
        out[column] = labels[label].astype(np.int8) if label in labels.columns else np.int8(0)
    return out.reset_index(drop=True)


def to_arrow(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False)


def write_metadata(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write `out_dir/metadata.parquet` with the explicit schema, atomically."""
    target = Path(out_dir) / "metadata.parquet"
    table = to_arrow(df)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return target


def read_metadata(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DataError("metadata.parquet not found; run `cxr ingest` first", where=str(path))
    return pq.read_table(path, schema=SCHEMA).to_pandas()


def run_ingest(metadata_csv: str | Path, out_dir: str | Path, *, check_only: bool = False) -> dict:
    """Read, validate (the GE metadata suite gates) and write `out_dir/metadata.parquet`.

    A failed suite raises DataError before anything is written, so the previous
    metadata.parquet (and everything downstream of it) stays as it was. `check_only` takes
    the suite's quick look only and writes nothing (the CLI refuses bad input this way before
    Great Expectations or Prefect load).
    """
    from tasks.metadata.suites import validate_metadata

    out_dir = Path(out_dir)
    df = read_metadata_csv(metadata_csv)
    validate_metadata(df, out_dir / "validation", source=str(metadata_csv), quick=check_only)
    if check_only:
        return {"checked": str(metadata_csv), "images": int(len(df))}
    path = write_metadata(df, out_dir)
    return {
        "metadata": str(path),
        "images": int(len(df)),
        "patients": int(df["patient_id"].nunique()),
        "positives": {c: int(df[c].sum()) for c in LABEL_COLUMNS + (NO_FINDING_COLUMN,)},
    }
