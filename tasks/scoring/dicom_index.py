"""The DICOM index of a PACS-sourced scoring run: `out/dicom_index.parquet`, one row per
retrieved instance with its Study/Series/SOP Instance UIDs, beside `scores.parquet` (whose
schema it leaves alone), and whether its results were stored back. `study_row` finds the
entry of a scored row (the app's study page shows its StudyInstanceUID and viewer link)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxr.core.atomic import atomic_path

INDEX_FILE = "dicom_index.parquet"
INDEX_SCHEMA = pa.schema([
    ("study_id", pa.string()), ("sha256", pa.string()), ("model_digest", pa.string()), ("status", pa.string()),
    ("study_instance_uid", pa.string()), ("series_instance_uid", pa.string()), ("sop_instance_uid", pa.string()),
    ("sop_class_uid", pa.string()), ("source_url", pa.string()), ("run_id", pa.string()),
    ("written_back", pa.bool_()),
    # Orthanc's id of the study (from PatientID and StudyInstanceUID): Orthanc Explorer's links.
    ("orthanc_study_id", pa.string()),
])


def read_index(out_dir: Path) -> pd.DataFrame:
    path = Path(out_dir) / INDEX_FILE
    if not path.exists():
        return INDEX_SCHEMA.empty_table().to_pandas()
    table = pq.read_table(path)
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in INDEX_SCHEMA]
    return pa.Table.from_arrays(cols, schema=INDEX_SCHEMA).to_pandas()


def write_index(out_dir: Path, df: pd.DataFrame) -> None:
    df = df.drop_duplicates(["sop_instance_uid", "model_digest"], keep="last").reset_index(drop=True)
    with atomic_path(Path(out_dir) / INDEX_FILE) as tmp:
        pq.write_table(pa.Table.from_pandas(df, schema=INDEX_SCHEMA, preserve_index=False), tmp)


def study_row(out_dir: Path, sha256: str | None, model_digest: str | None) -> dict | None:
    """The index entry of the instance a scores row came from (None for a study not from a PACS)."""
    if not sha256 or not (Path(out_dir) / INDEX_FILE).is_file():
        return None
    index = read_index(out_dir)
    hit = index.loc[(index["sha256"] == sha256) & (index["model_digest"] == model_digest)]
    if hit.empty:
        hit = index.loc[index["sha256"] == sha256]
    if hit.empty:
        return None
    return {k: (None if pd.isna(v) else v) for k, v in hit.iloc[-1].to_dict().items()}
