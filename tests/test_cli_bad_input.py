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


def test_pipeline_on_real_files_refuses_a_leaking_split_assignment(tmp_path, prefect_server):
    """params `data:` points `cxr pipeline` at the NIH sample with its own (leaking) split:
    ingest runs, the split gate refuses it with the patients counted, and nothing downstream
    (caches, weights) is made. Data outside paths.roots is refused before any work."""
    import yaml

    data = {"metadata": str(NIH_SAMPLE / "Data_Entry_sample.csv"), "images_dir": str(NIH_SAMPLE / "images"),
            "split_assignments": str(NIH_SAMPLE / "original_split.csv")}
    paths = {k: str(tmp_path / k) for k in ("raw", "interim", "processed", "cache", "models", "metrics", "reports", "incoming")}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data, "paths": {**paths, "roots": [str(tmp_path), str(NIH_SAMPLE)]}}))
    result = run_cxr("--params", str(params), "pipeline")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "21" in result.stderr and "leak" in result.stderr.lower()
    assert (tmp_path / "interim" / "metadata.parquet").exists()  # ingest of the real CSV ran
    assert not (tmp_path / "processed" / "splits.parquet").exists()
    assert not (tmp_path / "cache").exists() and not (tmp_path / "models").exists()

    params.write_text(yaml.safe_dump({"data": data, "paths": {**paths, "roots": [str(tmp_path)]}}))
    result = run_cxr("--params", str(params), "pipeline")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # data.images_dir becomes paths.images, so the first file named is the images folder.
    assert "paths.images" in result.stderr and "outside the data roots" in result.stderr


def test_data_keys_are_confined_and_consistent(tmp_path):
    import pydantic

    from cxr.config import Params

    ok = Params.model_validate({"data": {"metadata": str(tmp_path / "a.csv"), "images_dir": str(tmp_path / "img")},
                                "paths": {"roots": [str(tmp_path), "data"]}})
    assert ok.paths.images == tmp_path / "img"  # images_dir is where every step reads images
    with pytest.raises(pydantic.ValidationError, match="data.metadata resolves to .* outside the data roots"):
        Params.model_validate({"data": {"metadata": str(tmp_path / "a.csv")}})
    with pytest.raises(pydantic.ValidationError, match="data.split_assignments resolves to"):
        Params.model_validate({"data": {"split_assignments": str(tmp_path / "s.csv")}})
    with pytest.raises(pydantic.ValidationError, match="disagree"):
        Params.model_validate({"data": {"images_dir": "data/a"}, "paths": {"images": "data/b"}})
