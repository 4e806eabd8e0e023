"""Every bad metadata input gets one clear paragraph, exit code 2, no traceback, no output."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import NIH_SAMPLE, ROOT, run_cxr
from tests.data.make_bad_metadata import make_bad_metadata

CASES = ["empty", "header_only", "missing_column", "duplicate_id", "age_out_of_range", "unknown_label",
         "no_finding_with_pathology", "patient_contradicts_name"]


@pytest.fixture(scope="module")
def refusals(sample_csv, tmp_path_factory, prefect_server) -> dict:
    """Each case's real `cxr ingest` against the Prefect server, two processes at a time (a
    refusal is interpreter start-up, imports and server round trips: two overlap on two cores,
    more only queue). {name: (bad CSV, its expected message, out folder, result)}."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("bad-metadata")
    manifest = make_bad_metadata(sample_csv, root / "bad")

    def refuse(name: str):
        bad = root / "bad" / f"{name}.csv"
        out = root / name / "interim"
        out.mkdir(parents=True)
        (out / "metadata.parquet").write_bytes(b"last good metadata")
        return bad, manifest[bad.name], out, run_cxr("ingest", "--metadata", str(bad), "--out", str(out))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CASES, pool.map(refuse, CASES)))


@pytest.mark.parametrize("name", CASES)
def test_bad_metadata_is_refused_cleanly(name, refusals):
    import re

    bad, expected, out, result = refusals[name]
    previous = out / "metadata.parquet"
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


def test_leaking_split_is_refused_by_the_cli(workspace, tmp_path, prefect_server):
    # The sample's metadata as `cxr ingest` writes it (the session workspace ran the same
    # ingest); a good `cxr ingest` through the console is tested by test_orchestration.
    out = workspace / "interim"
    result = run_cxr(
        "split", "--metadata", str(out / "metadata.parquet"), "--out", str(tmp_path / "processed"),
        "--assignments", str(NIH_SAMPLE / "original_split.csv"),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "21" in result.stderr and "leak" in result.stderr.lower()
    assert not (tmp_path / "processed" / "splits.parquet").exists()
    assert not (tmp_path / "processed" / "class_weights.json").exists()
    # The message names the first few patients and the file that lists every one of them.
    listing = tmp_path / "processed" / "validation" / "leaking_patients.csv"
    assert str(listing) in result.stderr
    import pandas as pd

    leaks = pd.read_csv(listing, dtype={"patient_id": str})
    external = pd.read_csv(NIH_SAMPLE / "original_split.csv")
    meta = pd.read_csv(NIH_SAMPLE / "Data_Entry_sample.csv")
    joined = external.merge(meta[["Image Index", "Patient ID"]], on="Image Index")
    per_patient = joined.groupby("Patient ID")["split"].nunique()
    assert sorted(leaks["patient_id"].astype(int)) == sorted(per_patient[per_patient > 1].index)
    for row in leaks.itertuples():
        images = set(joined.loc[joined["Patient ID"] == int(row.patient_id), "Image Index"])
        assert set(row.image_ids.split()) == images and row.n_images == len(images)
        assert row.splits == ", ".join(s for s in ("train", "valid", "test")
                                       if s in set(joined.loc[joined["Image Index"].isin(images), "split"]))

    # A correct split afterwards removes the stale listing (and --params may follow the subcommand).
    fixed = run_cxr("split", "--metadata", str(out / "metadata.parquet"), "--out", str(tmp_path / "processed"),
                    "--params", str(ROOT / "params.yaml"))
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert not listing.exists() and (tmp_path / "processed" / "splits.parquet").exists()


def test_a_data_error_reaches_the_terminal_once(sample_csv, tmp_path, prefect_server):
    """Prefect's task, flow and final-state lines stay off the terminal by default (the run
    still fails, with its message, on the server); --verbose shows them."""
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,Finding Labels\nx.png,Atelectasis\n")
    quiet = run_cxr("ingest", "--metadata", str(bad), "--out", str(tmp_path / "interim"))
    assert quiet.returncode == 2
    assert quiet.stderr.count("missing required column") == 1, quiet.stderr
    assert quiet.stderr.startswith("cxr ingest: error:") and "Traceback" not in quiet.stderr
    assert quiet.stdout == ""
    loud = run_cxr("ingest", "--metadata", str(bad), "--out", str(tmp_path / "interim"), "--verbose")
    assert loud.returncode == 2
    assert loud.stderr.count("missing required column") > 1 and "Flow run" in loud.stderr

    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    async def failed_runs():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.FAILED]))))

    messages = [run.state.message or "" for run in asyncio.run(failed_runs())]
    assert any("missing required column" in m for m in messages), messages


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

    from cxr.core.config import Params

    ok = Params.model_validate({"data": {"metadata": str(tmp_path / "a.csv"), "images_dir": str(tmp_path / "img")},
                                "paths": {"roots": [str(tmp_path), "data"]}})
    assert ok.paths.images == tmp_path / "img"  # images_dir is where every step reads images
    with pytest.raises(pydantic.ValidationError, match="data.metadata resolves to .* outside the data roots"):
        Params.model_validate({"data": {"metadata": str(tmp_path / "a.csv")}})
    with pytest.raises(pydantic.ValidationError, match="data.split_assignments resolves to"):
        Params.model_validate({"data": {"split_assignments": str(tmp_path / "s.csv")}})
    with pytest.raises(pydantic.ValidationError, match="disagree"):
        Params.model_validate({"data": {"images_dir": "data/a"}, "paths": {"images": "data/b"}})
    # A copy of params.yaml carries paths.images at its default: data.images_dir alone wins.
    import yaml

    from tests.conftest import ROOT

    copied = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert copied["paths"]["images"] == "data/raw/images"
    copied["data"]["images_dir"] = "data/real/images"
    assert Params.model_validate(copied).paths.images == Path("data/real/images")
