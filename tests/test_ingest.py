"""Ingest of NIH Data_Entry CSVs: real counts, both header versions, typed schema."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from cxr.core.errors import DataError
from cxr.core.labels import LABEL_COLUMNS, NO_FINDING_COLUMN
from tasks.metadata.ingest import SCHEMA, packaged_metadata_path, read_metadata, read_metadata_csv, write_metadata


@pytest.fixture(scope="module")
def full_metadata():
    return read_metadata_csv(packaged_metadata_path())


def test_full_nih_file_has_exact_counts(full_metadata):
    df = full_metadata
    assert len(df) == 112_120
    assert df["patient_id"].nunique() == 30_805
    counts = df[list(LABEL_COLUMNS) + [NO_FINDING_COLUMN]].sum()
    # NIH's published per-label image counts (Data_Entry_2017_v2020).
    expected = {
        "atelectasis": 11_559, "cardiomegaly": 2_776, "effusion": 13_317, "infiltration": 19_894,
        "mass": 5_782, "nodule": 6_331, "pneumonia": 1_431, "pneumothorax": 5_302,
        "consolidation": 4_667, "edema": 2_303, "emphysema": 2_516, "fibrosis": 1_686,
        "pleural_thickening": 3_385, "hernia": 227, "no_finding": 60_361,
    }
    assert counts.to_dict() == expected


def test_parquet_has_explicit_schema(full_metadata, tmp_path):
    path = write_metadata(full_metadata.head(1000), tmp_path)
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    back = read_metadata(path)
    assert list(back.columns) == SCHEMA.names
    assert back["hernia"].dtype.name == "int8"


def test_2017_header_with_trailing_empty_column(sample_csv, tmp_path):
    lines = sample_csv.read_text().splitlines()
    # The 2017 release: "Patient Gender" and a trailing comma on every line.
    old = tmp_path / "Data_Entry_2017.csv"
    old.write_text("\n".join(line + "," for line in lines) + "\n")
    a = read_metadata_csv(sample_csv)
    b = read_metadata_csv(old)
    assert a.equals(b)
    assert len(a) == 800 and a["no_finding"].sum() == 399


def test_label_matching_is_exact(sample_csv):
    df = read_metadata_csv(sample_csv)
    row = df[df["finding_labels"] == "Cardiomegaly|Emphysema"].iloc[0]
    assert row["cardiomegaly"] == 1 and row["emphysema"] == 1 and row["mass"] == 0
    assert (df[list(LABEL_COLUMNS)].sum(axis=1).eq(0) == df["no_finding"].eq(1)).all()


def test_non_numeric_age_names_the_row(sample_csv, tmp_path):
    lines = sample_csv.read_text().splitlines()
    fields = lines[3].split(",")
    fields[4] = "abc"
    lines[3] = ",".join(fields)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"age.*row 4"):
        read_metadata_csv(bad)


def test_params_paths_are_confined_to_the_data_roots(tmp_path):
    from cxr.core.config import load_params

    bad = tmp_path / "params.yaml"
    bad.write_text("paths:\n  models: /etc/cxr-models\n")
    with pytest.raises(DataError, match=r"paths.models resolves to /etc/cxr-models, outside the data roots"):
        load_params(bad)
    # A symlink inside the root that leads outside is refused too.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "escape").symlink_to("/etc")
    sneaky = tmp_path / "sneaky.yaml"
    sneaky.write_text(f"paths:\n  roots: [{tmp_path / 'data'}]\n  raw: {tmp_path / 'data'}\n  images: {tmp_path / 'data/escape'}\n"
                      f"  interim: {tmp_path / 'data'}\n  processed: {tmp_path / 'data'}\n  cache: {tmp_path / 'data'}\n"
                      f"  models: {tmp_path / 'data'}\n  metrics: {tmp_path / 'data'}\n  reports: {tmp_path / 'data'}\n")
    with pytest.raises(DataError, match="paths.images resolves to /etc"):
        load_params(sneaky)
