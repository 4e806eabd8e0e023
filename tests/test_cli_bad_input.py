"""Every bad metadata input gets one clear paragraph, exit code 2, no traceback, no output."""

from __future__ import annotations

import pytest

from tests.conftest import NIH_SAMPLE, run_cxr

HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"


def _rows(sample_csv) -> list[str]:
    return sample_csv.read_text().splitlines()[1:40]


def _edit(row: str, index: int, value: str) -> str:
    fields = row.split(",")
    fields[index] = value
    return ",".join(fields)


def _case(name, sample_csv):
    rows = _rows(sample_csv)
    if name == "empty":
        return "", "empty"
    if name == "header_only":
        return HEADER + "\n", "empty \\(0 rows\\)"
    if name == "missing_column":
        header = HEADER.replace("Patient Age,", "")
        body = [",".join(r.split(",")[:4] + r.split(",")[5:]) for r in rows]
        return "\n".join([header, *body]) + "\n", "Patient Age|age"
    if name == "duplicate_id":
        return "\n".join([HEADER, *rows, rows[0]]) + "\n", rows[0].split(",")[0]
    if name == "age_out_of_range":
        rows[5] = _edit(rows[5], 4, "148")
        return "\n".join([HEADER, *rows]) + "\n", "148"
    if name == "unknown_label":
        rows[6] = _edit(rows[6], 1, "Cardiomegaly|Pneumonitis")
        return "\n".join([HEADER, *rows]) + "\n", "Pneumonitis"
    if name == "no_finding_with_pathology":
        rows[7] = _edit(rows[7], 1, "No Finding|Mass")
        return "\n".join([HEADER, *rows]) + "\n", rows[7].split(",")[0]
    if name == "patient_contradicts_name":
        rows[8] = _edit(rows[8], 3, "99999")
        return "\n".join([HEADER, *rows]) + "\n", rows[8].split(",")[0]
    raise AssertionError(name)


CASES = ["empty", "header_only", "missing_column", "duplicate_id", "age_out_of_range", "unknown_label",
         "no_finding_with_pathology", "patient_contradicts_name"]


@pytest.mark.parametrize("name", CASES)
def test_bad_metadata_is_refused_cleanly(name, sample_csv, tmp_path, prefect_server):
    import re

    text, expected = _case(name, sample_csv)
    bad = tmp_path / f"{name}.csv"
    bad.write_text(text)
    out = tmp_path / "interim"
    out.mkdir()
    previous = out / "metadata.parquet"
    previous.write_bytes(b"last good metadata")
    result = run_cxr("ingest", "--metadata", str(bad), "--out", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("cxr ingest: error:")]
    assert error_lines, result.stderr[-2000:]
    message = result.stderr[result.stderr.index("cxr ingest: error:"):]
    assert str(bad) in message.replace("\n", " ") or bad.name in message
    assert re.search(expected, message.replace("\n", " ")), message
    # Nothing downstream overwritten, no temporary file left behind.
    assert previous.read_bytes() == b"last good metadata"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_leaking_split_is_refused_by_the_cli(sample_csv, tmp_path, prefect_server):
    out = tmp_path / "interim"
    ok = run_cxr("ingest", "--metadata", str(sample_csv), "--out", str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    result = run_cxr(
        "split", "--metadata", str(out / "metadata.parquet"), "--out", str(tmp_path / "processed"),
        "--assignments", str(NIH_SAMPLE / "original_split.csv"),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "21" in result.stderr and "leak" in result.stderr.lower()
    assert not (tmp_path / "processed" / "splits.parquet").exists()


def test_bad_params_are_refused_before_work(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\nsplit:\n  train: 0.7\n  valid: 0.1\n  test: 0.2\n  bogus: 3\n")
    result = run_cxr("--params", str(params), "split")
    assert result.returncode == 2
    assert "split.bogus" in result.stderr and "Traceback" not in result.stderr
