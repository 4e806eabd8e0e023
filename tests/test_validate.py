"""The Great Expectations gates: good frames pass and leave JSON + Data Docs; each bad case
raises DataError with a message naming what is wrong."""

import json
from pathlib import Path

import pandas as pd
import pytest

from cxr.core.errors import DataError
from cxr.core.labels import LABEL_COLUMNS, NO_FINDING, NO_FINDING_COLUMN, PATHOLOGIES
from tasks.metadata.suites import validate_metadata, validate_split

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NIH_SAMPLE = SHARED_DATA / "nih-sample-64"
RATIOS = {"train": 0.7, "valid": 0.1, "test": 0.2}

# 20 images across 6 patients (4+4+3+3+3+3); labels cycle through a few valid combinations.
_PATIENT_IMAGES = {1: 4, 2: 4, 3: 3, 4: 3, 5: 3, 6: 3}
_LABELS = ["No Finding", "Cardiomegaly", "Cardiomegaly|Emphysema", "Effusion|Infiltration|Mass",
           "Hernia", "Pleural_Thickening|Nodule", "No Finding"]


def metadata_frame() -> pd.DataFrame:
    """A valid normalized metadata frame of 20 rows, 6 patients."""
    rows = []
    for patient, n in _PATIENT_IMAGES.items():
        for follow_up in range(n):
            labels = _LABELS[len(rows) % len(_LABELS)]
            row = {
                "image_id": f"{patient:08d}_{follow_up:03d}.png", "finding_labels": labels,
                "follow_up": follow_up, "patient_id": patient, "age": 30 + patient + follow_up,
                "sex": "M" if patient % 2 else "F", "view": "PA" if follow_up % 2 else "AP",
                "width": 2500, "height": 2048, "pixel_spacing_x": 0.143, "pixel_spacing_y": 0.143,
            }
            found = labels.split("|")
            for label, column in zip(PATHOLOGIES, LABEL_COLUMNS):
                row[column] = int(label in found)
            row[NO_FINDING_COLUMN] = int(NO_FINDING in found)
            rows.append(row)
    df = pd.DataFrame(rows)
    return df.astype({c: "int8" for c in LABEL_COLUMNS + (NO_FINDING_COLUMN,)})


def splits_frame() -> pd.DataFrame:
    """A valid patient-level split of metadata_frame(): 14 train, 3 valid, 3 test images."""
    split_of = {1: "train", 2: "train", 3: "train", 4: "train", 5: "valid", 6: "test"}
    df = metadata_frame()[["image_id", "patient_id"]]
    return df.assign(split=df["patient_id"].map(split_of))


def metadata_error(df, tmp_path) -> str:
    with pytest.raises(DataError) as info:
        validate_metadata(df, tmp_path, source="Data_Entry.csv")
    assert info.value.where == "Data_Entry.csv"
    # Docs and JSON are written on failure too, so people can look at what failed.
    assert (tmp_path / "metadata_validation.json").is_file()
    assert (tmp_path / "data_docs" / "index.html").is_file()
    return str(info.value)


def split_error(df, tmp_path, ratios=RATIOS, tolerance=0.2) -> str:
    with pytest.raises(DataError) as info:
        validate_split(df, ratios, tolerance, tmp_path)
    assert info.value.where == "splits"
    assert (tmp_path / "splits_validation.json").is_file()
    return str(info.value)


# --- good cases --------------------------------------------------------------------------

def test_valid_metadata_passes_and_writes_json_and_docs(tmp_path):
    summary = validate_metadata(metadata_frame(), tmp_path)
    assert summary["suite"] == "metadata" and summary["success"] is True
    assert summary["statistics"]["unsuccessful_expectations"] == 0
    assert summary["statistics"]["evaluated_expectations"] == len(summary["results"]) > 20
    saved = json.loads((tmp_path / "metadata_validation.json").read_text())
    assert saved["success"] is True and saved["suite_name"] == "metadata"
    index = tmp_path / "data_docs" / "index.html"
    assert index.is_file()
    assert list((tmp_path / "data_docs" / "validations" / "metadata").rglob("*.html"))
    assert not list(tmp_path.glob(".data_docs.*"))  # build folder cleaned up


def test_valid_split_passes_and_docs_list_both_suites(tmp_path):
    validate_metadata(metadata_frame(), tmp_path)
    summary = validate_split(splits_frame(), RATIOS, 0.2, tmp_path)
    assert summary["suite"] == "splits" and summary["success"] is True
    assert json.loads((tmp_path / "splits_validation.json").read_text())["success"] is True
    index = (tmp_path / "data_docs" / "index.html").read_text()
    assert "cxr-metadata.html" in index and "cxr-splits.html" in index


# --- metadata: bad cases ------------------------------------------------------------------

def test_duplicated_image_id(tmp_path):
    df = metadata_frame()
    df.loc[7, ["image_id", "patient_id"]] = ["00000001_000.png", 1]
    msg = metadata_error(df, tmp_path)
    assert "image_id not unique: 00000001_000.png (rows 0, 7)" in msg


def test_age_outside_range(tmp_path):
    df = metadata_frame()
    df.loc[5, "age"] = 148
    msg = metadata_error(df, tmp_path)
    assert f"age outside 0–120: 148 ({df.loc[5, 'image_id']})" in msg


def test_unknown_label(tmp_path):
    df = metadata_frame()
    df.loc[2, "finding_labels"] = "Cardiomegaly|Covid"
    msg = metadata_error(df, tmp_path)
    assert "vocabulary: Cardiomegaly|Covid" in msg


def test_no_finding_combined_with_pathology(tmp_path):
    df = metadata_frame()
    df.loc[1, "finding_labels"] = "Cardiomegaly|No Finding"
    msg = metadata_error(df, tmp_path)
    assert "No Finding combined with a pathology: Cardiomegaly|No Finding" in msg


def test_no_finding_flag_contradicts_pathology_columns(tmp_path):
    df = metadata_frame()
    df.loc[1, NO_FINDING_COLUMN] = 1  # row 1 has Cardiomegaly set
    msg = metadata_error(df, tmp_path)
    assert "no_finding contradicts the pathology columns" in msg


def test_patient_id_contradicts_image_name(tmp_path):
    df = metadata_frame()
    df.loc[3, "patient_id"] = 2
    msg = metadata_error(df, tmp_path)
    assert "patient_id contradicts the image name: 2 vs 1 (00000001_003.png)" in msg


def test_bad_image_id_format(tmp_path):
    df = metadata_frame()
    df.loc[4, "image_id"] = "2_000.jpg"
    msg = metadata_error(df, tmp_path)
    assert "image_id not of the form NNNNNNNN_NNN.png: 2_000.jpg" in msg


def test_bad_sex_and_view_and_nulls(tmp_path):
    df = metadata_frame()
    df.loc[0, "sex"] = "X"
    df.loc[1, "view"] = "LL"
    df["age"] = df["age"].astype("Int64")
    df.loc[2, "age"] = pd.NA
    msg = metadata_error(df, tmp_path)
    assert "sex not M/F: X (00000001_000.png)" in msg
    assert "view not PA/AP: LL (00000001_001.png)" in msg
    assert "age missing" in msg


def test_missing_required_column(tmp_path):
    msg = metadata_error(metadata_frame().drop(columns=["age", "hernia"]), tmp_path)
    assert "missing required columns: age, hernia" in msg
    assert "could not check" not in msg  # checks on the absent columns are not noise


def test_empty_frame(tmp_path):
    msg = metadata_error(metadata_frame().iloc[:0], tmp_path)
    assert "table is empty" in msg


# --- split: bad cases ---------------------------------------------------------------------

def test_leaking_split_names_patients_and_their_splits(tmp_path):
    df = splits_frame()
    df.loc[df["image_id"] == "00000001_003.png", "split"] = "test"
    df.loc[df["image_id"] == "00000002_000.png", "split"] = "valid"
    msg = split_error(df, tmp_path)
    assert "patient leakage: 2 patients in more than one split: 1 (train, test), 2 (train, valid)" in msg


def test_empty_split(tmp_path):
    df = splits_frame()
    df.loc[df["split"] == "valid", "split"] = "train"
    msg = split_error(df, tmp_path)
    assert "empty split: valid has no images" in msg


def test_fractions_out_of_tolerance(tmp_path):
    # Fractions are 0.70 / 0.15 / 0.15: train and test miss by 0.10, valid is on target.
    msg = split_error(splits_frame(), tmp_path, ratios={"train": 0.6, "valid": 0.15, "test": 0.25},
                      tolerance=0.05)
    assert "train fraction out of tolerance: 0.700 not within 0.550–0.650" in msg
    assert "test fraction out of tolerance: 0.150 not within 0.200–0.300" in msg
    assert "valid fraction" not in msg


def test_unknown_split_and_duplicate_image(tmp_path):
    df = splits_frame()
    df.loc[0, "split"] = "holdout"
    df.loc[1, "image_id"] = df.loc[2, "image_id"]
    msg = split_error(df, tmp_path)
    assert "split not train/valid/test: holdout" in msg
    assert "image_id not unique" in msg


# --- real data ----------------------------------------------------------------------------

@pytest.mark.skipif(not NIH_SAMPLE.is_dir(), reason="shared NIH sample not present")
def test_real_third_party_split_leaks_21_patients(tmp_path):
    split = pd.read_csv(NIH_SAMPLE / "original_split.csv").rename(columns={"Image Index": "image_id"})
    split["patient_id"] = split["image_id"].str[:8].astype(int)
    leaking = split.groupby("patient_id")["split"].nunique().loc[lambda n: n > 1]
    assert len(leaking) == 21
    with pytest.raises(DataError) as info:
        validate_split(split, RATIOS, 0.5, tmp_path, source="original_split.csv")
    msg = str(info.value)
    assert "patient leakage: 21 patients in more than one split" in msg
    assert f"{leaking.index[0]} (" in msg and "and 11 more" in msg
