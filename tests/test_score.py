"""`cxr score`: real studies, the bad corpus, incremental reruns, killed runs, thresholds, report, artifacts."""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cxr.core.errors import DataError
from cxr.core.labels import LABEL_COLUMNS
from tests.conftest import NIH_SAMPLE, ROOT, STUDIES, VENV_BIN, registered_copy, run_cxr
from tests.data.make_bad_corpus import make_bad_corpus


@pytest.fixture(scope="module")
def params(trained):
    """The trained params with a private, registered copy of the models (its bundle holds the thresholds)."""
    return registered_copy(trained, "score-models", batch_size=4, overlay_size=128)


@pytest.fixture(scope="module")
def nih_inputs(tmp_path_factory) -> Path:
    """24 distinct real (64 px) radiographs: enough batches to interrupt a run."""
    folder = tmp_path_factory.mktemp("nih-inputs")
    for src in sorted((NIH_SAMPLE / "images").glob("*.png"))[:24]:
        shutil.copy(src, folder / src.name)
    return folder


def _score(params, input_dir, out_dir, **kw):
    from tasks.scoring.run import score_studies

    return score_studies(params, input_dir, out_dir, **kw)


@pytest.fixture(scope="module")
def clean_nih(params, nih_inputs, tmp_path_factory) -> pd.DataFrame:
    """Scores of one uninterrupted run over `nih_inputs`: what every resumed run must equal."""
    out = tmp_path_factory.mktemp("clean")
    _score(params, nih_inputs, out)
    return _scores(out)


def _scores(out_dir) -> pd.DataFrame:
    return pd.read_parquet(Path(out_dir) / "scores.parquet")


def _write_params(params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return path


def test_real_studies_are_scored_with_sensible_outputs(params, tmp_path):
    from tasks.images.loader import load_image_uint8
    from tasks.scoring.report import NOT_A_DEVICE, write_report
    from tasks.images.geometry import network_pixels_from_image as network_pixels
    from tasks.images.loader import load_image

    out = tmp_path / "out"
    summary = _score(params, STUDIES, out)
    write_report(out, summary)
    df = _scores(out).set_index("study_id")
    assert set(df.index) == {"00000001_000.png", "Fake_MONOHR1.dcm"} and (df["status"] == "scored").all()
    assert summary["message"] == "2 new studies; 0 already scored by this model"
    probs = df[list(LABEL_COLUMNS)].to_numpy()
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    for sid, side in (("00000001_000.png", 512), ("Fake_MONOHR1.dcm", 1024)):
        row = df.loc[sid]
        assert (row.image_height, row.image_width) == (side, side)
        # The box is in the original image's pixels: inside it, and scaled up from the 64-px input.
        assert 0 <= row.box_y0 <= row.box_y1 < side and 0 <= row.box_x0 <= row.box_x1 < side
        assert row.box_y1 - row.box_y0 + 1 >= side // 64
        facts = json.loads((out / row.json).read_text())
        assert facts["sha256"] == row.sha256 and facts["model_digest"] == summary["model_digest"]
        assert set(facts["probabilities"]) >= {"Cardiomegaly", "Hernia"} and facts["attention_box"]["y1"] == row.box_y1
        overlay = Image.open(out / row.overlay)
        assert overlay.format == "JPEG" and overlay.width == (1 + params.score.top_findings) * 128  # one panel per top finding
    # Scoring resizes exactly as the training loader does.
    path = STUDIES / "00000001_000.png"
    assert np.array_equal(network_pixels(load_image(path), params.model), load_image_uint8(path, 64))
    page = (out / "report.html").read_text()
    assert html.escape(NOT_A_DEVICE) in page and summary["model_digest"] in page and summary["data_version"] in page
    assert summary["backbone"] == "resnet18" and len(summary["training_data_version"]) == 64
    assert summary["training_data_version"] in page and "backbone resnet18" in page

    again = _score(params, STUDIES, out)
    write_report(out, again)
    assert again["message"] == "0 new studies; 2 already scored by this model" and again["scored"] == 0
    assert len(_scores(out)) == 2
    assert "0 new studies; 2 already scored by this model" in (out / "report.html").read_text()


def _with_score(params, **update):
    return params.model_copy(update={"score": params.score.model_copy(update=update)})


def test_bad_corpus_each_file_scored_or_rejected_with_its_reason(params, tmp_path):
    from tasks.scoring.report import write_report

    corpus = tmp_path / "corpus"
    manifest = make_bad_corpus(corpus)
    out = tmp_path / "out"
    # The corpus's decodable files are small made-up pictures, not radiographs: this test is
    # about the loader, so the out-of-distribution checks are off (tested on their own below).
    summary = _score(_with_score(params, ood="off"), corpus, out)
    write_report(out, summary)
    df = _scores(out).set_index("study_id")
    # Same bytes under two names (photo.jpg / jpeg_named.png, gray8.png / png_named.jpg) are one
    # study, scored once under the first name.
    assert summary["duplicates_in_input"] == 2 and {"png_named.jpg", "photo.jpg"}.isdisjoint(df.index)
    for name, expected in manifest.items():
        if name in ("png_named.jpg", "photo.jpg"):
            continue
        row = df.loc[name]
        if expected == "ok":
            assert row.status == "scored", (name, row.reason)
            assert (row.image_height, row.image_width) == (48, 64) and row.box_y1 < 48 and row.box_x1 < 64
        else:
            assert row.status == "rejected" and expected in row.reason, (name, row.reason)
    # manifest.json itself is in the folder: not an image, rejected, the batch goes on.
    assert "not an image" in df.loc["manifest.json", "reason"]
    page = (out / "report.html").read_text()
    for name in ("empty.png", "ct.dcm"):
        assert html.escape(df.loc[name, "reason"], quote=True) in page
    scored = [n for n, e in manifest.items() if e == "ok" and n not in ("png_named.jpg", "photo.jpg")]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(f"{n}.jpg" for n in scored)
    assert len(list((out / "studies").glob("*.json"))) == len(manifest) + 1 - 2


def test_thresholds_rule_and_fallback():
    from tasks.bundle.thresholds import operating_thresholds

    y = np.array([[0, 0], [0, 0], [1, 0], [0, 0], [1, 0], [1, 0]], dtype=float)
    p = np.array([[0.1, 0.9], [0.4, 0.1], [0.35, 0.2], [0.5, 0.3], [0.7, 0.4], [0.9, 0.5]])
    youden = operating_thresholds(y, p, "youden")
    # At 0.7: TPR 2/3, FPR 0 (J 2/3); at 0.35: TPR 1, FPR 2/3 (J 1/3).
    assert youden[0]["source"] == "youden" and youden[0]["threshold"] == pytest.approx(0.7)
    assert youden[1] == {"threshold": 0.5, "source": "fallback: no positives in the validation split"}
    sens = operating_thresholds(y, p, "sensitivity", target_sensitivity=1.0)
    assert sens[0]["threshold"] == pytest.approx(0.35) and sens[0]["valid_sensitivity"] == 1.0
    assert operating_thresholds(y, p, "sensitivity", target_sensitivity=0.6)[0]["threshold"] == pytest.approx(0.7)


def test_thresholds_are_fitted_at_registration_and_kept_per_rule(params, tmp_path):
    import torch

    from cxr.core.labels import PATHOLOGIES
    from tasks.bundle.registry import load_bundle
    from tasks.bundle.thresholds import operating_thresholds, rule_key
    from tasks.scoring.scorer import Scorer
    from tasks.training.registration import refit_thresholds, validation_predictions

    # A private copy: refitting rewrites the bundle's manifest.
    models = tmp_path / "models"
    shutil.copytree(params.paths.models, models)
    own = params.model_copy(update={"paths": params.paths.model_copy(
        update={"models": models, "roots": (*params.paths.roots, tmp_path)})})
    bundle = load_bundle(models)
    s = own.score
    youden = rule_key(s)
    assert youden == "youden" and list(bundle.manifest["thresholds"]) == [youden]  # fitted when registered
    entry = bundle.manifest["thresholds"][youden]
    # Thresholds are chosen on the bundle's calibrated scale (tasks.bundle.calibration).
    y, p, version = validation_predictions(own, bundle.agcnn(), torch.device("cpu"), bundle.calibration())
    assert entry["rule"] == youden and entry["data_version"] == version and entry["valid_images"] == len(y) > 0
    assert list(entry["classes"]) == list(PATHOLOGIES)
    assert [entry["classes"][c] for c in PATHOLOGIES] == operating_thresholds(
        y, p, "youden", s.target_sensitivity, s.fallback_threshold)
    scorer = Scorer.load(own)
    assert scorer.threshold_entry == entry
    assert scorer.thresholds.tolist() == np.float32([entry["classes"][c]["threshold"] for c in PATHOLOGIES]).tolist()

    # Another rule: `cxr models thresholds DIGEST` adds its key and keeps the first one.
    sens = _with_score(own, threshold_rule="sensitivity")
    with pytest.raises(DataError, match="no thresholds for the rule sensitivity@0.90"):
        Scorer.load(sens)  # not fitted yet: refused, never a silent fallback
    result = run_cxr("--params", str(_write_params(sens, tmp_path / "sens.yaml")), "models", "thresholds",
                     bundle.digest[:12])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"digest": bundle.digest, "thresholds": ["sensitivity@0.90", "youden"]}
    after = load_bundle(models).manifest
    assert after["thresholds"]["youden"] == entry
    fitted = after["thresholds"]["sensitivity@0.90"]
    assert fitted["rule"] == "sensitivity@0.90" and fitted["data_version"] == version
    assert [fitted["classes"][c] for c in PATHOLOGIES] == operating_thresholds(
        y, p, "sensitivity", 0.9, s.fallback_threshold)
    assert Scorer.load(sens).threshold_entry == fitted
    # In-process, a third rule: the earlier two stay as they were.
    third = refit_thresholds(_with_score(own, threshold_rule="sensitivity", target_sensitivity=0.75), bundle.digest)
    assert sorted(third.manifest["thresholds"]) == ["sensitivity@0.75", "sensitivity@0.90", "youden"]
    assert third.manifest["thresholds"]["youden"] == entry and third.manifest["thresholds"]["sensitivity@0.90"] == fitted
    assert load_bundle(models).manifest == third.manifest  # written, and the bundle still verifies


def test_stopped_run_resumes_without_duplicates_or_losses(params, nih_inputs, clean_nih, tmp_path):
    out = tmp_path / "out"
    partial = _score(params, nih_inputs, out, stop_after_batches=2)
    assert partial["stopped_after_batches"] == 2 and len(list((out / "parts").glob("part-*.parquet"))) == 2
    assert not (out / "scores.parquet").exists()
    rest = _score(params, nih_inputs, out)
    assert rest["scored"] == 24 - 8 and rest["already_scored"] == 8
    assert not list((out / "parts").glob("*"))
    _assert_same_as_clean(_scores(out), clean_nih)


def _assert_same_as_clean(df: pd.DataFrame, clean: pd.DataFrame) -> None:
    assert not df["sha256"].duplicated().any() and len(df) == len(clean)
    df, clean = df.set_index("sha256").sort_index(), clean.set_index("sha256").sort_index()
    assert list(df.index) == list(clean.index) and (df["status"] == clean["status"]).all()
    np.testing.assert_allclose(df[list(LABEL_COLUMNS)], clean[list(LABEL_COLUMNS)], atol=1e-5)
    assert (df[["box_y0", "box_x0", "box_y1", "box_x1"]] == clean[["box_y0", "box_x0", "box_y1", "box_x1"]]).all().all()


def test_cli_killed_midway_then_rerun_finishes_cleanly(params, nih_inputs, clean_nih, tmp_path, prefect_server):
    params_file = _write_params(params.model_copy(update={"score": params.score.model_copy(update={"batch_size": 2})}),
                                tmp_path / "params.yaml")
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen([str(VENV_BIN / "cxr"), "--params", str(params_file), "score", "--input", str(nih_inputs),
                             "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "parts").glob("part-*.parquet")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before writing a part"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "scores.parquet").exists()
    done_before = len(pd.concat(pd.read_parquet(p) for p in (out / "parts").glob("part-*.parquet")))
    assert 0 < done_before < 24

    result = run_cxr("--params", str(params_file), "score", "--input", str(nih_inputs), "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["already_scored"] == done_before and summary["scored"] == 24 - done_before
    _assert_same_as_clean(_scores(out), clean_nih)


def test_flow_publishes_artifacts_to_prefect(params, tmp_path, prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.score import score_flow

    summary = score_flow(params, STUDIES, tmp_path / "out")
    assert Path(summary["report"]).exists() and "studies" not in summary

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[summary["flow_run_id"]])))

    found = {a.key: a for a in asyncio.run(artifacts())}
    assert {"cxr-score-table", "cxr-score-report", "cxr-score-summary"} <= set(found)
    table = found["cxr-score-table"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert {r["study_id"] for r in table} == {"00000001_000.png", "Fake_MONOHR1.dcm"}
    assert "report.html" in found["cxr-score-report"].data
    assert summary["message"] in found["cxr-score-summary"].data


def test_bad_batch_inputs_are_data_errors(params, tmp_path, prefect_server):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not found"):
        _score(params, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(DataError, match="no files"):
        _score(params, empty, tmp_path / "out")
    no_models = params.model_copy(update={"paths": params.paths.model_copy(update={"models": tmp_path / "none"})})
    with pytest.raises(DataError, match="no registered model; train the fusion stage"):
        _score(no_models, STUDIES, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    result = run_cxr("--params", str(_write_params(params, tmp_path / "p.yaml")), "score", "--input", str(empty),
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "no files to score" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- the Scorer, OOD columns, the pipeline


def _colour_photo(path: Path) -> Path:
    """A colour picture (a sunset-like gradient with a disc): decodable, but not a radiograph."""
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    rgb = np.stack([0.9 - 0.3 * yy, 0.3 + 0.4 * yy * xx, 0.8 * yy], axis=-1)
    rgb[(yy - 0.35) ** 2 + (xx - 0.6) ** 2 < 0.02] = (1.0, 0.85, 0.1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


def test_rows_and_json_carry_the_ood_verdict_and_branch_probabilities(params, tmp_path):
    import pyarrow.parquet as pq

    from tasks.bundle.ood_gate import OOD_PREFIX
    from tasks.scoring.scorer import Scorer

    inputs = tmp_path / "in"
    shutil.copytree(STUDIES, inputs)
    _colour_photo(inputs / "sunset.png")
    out = tmp_path / "out"
    _score(params, inputs, out)
    schema = pq.read_schema(out / "scores.parquet")
    assert str(schema.field("ood_score").type) == "float" and str(schema.field("ood_flag").type) == "bool"
    df = _scores(out).set_index("study_id")
    gate = Scorer.load(params).gate
    assert gate is not None  # registering the model fits its gate
    photo = df.loc["sunset.png"]
    assert photo.status == "rejected" and photo.reason.startswith(OOD_PREFIX) and "colour" in photo.reason
    assert bool(photo.ood_flag) and pd.isna(photo.overlay)
    for sid in ("00000001_000.png", "Fake_MONOHR1.dcm"):
        row = df.loc[sid]
        assert row.status == "scored" and np.isfinite(row.ood_score) and row.ood_score >= 0
        assert bool(row.ood_flag) == (row.ood_score > gate.threshold)  # score.ood "flag": scored and marked
        facts = json.loads((out / row.json).read_text())
        assert facts["ood"]["score"] == pytest.approx(row.ood_score, rel=1e-6) and facts["ood"]["flag"] == row.ood_flag
        assert facts["ood"]["mode"] == params.score.ood and facts["ood"]["threshold"] == pytest.approx(gate.threshold)
        branches = facts["branch_probabilities"]
        assert set(branches) == {"global", "local", "fusion"} and all(len(b) == 14 for b in branches.values())
        assert branches["fusion"]["Cardiomegaly"] == pytest.approx(facts["probabilities"]["Cardiomegaly"], abs=1e-6)
    photo_json = json.loads((out / photo.json).read_text())
    assert photo_json["branch_probabilities"] is None and photo_json["ood"]["flag"] is True


def test_scorer_api_and_gate_modes(params, tmp_path, monkeypatch):
    import dataclasses

    from tasks.bundle.ood_gate import OOD_PREFIX
    from tasks.bundle.registry import load_bundle
    from tasks.scoring.scorer import Scorer

    scorer = Scorer.load(params)
    assert Scorer.load(params) is scorer  # loaded once per process
    bundle = load_bundle(params.paths.models)
    assert scorer.digest == bundle.digest and scorer.entry == bundle.manifest and scorer.geometry == bundle.model
    items = [("nih.png", STUDIES / "00000001_000.png"), ("mono1.dcm", STUDIES / "Fake_MONOHR1.dcm"),
             ("broken.png", _broken(tmp_path / "broken.png"))]
    nih, mono, broken = scorer.score(items, "run-1")
    assert broken.row["status"] == "rejected" and broken.probabilities is None and broken.display is None
    assert broken.row["ood_flag"] is None and broken.row["ood_score"] is None  # never decoded: never checked
    L = params.model.local_size
    for study in (nih, mono):
        assert study.row["status"] == "scored" and set(study.probabilities) == {"global", "local", "fusion"}
        assert all(p.shape == (14,) and p.dtype == np.float32 for p in study.probabilities.values())
        h, w = study.display.shape
        assert max(h, w) == params.score.overlay_size and study.display.dtype == np.float32
        y0, x0, y1, x1 = study.display_box
        assert 0 <= y0 <= y1 < h and 0 <= x0 <= x1 < w
        assert study.cams.shape == (14, h, w) and 0 <= study.cams.min() and study.cams.max() <= 1
        assert study.crop.shape == (L, L) and study.crop.dtype == np.uint8
    assert not list(tmp_path.glob("*.json"))  # score() writes nothing

    # Force the real gate's verdict by lowering its threshold below every study.
    # (monkeypatch: the cached Scorer is this process's, and later tests load it again.)
    monkeypatch.setattr(scorer, "gate", dataclasses.replace(scorer.gate, threshold=-1.0))
    monkeypatch.setattr(scorer, "ood_mode", "reject")
    refused = scorer.score(items[:1], "run-2")[0]
    assert refused.row["status"] == "rejected" and refused.row["reason"] == scorer.gate.reason(refused.row["ood_score"])
    assert refused.row["reason"].startswith(OOD_PREFIX) and refused.row["ood_flag"] is True
    monkeypatch.setattr(scorer, "ood_mode", "flag")
    flagged = scorer.score(items[:1], "run-3")[0]
    assert flagged.row["status"] == "scored" and flagged.row["ood_flag"] is True
    assert flagged.row["reason"].startswith(OOD_PREFIX)
    monkeypatch.setattr(scorer, "ood_mode", "off")
    plain = scorer.score(items[:1], "run-4")[0]
    assert plain.row["status"] == "scored" and plain.row["ood_flag"] is None and plain.row["reason"] is None
    np.testing.assert_allclose(plain.probabilities["fusion"], nih.probabilities["fusion"], atol=1e-6)

    scorer.write(tmp_path / "out", plain)
    facts = json.loads((tmp_path / "out" / plain.row["json"]).read_text())
    assert facts["study_id"] == "nih.png" and (tmp_path / "out" / plain.row["overlay"]).is_file()


def _broken(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    return path


def test_a_failed_write_leaves_no_half_output_and_the_rerun_completes(params, nih_inputs, clean_nih, tmp_path,
                                                                       monkeypatch):
    import tasks.scoring.scorer as score

    failing = sorted(p.name for p in nih_inputs.iterdir())[9]  # the third batch of 4
    real_write = score.atomic_write_bytes

    def disk_full_on_one_study(path, data, **kw):
        if Path(path).name == f"{failing}.jpg" and "overlays" in Path(path).parts:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data, **kw)

    monkeypatch.setattr(score, "atomic_write_bytes", disk_full_on_one_study)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        _score(params, nih_inputs, out)
    assert not (out / "scores.parquet").exists() and not list(out.rglob("*.tmp"))
    parts = sorted((out / "parts").glob("part-*.parquet"))
    assert len(parts) == 2  # the batches before the failing one, committed in order
    for row in pd.concat(pd.read_parquet(p) for p in parts).itertuples():
        assert all((out / f).is_file() for f in (row.json, row.overlay, row.thumbnail))
    assert not (out / "studies" / f"{failing}.json").exists() and not (out / "overlays" / f"{failing}.jpg").exists()

    monkeypatch.setattr(score, "atomic_write_bytes", real_write)
    rest = _score(params, nih_inputs, out)
    assert rest["already_scored"] == 8 and rest["scored"] == 16
    _assert_same_as_clean(_scores(out), clean_nih)


def test_a_cpu_run_keeps_two_single_thread_forwards_in_flight(monkeypatch):
    """On a CPU the batch run's forwards go two at a time, each thread with its share of the
    intra-op threads (set per thread: the caller keeps its own); on an accelerator, one."""
    import torch

    from tasks.scoring import scorer as scoring

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    own = torch.get_num_threads()
    with monkeypatch.context() as m:
        for threads, expected in ((1, (1, 1)), (2, (2, 1)), (3, (2, 1)), (16, (2, 8))):
            m.setattr(scoring.torch, "get_num_threads", lambda t=threads: t)
            assert scoring.forward_streams(cpu) == expected
            assert scoring.forward_streams(cuda) == (1, threads)
    pool, streams = scoring.forward_pool(cpu)
    with pool:
        seen = {pool.submit(torch.get_num_threads).result() for _ in range(8)}
    assert seen == {scoring.forward_streams(cpu)[1]} and torch.get_num_threads() == own


def test_study_json_is_strict_json_and_says_what_the_row_says():
    """The per-study JSON (orjson) holds the row's facts as the standard library would write
    them, numpy numbers as numbers, and a NaN as null: JSON has no NaN."""
    from datetime import datetime, timezone

    from tasks.scoring.rows import SCHEMA, ScoredStudy, study_json, study_json_bytes

    row = dict.fromkeys(SCHEMA.names)
    row.update(study_id="a b/é.png", status="scored", scored_at=datetime(2026, 12, 7, 13, 0, tzinfo=timezone.utc),
               box_y0=1, box_x0=2, box_y1=30, box_x1=40, ood_score=np.float64(0.5), ood_flag=False)
    row.update(zip(LABEL_COLUMNS, [float("nan"), np.float32(0.25), *[0.125] * (len(LABEL_COLUMNS) - 2)]))
    study = ScoredStudy(row, {b: np.full(len(LABEL_COLUMNS), 0.5, np.float32) for b in ("global", "local", "fusion")},
                        ood={"method": "m"})
    text = study_json_bytes(study).decode("utf-8")
    refuse = lambda constant: pytest.fail(f"{constant} is not JSON")  # noqa: E731
    facts = json.loads(text, parse_constant=refuse)
    assert text.endswith("}\n") and text.startswith("{\n  ")  # indented, one file one object
    expected = json.loads(json.dumps(study_json(study), default=float).replace("NaN", "null"))
    assert facts == expected
    first, second = list(facts["probabilities"].values())[:2]
    assert first is None and second == 0.25
    assert facts["scored_at"] == "2026-12-07T13:00:00+00:00" and facts["study_id"] == "a b/é.png"
    assert facts["branch_probabilities"]["fusion"][next(iter(facts["probabilities"]))] == 0.5
