"""The Great Expectations gates of a scoring run (run by `cxr.core.expectations`).

Suite "score_manifest" (one row per file found under a scoring input folder) checks:
  stops the run: required columns present; at least one row; study_id present and unique;
  output names unique (two studies must never write the same JSON/overlay files).
  becomes rejected rows (tagged meta on_failure=reject, the run goes on): the file resolves
  inside the input folder; it is present; its size is > 0 and <= `score.max_bytes`.
  One odd file must not hold back a nightly run; a listing that cannot be keyed safely must.

Suite "scores" (the folded scores table about to be published) checks:
  required columns present; status scored/rejected; one row per (study sha256, model
  digest); for scored rows every probability present (no NaN) and within [0, 1]. Any failure
  stops publication.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxr.core.expectations import register_suite, run_suite
from cxr.core.labels import LABEL_COLUMNS

MANIFEST_COLUMNS: tuple[str, ...] = ("study_id", "path", "size_bytes", "output_name", "inside")
SCORES_COLUMNS: tuple[str, ...] = ("study_id", "model_digest", "status", "key") + LABEL_COLUMNS
_REJECT = {"on_failure": "reject"}  # recorded, not blocking: the caller rejects those rows


def _manifest_expectations(gxe) -> list:
    from great_expectations.expectations.row_conditions import Column

    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(MANIFEST_COLUMNS), exact_match=False,
                                         description="missing required columns"),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="no files to score"),
        gxe.ExpectColumnValuesToNotBeNull(column="study_id", description="study_id missing"),
        gxe.ExpectColumnValuesToBeUnique(column="study_id", description="study_id not unique"),
        gxe.ExpectColumnValuesToBeUnique(column="output_name",
                                         description="two studies would write the same output files"),
        gxe.ExpectColumnValuesToBeInSet(column="inside", value_set=[True], meta=_REJECT,
                                        description="resolves outside the input folder"),
        gxe.ExpectColumnValuesToNotBeNull(column="size_bytes", row_condition=Column("inside") == True,  # noqa: E712
                                          meta=_REJECT, description="file not present"),
        gxe.ExpectColumnValuesToBeBetween(column="size_bytes", min_value=1, max_value={"$PARAMETER": "max_bytes"},
                                          meta=_REJECT, description="file size not within 1 byte and score.max_bytes"),
    ]


def _scores_expectations(gxe) -> list:
    from great_expectations.expectations.row_conditions import Column

    e = [gxe.ExpectTableColumnsToMatchSet(column_set=list(SCORES_COLUMNS), exact_match=False,
                                          description="missing required columns"),
         gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["scored", "rejected"],
                                         description="status not scored/rejected"),
         gxe.ExpectColumnValuesToBeUnique(column="key",
                                          description="more than one row per (study sha256, model digest)")]
    for c in LABEL_COLUMNS:
        e += [gxe.ExpectColumnValuesToNotBeNull(column=c, row_condition=Column("status") == "scored",
                                                description=f"probability {c} is NaN for a scored study"),
              gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1,
                                                description=f"probability {c} outside [0, 1]")]
    return e


def validate_score_manifest(manifest: pd.DataFrame, max_bytes: int, out_dir: Path, *,
                            source: str = "input folder", docs: str = "always") -> dict:
    """Run suite "score_manifest" on (study_id, path, size_bytes, output_name, inside).

    Raises DataError only for failures that make the listing unusable as a whole; files
    outside the folder, missing, empty or too large are counted in the result (key
    `rejected`) and left to the caller to reject.
    """
    frame = manifest.reset_index(drop=True).copy()
    return run_suite("score_manifest", frame, out_dir, source, {"max_bytes": int(max_bytes)}, docs)


def validate_scores(scores: pd.DataFrame, out_dir: Path, *, source: str = "scores", docs: str = "always") -> dict:
    """Run suite "scores" on the table about to be published (with its row `key`); DataError if it fails.

    Only the columns the suite reads are handed to GE: its cost grows with rows, not with
    the width of the scores table.
    """
    frame = scores.reset_index(drop=True)
    frame = frame[[c for c in SCORES_COLUMNS if c in frame.columns]].copy()
    return run_suite("scores", frame, out_dir, source, {}, docs)


register_suite("score_manifest", _manifest_expectations)
register_suite("scores", _scores_expectations)
