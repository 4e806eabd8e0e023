"""Hardening of the scoring path: the model bundle gate, input confinement, the manifest and
scores gates (Great Expectations), and Prefect retries of transient I/O only."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cxr.core.errors import DataError
from cxr.core.labels import LABEL_COLUMNS
from tests.conftest import NIH_SAMPLE, STUDIES, run_cxr, registered_copy

NIH_IMAGES = sorted((NIH_SAMPLE / "images").glob("*.png"))


@pytest.fixture(scope="module")
def params(trained):
    return registered_copy(trained, "gates-models", batch_size=2, overlay_size=64)


def _params_file(params, path: Path, **paths) -> Path:
    data = params.model_dump(mode="json", by_alias=True)
    data["paths"]["roots"] = list(data["paths"]["roots"]) + [str(path.parent)]
    data["paths"].update({k: str(v) for k, v in paths.items()})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _copy(sources, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for src in sources:
        shutil.copyfile(src, folder / src.name)  # copyfile: writable copies of the read-only shared data
    return folder


def _score(params, input_dir, out_dir):
    from tasks.scoring.run import score_studies

    return score_studies(params, input_dir, out_dir)


# --------------------------------------------------------------------------- registry


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight
    path.write_bytes(bytes(data))


def _models_copy(params, models: Path):
    """`params` on a private copy of its models folder (registry, bundle and working weights)."""
    shutil.copytree(params.paths.models, models)
    return params.model_copy(update={"paths": params.paths.model_copy(
        update={"models": models, "roots": (*params.paths.roots, models.parent)})})


def test_cli_refuses_a_changed_bundle_and_writes_nothing(params, tmp_path, prefect_server):
    from tasks.bundle.registry import resolve_digest

    models = tmp_path / "models"
    shutil.copytree(params.paths.models, models)  # registry.json included: registered, then changed
    digest = resolve_digest(models)
    _flip_a_bit(models / digest / "local.safetensors")
    out = tmp_path / "out"
    result = run_cxr("--params", str(_params_file(params, tmp_path / "p.yaml", models=models)), "score",
                     "--input", str(STUDIES), "--out", str(out))
    err = result.stderr.replace("\n", " ")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the model bundle's local.safetensors do not match the digests in its manifest" in err
    assert "refusing to use weights that are not the registered ones" in err and digest in err  # names the folder
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_an_incomplete_bundle_is_refused_before_anything_is_written(params, tmp_path):
    from tasks.bundle.ood_gate import GATE_FILE
    from tasks.bundle.registry import resolve_digest
    from tasks.scoring.scorer import Scorer

    own = _models_copy(params, tmp_path / "models")
    digest = resolve_digest(own.paths.models)
    (own.paths.models / digest / GATE_FILE).unlink()
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"the model bundle is incomplete: {GATE_FILE} missing"):
        _score(own, STUDIES, out)
    assert not out.exists()
    with pytest.raises(DataError, match="incomplete"):
        Scorer.load(own)  # the app's and the shards' way in: the same refusal


def test_changed_working_weights_do_not_change_what_scoring_uses(params, tmp_path):
    """paths.models/*.safetensors are training outputs; scoring reads only the current bundle."""
    from tasks.bundle.registry import resolve_digest
    from tasks.bundle.weights import model_digest

    own = _models_copy(params, tmp_path / "models")
    digest = resolve_digest(own.paths.models)
    _flip_a_bit(own.paths.models / "local.safetensors")  # the working copy, not the bundle's
    assert model_digest(own.paths.models) != digest
    changed = _score(own, STUDIES, tmp_path / "changed")
    reference = _score(params, STUDIES, tmp_path / "reference")
    assert changed["model_digest"] == reference["model_digest"] == digest
    assert changed["scored"] == reference["scored"] == 2
    a, b = (pd.read_parquet(tmp_path / name / "scores.parquet").set_index("study_id").sort_index()
            for name in ("changed", "reference"))
    assert (a["model_digest"] == digest).all()
    np.testing.assert_array_equal(a[list(LABEL_COLUMNS)].to_numpy(), b[list(LABEL_COLUMNS)].to_numpy())


# --------------------------------------------------------------------------- manifest gate


def test_links_outside_the_input_and_bad_sizes_are_rejected_unread(params, tmp_path, monkeypatch):
    import tasks.scoring.studies as studies

    small, large = sorted(NIH_IMAGES[:2], key=lambda p: p.stat().st_size)
    assert small.stat().st_size < large.stat().st_size
    inputs = _copy([small, large], tmp_path / "in")
    (inputs / "host.png").symlink_to("/etc/hostname")
    (inputs / "gone.png").symlink_to(inputs / "nowhere.png")
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "sub").mkdir()
    (inputs / "sub" / "inside_link.png").symlink_to(inputs / small.name)  # a link that stays inside is fine

    opened = []
    real_sha = studies.file_sha256
    monkeypatch.setattr(studies, "file_sha256", lambda p: opened.append(Path(p).name) or real_sha(p))
    limited = params.model_copy(update={"score": params.score.model_copy(update={"max_bytes": small.stat().st_size})})
    out = tmp_path / "out"
    summary = _score(limited, inputs, out)

    df = pd.read_parquet(out / "scores.parquet").set_index("study_id")
    assert df.loc["host.png", "status"] == "rejected" and df.loc["host.png", "reason"] == "resolves outside the input folder"
    assert pd.isna(df.loc["host.png", "sha256"])
    assert "file not found" in df.loc["gone.png", "reason"]
    assert df.loc["empty.png", "reason"] == "empty file"
    assert "over the limit" in df.loc[large.name, "reason"] and "score.max_bytes" in df.loc[large.name, "reason"]
    assert df.loc[small.name, "status"] == "scored"
    # The inside link has the same bytes as small.png: one study, counted as a duplicate.
    assert summary["duplicates_in_input"] == 1 and summary["scored"] == 1 and summary["rejected"] == 4
    # Refused files are never opened, not even to hash them.
    assert sorted(opened) == sorted([small.name, "inside_link.png"])

    result = json.loads((out / "validation" / "score_manifest_validation.json").read_text())
    failed = {r["expectation_config"]["description"]: r["result"]["unexpected_count"]
              for r in result["results"] if not r["success"]}
    assert failed == {"resolves outside the input folder": 1, "file not present": 1,
                      "file size not within 1 byte and score.max_bytes": 2}
    assert (out / "validation" / "data_docs" / "index.html").exists()
    assert (out / "validation" / "scores_validation.json").exists()


def test_manifest_that_cannot_be_keyed_stops_the_run(params, tmp_path):
    inputs = _copy(NIH_IMAGES[:1], tmp_path / "in")
    shutil.copyfile(NIH_IMAGES[1], inputs / "a b.png")
    shutil.copyfile(NIH_IMAGES[2], inputs / "a_b.png")  # same output name as "a b.png"
    out = tmp_path / "out"
    with pytest.raises(DataError, match="two studies would write the same output files: a_b.png"):
        _score(params, inputs, out)
    assert (out / "validation" / "score_manifest_validation.json").exists()
    assert not (out / "scores.parquet").exists() and not (out / "parts").exists() and not (out / "studies").exists()


# --------------------------------------------------------------------------- scores gate


def _cli(*args: str) -> tuple[int, str, str]:
    """`cxr` in this process (so monkeypatches apply): exit code, stdout, stderr."""
    from cxr.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_nan_scores_publish_nothing_and_keep_the_last_good_report(params, tmp_path, monkeypatch, prefect_server):
    import flows.score  # noqa: F401  Prefect binds its log handlers to the streams of its first import: not ours
    import tasks.scoring.run as score

    params_file = _params_file(params, tmp_path / "p.yaml")
    out = tmp_path / "out"
    first = _copy(NIH_IMAGES[:2], tmp_path / "first")
    assert _cli("--params", str(params_file), "score", "--input", str(first), "--out", str(out))[0] == 0
    kept = {name: (out / name).read_bytes() for name in ("report.html", "scores.parquet")}

    real, batches = score.Scorer.infer, []

    def nan_in_first_batch(self, studies, run_id):
        # Decided on entry: a run has two batches in its forward at once (two threads).
        batches.append(studies)
        first = batches[0] is studies
        scored = real(self, studies, run_id)
        if first:
            scored[0].row["cardiomegaly"] = np.nan
        return scored

    monkeypatch.setattr(score.Scorer, "infer", nan_in_first_batch)
    new = _copy(NIH_IMAGES[2:6], tmp_path / "second")  # 4 new studies: two batches of 2
    code, _, err = _cli("--params", str(params_file), "score", "--input", str(new), "--out", str(out))
    err = err.replace("\n", " ")
    assert code == 2, err
    assert "probability cardiomegaly is NaN for a scored study" in err and "nothing was published" in err
    assert "Traceback" not in err and len(batches) == 2
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert not list((out / "parts").glob("*"))
    assert not [p for p in (out / "studies").glob("*.json") if p.stem in {f.name for f in new.iterdir()}]
    assert not (json.loads((out / "validation" / "scores_validation.json").read_text())["success"])

    # The discarded studies are scored again by the next (healthy) run.
    monkeypatch.setattr(score.Scorer, "infer", real)
    code, stdout, err = _cli("--params", str(params_file), "score", "--input", str(new), "--out", str(out))
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["scored"] == 4 and summary["already_scored"] == 0
    assert (out / "report.html").read_bytes() != kept["report.html"]


def test_scores_gate_names_out_of_range_and_duplicate_rows(tmp_path):
    from tasks.scoring.gates import validate_scores

    rows = pd.DataFrame({"study_id": ["a.png", "b.png", "c.png"], "model_digest": ["m"] * 3,
                         "status": ["scored", "scored", "rejected"], "key": ["s1|m", "s1|m", "path:c|m"],
                         **{c: [0.5, 0.5, np.nan] for c in LABEL_COLUMNS}})
    rows.loc[1, "edema"] = 1.5
    with pytest.raises(DataError) as info:
        validate_scores(rows, tmp_path)
    text = str(info.value)
    assert "more than one row per (study sha256, model digest): s1|m (a.png, b.png)" in text
    assert "probability edema outside [0, 1]: 1.5 (b.png)" in text
    assert "NaN" not in text  # a rejected row has no probabilities, and that is fine
    rows.loc[1, ["edema", "key"]] = [0.9, "s2|m"]
    assert validate_scores(rows, tmp_path)["success"]


# --------------------------------------------------------------------------- retries


def test_tasks_retry_transient_io_but_not_bad_data(prefect_server):
    from prefect import flow

    from tasks.prefect_tasks import _task

    calls = {"io": 0, "data": 0}

    @_task("flaky-io")
    def flaky_io():
        calls["io"] += 1
        if calls["io"] == 1:
            raise OSError("stale NFS handle")
        return "ok"

    @_task("bad-data")
    def bad_data():
        calls["data"] += 1
        raise DataError("corrupt file", where="x.png")

    @flow(name="retry-probe")
    def probe(task):
        return task()

    assert probe(flaky_io) == "ok" and calls["io"] == 2  # retried once, then completed
    with pytest.raises(DataError, match="corrupt file"):
        probe(bad_data)
    assert calls["data"] == 1  # bad data is not retried: it would only fail the same way


def test_score_gate_data_docs_are_rebuilt_only_when_the_outcome_changes(tmp_path):
    from tasks.scoring.gates import validate_scores

    def rows(n: int, bad: bool = False) -> pd.DataFrame:
        frame = pd.DataFrame({"study_id": [f"s{i}.png" for i in range(n)], "model_digest": ["m"] * n,
                              "status": ["scored"] * n, "key": [f"k{i}|m" for i in range(n)],
                              **{c: np.linspace(0, 1, n) for c in LABEL_COLUMNS}})
        if bad:
            frame.loc[0, "edema"] = 2.0
        return frame

    index = tmp_path / "data_docs" / "index.html"
    validate_scores(rows(5), tmp_path, docs="changed")
    built = index.stat().st_mtime_ns
    validate_scores(rows(7), tmp_path, docs="changed")  # more rows, same outcome: the pages stand
    assert index.stat().st_mtime_ns == built
    assert json.loads((tmp_path / "scores_validation.json").read_text())["statistics"]["evaluated_expectations"] > 0
    with pytest.raises(DataError, match="outside"):
        validate_scores(rows(7, bad=True), tmp_path, docs="changed")  # a new outcome: rebuilt
    rebuilt = index.stat().st_mtime_ns
    assert rebuilt != built
    validate_scores(rows(7), tmp_path, docs="always")  # on request: rebuilt whatever the outcome
    assert index.stat().st_mtime_ns != rebuilt


def test_a_passing_manifest_gate_leaves_its_data_docs_to_the_scores_gates_build(tmp_path):
    """One Data Docs build a run: the manifest's pages come with the scores gate's build; a
    failing manifest gate, which stops the run, builds its pages at once."""
    from tasks.scoring.gates import validate_score_manifest, validate_scores

    def manifest(ids) -> pd.DataFrame:
        return pd.DataFrame({"study_id": ids, "path": [f"/in/{i}" for i in ids], "size_bytes": [10] * len(ids),
                             "output_name": ids, "inside": [True] * len(ids)})

    scores = pd.DataFrame({"study_id": ["a.png"], "model_digest": ["m"], "status": ["scored"], "key": ["k|m"],
                           **{c: [0.5] for c in LABEL_COLUMNS}})
    run = tmp_path / "run"
    validate_score_manifest(manifest(["a.png"]), 100, run, docs="deferred")
    assert (run / "score_manifest_validation.json").is_file() and not (run / "data_docs").exists()
    validate_scores(scores, run, docs="changed")
    pages = {p.name for p in (run / "data_docs").rglob("*.html")}
    index = (run / "data_docs" / "index.html").read_text()
    assert "score_manifest" in index and "scores" in index and len(pages) >= 3, pages

    failing = tmp_path / "failing"
    with pytest.raises(DataError, match="study_id not unique"):
        validate_score_manifest(manifest(["a.png", "a.png"]), 100, failing, docs="deferred")
    assert "score_manifest" in (failing / "data_docs" / "index.html").read_text()
