"""Generate NIH Data_Entry CSVs with each fault the ingest gate must refuse.

    python tests/data/make_bad_metadata.py SAMPLE_CSV OUT_DIR    # writes the CSVs + manifest.json

or `make_bad_metadata(sample_csv, out_dir) -> {file name: regex the error message must match}`.
Every file is derived from the first rows of a real Data_Entry CSV, so each differs from a
good file in exactly one way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def _edit(row: str, index: int, value: str) -> str:
    fields = row.split(",")
    fields[index] = value
    return ",".join(fields)


def _cases(rows: list[str]) -> dict[str, tuple[str, str]]:
    def table(body):
        return "\n".join([HEADER, *body]) + "\n"

    def edited(i, field, value):
        body = list(rows)
        body[i] = _edit(body[i], field, value)
        return table(body), body[i].split(",")[0]

    age, _ = edited(5, 4, "148")
    label, _ = edited(6, 1, "Cardiomegaly|Pneumonitis")
    combined, combined_id = edited(7, 1, "No Finding|Mass")
    patient, patient_id = edited(8, 3, "99999")
    without_age = [",".join(r.split(",")[:4] + r.split(",")[5:]) for r in rows]
    return {
        "empty.csv": ("", "empty"),
        "header_only.csv": (HEADER + "\n", r"empty \(0 rows\)"),
        "missing_column.csv": ("\n".join([HEADER.replace("Patient Age,", ""), *without_age]) + "\n", "Patient Age|age"),
        "duplicate_id.csv": (table(rows + [rows[0]]), rows[0].split(",")[0]),
        "age_out_of_range.csv": (age, "148"),
        "unknown_label.csv": (label, "Pneumonitis"),
        "no_finding_with_pathology.csv": (combined, combined_id),
        "patient_contradicts_name.csv": (patient, patient_id),
    }


def make_bad_metadata(sample_csv: str | Path, out_dir: str | Path) -> dict[str, str]:
    rows = Path(sample_csv).read_text().splitlines()[1:40]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (text, expected) in _cases(rows).items():
        (out_dir / name).write_text(text)
        manifest[name] = expected
    return manifest


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: make_bad_metadata.py SAMPLE_CSV OUT_DIR")
    result = make_bad_metadata(sys.argv[1], sys.argv[2])
    (Path(sys.argv[2]) / "manifest.json").write_text(json.dumps(result, indent=2) + "\n")
