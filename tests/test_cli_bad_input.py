"""Every bad metadata input gets one clear paragraph, exit code 2, no traceback, no output."""

from __future__ import annotations

import pytest

from tests.conftest import NIH_SAMPLE, run_cxr
from tests.data.make_bad_metadata import make_bad_metadata

CASES = ["empty", "header_only", "missing_column", "duplicate_id", "age_out_of_range", "unknown_label",
         "no_finding_with_pathology", "patient_contradicts_name"]


@pytest.mark.parametrize("name", CASES)
def test_bad_metadata_is_refused_cleanly(name, sample_csv, tmp_path, prefect_server):
    import re

    manifest = make_bad_metadata(sample_csv, tmp_path / "bad")
    bad = tmp_path / "bad" / f"{name}.csv"
    expected = manifest[bad.name]
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
