"""The Great Expectations suites of the metadata and the split (run by `cxr.core.expectations`).

Suite "metadata" (one row per image) checks:
  required columns present; at least one row; required columns not null; image_id unique and
  shaped `NNNNNNNN_NNN.png`; patient_id equal to the first 8 digits of image_id; age in
  0–120; sex in {M, F}; view in {PA, AP}; finding_labels made only of the 15-label vocabulary;
  "No Finding" never combined with a pathology; the 14 label columns and no_finding are 0/1;
  no_finding is 1 exactly when no pathology column is set.

Suite "splits" (columns image_id, patient_id, split) checks:
  split in {train, valid, test}; image_id unique; no patient in more than one split; every
  split has at least one image; each split's image fraction within `tolerance` of its ratio.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from cxr.core.expectations import quick_check, register_suite, run_suite
from cxr.core.labels import LABEL_COLUMNS, NO_FINDING, NO_FINDING_COLUMN, VOCABULARY

METADATA_COLUMNS: tuple[str, ...] = (
    "image_id", "finding_labels", "follow_up", "patient_id", "age", "sex", "view",
    "width", "height", "pixel_spacing_x", "pixel_spacing_y",
) + LABEL_COLUMNS + (NO_FINDING_COLUMN,)
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "split")
SPLITS: tuple[str, ...] = ("train", "valid", "test")

IMAGE_ID_REGEX = r"^\d{8}_\d{3}\.png$"
_LABEL = "(?:" + "|".join(re.escape(label) for label in VOCABULARY) + ")"
LABELS_REGEX = rf"^{_LABEL}(?:\|{_LABEL})*$"
# "No Finding" next to a pipe means it was joined with some other label.
NO_FINDING_COMBINED_REGEX = rf"(?:^|\|){re.escape(NO_FINDING)}\||\|{re.escape(NO_FINDING)}(?:$|\|)"


def _metadata_expectations(gxe) -> list:
    e = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(METADATA_COLUMNS), exact_match=False,
                                         description="missing required columns"),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="table is empty"),
    ]
    e += [gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} missing")
          for c in METADATA_COLUMNS]
    e += [
        gxe.ExpectColumnValuesToBeUnique(column="image_id", description="image_id not unique"),
        gxe.ExpectColumnValuesToMatchRegex(column="image_id", regex=IMAGE_ID_REGEX,
                                           description="image_id not of the form NNNNNNNN_NNN.png"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="patient_id", column_B="id_patient",
                                            description="patient_id contradicts the image name"),
        gxe.ExpectColumnValuesToBeBetween(column="age", min_value=0, max_value=120,
                                          description="age outside 0–120"),
        gxe.ExpectColumnValuesToBeInSet(column="sex", value_set=["M", "F"],
                                        description="sex not M/F"),
        gxe.ExpectColumnValuesToBeInSet(column="view", value_set=["PA", "AP"],
                                        description="view not PA/AP"),
        gxe.ExpectColumnValuesToMatchRegex(column="finding_labels", regex=LABELS_REGEX,
                                           description="finding_labels outside the 15-label vocabulary"),
        gxe.ExpectColumnValuesToNotMatchRegex(column="finding_labels", regex=NO_FINDING_COMBINED_REGEX,
                                              description="No Finding combined with a pathology"),
    ]
    e += [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[0, 1], description=f"{c} not 0/1")
          for c in LABEL_COLUMNS + (NO_FINDING_COLUMN,)]
    e.append(gxe.ExpectColumnPairValuesToBeEqual(
        column_A=NO_FINDING_COLUMN, column_B="no_pathology",
        description="no_finding contradicts the pathology columns (no_finding vs none set)"))
    return e


def _split_expectations(gxe) -> list:
    e = [gxe.ExpectTableColumnsToMatchSet(column_set=list(SPLIT_COLUMNS), exact_match=False,
                                          description="missing required columns"),
         gxe.ExpectTableRowCountToBeBetween(min_value=1, description="table is empty")]
    e += [gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} missing")
          for c in SPLIT_COLUMNS]
    e += [
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS),
                                        description="split not train/valid/test"),
        gxe.ExpectColumnValuesToBeUnique(column="image_id", description="image_id not unique"),
        # One non-null value per patient: the splits it appears in; anything else is leakage.
        gxe.ExpectColumnValuesToBeInSet(column="splits_of_patient", value_set=list(SPLITS),
                                        description="patient leakage"),
        gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=list(SPLITS),
                                                   description="empty split"),
    ]
    # The mean of a 0/1 membership column is that split's fraction of the images; the bounds
    # are suite parameters so one suite serves any ratios/tolerance.
    e += [gxe.ExpectColumnMeanToBeBetween(column=f"in_{s}", min_value={"$PARAMETER": f"{s}_min"},
                                          max_value={"$PARAMETER": f"{s}_max"},
                                          description=f"{s} fraction out of tolerance")
          for s in SPLITS]
    return e


def validate_metadata(df: pd.DataFrame, out_dir: Path, *, source: str = "metadata", quick: bool = False) -> dict | None:
    """Run suite "metadata" on the normalized metadata frame; raise DataError if it fails.

    quick: only the quick look (`cxr.core.expectations.quick_check`), no GE run, nothing written.
    """
    frame = df.reset_index(drop=True).copy()
    if "image_id" in frame:
        # Derived column for the pair check: the patient number written in the file name.
        frame["id_patient"] = pd.to_numeric(frame["image_id"].astype(str).str[:8], errors="coerce")
    if all(c in frame for c in LABEL_COLUMNS):
        set_any = frame[list(LABEL_COLUMNS)].apply(pd.to_numeric, errors="coerce").fillna(0).sum(axis=1)
        frame["no_pathology"] = (set_any == 0).astype("int8")
    if quick:
        return quick_check(_metadata_expectations, frame, source)
    return run_suite("metadata", frame, out_dir, source, {})


def validate_split(splits: pd.DataFrame, ratios: dict[str, float], tolerance: float,
                   out_dir: Path, *, source: str = "splits", quick: bool = False) -> dict | None:
    """Run suite "splits" on (image_id, patient_id, split); raise DataError if it fails.

    quick: only the quick look (`cxr.core.expectations.quick_check`), no GE run, nothing written.
    """
    if set(ratios) != set(SPLITS):
        raise ValueError(f"ratios must have exactly the keys {SPLITS}, got {sorted(ratios)}")
    frame = splits.reset_index(drop=True).copy()
    if "split" in frame:
        for s in SPLITS:
            frame[f"in_{s}"] = (frame["split"] == s).astype("int8")
    if "patient_id" in frame and "split" in frame:
        frame["splits_of_patient"] = _splits_of_patient(frame)
    params = {}
    for s in SPLITS:
        params[f"{s}_min"] = float(ratios[s]) - tolerance
        params[f"{s}_max"] = float(ratios[s]) + tolerance
    if quick:
        return quick_check(_split_expectations, frame, source, params)
    return run_suite("splits", frame, out_dir, source, params)


def _splits_of_patient(frame: pd.DataFrame) -> pd.Series:
    """On each patient's first row the splits it appears in ("train, test"); None elsewhere."""
    known = {s: i for i, s in enumerate(SPLITS)}
    pairs = frame[["patient_id", "split"]].dropna().astype({"split": str})
    present = pd.crosstab(pairs["patient_id"], pairs["split"]) > 0
    names = sorted(present.columns, key=lambda s: (known.get(s, len(known)), s))
    # Vectorised: encode each patient's set of splits as a bitmask, spell each mask once.
    masks = present[names].to_numpy().astype("int64") @ (1 << pd.RangeIndex(len(names)).to_numpy())
    spelled = {m: ", ".join(n for b, n in enumerate(names) if m >> b & 1) for m in set(masks.tolist())}
    joined = pd.Series([spelled[m] for m in masks.tolist()], index=present.index)
    first = ~frame["patient_id"].duplicated() & frame["patient_id"].notna()
    out = pd.Series(None, index=frame.index, dtype=object)
    out[first] = frame.loc[first, "patient_id"].map(joined).to_numpy()
    return out


register_suite("metadata", _metadata_expectations)
register_suite("splits", _split_expectations)
