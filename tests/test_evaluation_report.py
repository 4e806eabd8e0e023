"""The evaluation as evidence: BCa intervals with counts (tasks.evaluation.intervals), the
calibration (tasks.bundle.calibration) fitted at registration and applied by the Scorer, the
two-part out-of-distribution gate against real films under a synthetic training set, and
`evaluate`'s figures, subgroups, expert labels and model card on the session's trained model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxr.core.labels import PATHOLOGIES
from tasks.bundle import calibration as cal
from tasks.bundle import ood_gate
from tasks.evaluation import intervals as iv
from tests.conftest import NIH_SAMPLE
from tests.evaluation_helpers import evaluated

PNG = b"\x89PNG\r\n\x1a\n"


def test_auroc_intervals_say_n_and_leave_out_what_cannot_be_estimated():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 14)) < np.linspace(0.02, 0.4, 14)).astype(float)
    y[:, 0] = 0  # no positives at all
    y[:, 1] = 0
    y[:3, 1] = 1  # three positives
    p = np.clip(y * 0.3 + rng.random(y.shape) * 0.7, 0, 1)
    ours = iv.auroc_columns(y, p)
    assert np.isnan(ours[0])
    np.testing.assert_allclose(ours[1:], [roc_auc_score(y[:, k], p[:, k]) for k in range(1, 14)])
    none = iv.class_auroc(y[:, 0], p[:, 0], 200, 1)
    assert none["auroc"] is None and none["ci95"] is None and none["positives"] == 0 and "no positives" in none["interval"]
    few = iv.class_auroc(y[:, 1], p[:, 1], 200, 1)
    assert few["auroc"] == pytest.approx(ours[1], abs=1e-4) and few["ci95"] is None and few["positives"] == 3
    many = iv.class_auroc(y[:, 13], p[:, 13], 300, 1)
    lo, hi = many["ci95"]
    assert lo < many["auroc"] < hi and hi - lo < 0.25 and many["interval"].startswith("BCa")
    # The mean's interval resamples images; the paired difference of a branch with itself is 0.
    mean = iv.mean_auroc(y, p, 200, 2)
    assert mean["mean_auroc"] == pytest.approx(np.nanmean(ours), abs=1e-4)
    assert mean["mean_auroc_ci95"][0] < mean["mean_auroc"] < mean["mean_auroc_ci95"][1]
    same = iv.paired_difference(y, p, p, 50, 3)["mean_auroc"]
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and not same["worse"]
    worse = iv.paired_difference(y, rng.random(y.shape), p, 200, 3)["mean_auroc"]
    assert worse["worse"] and worse["ci95"][1] < 0


def test_platt_calibration_fixes_a_shifted_intercept_and_keeps_the_ranking():
    rng = np.random.default_rng(4)
    n = 2000
    truth = rng.normal(size=(n, 14))
    y = (rng.random((n, 14)) < 1 / (1 + np.exp(-(truth - 2.5)))).astype(float)
    y[:, 13] = 0  # a class the split cannot judge keeps the identity
    raw = 1 / (1 + np.exp(-(truth * 0.6 + 0.5)))  # a weighted loss: too high, too flat
    entry = cal.fit_calibration(y, {"fusion": raw})
    c = cal.Calibration.from_manifest(entry)
    after = c.apply("fusion", raw)
    for k in range(13):
        assert cal.expected_calibration_error(y[:, k], after[:, k]) < 0.5 * cal.expected_calibration_error(y[:, k], raw[:, k])
        assert roc_auc_score(y[:, k], after[:, k]) == pytest.approx(roc_auc_score(y[:, k], raw[:, k]), abs=1e-9)
    assert entry["branches"]["fusion"]["Hernia"]["source"].startswith("identity")
    np.testing.assert_allclose(after[:, 13], raw[:, 13], rtol=1e-6)
    # An older bundle without calibration scores as it always did; the other branches too.
    identity = cal.Calibration.from_manifest(None)
    assert identity.is_identity and np.array_equal(identity.apply("fusion", raw.astype(np.float32)), raw.astype(np.float32))
    np.testing.assert_allclose(c.apply("global", raw), raw, rtol=1e-6)
    assert "not calibrated" in identity.meaning() and "calibrated on the validation split" in c.meaning()


def _render(count: int, seed: int, size: int = 64) -> np.ndarray:
    from cxr.core.labels import PATHOLOGIES as P
    from tasks.metadata.synth import anatomy, render_image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        findings = list(rng.choice(P, size=int(rng.integers(0, 3)), replace=False))
        pixels, _ = render_image(size, anatomy(size, rng), findings, rng)
        out.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return np.stack(out)


def test_two_part_gate_marks_real_films_when_the_training_images_are_synthetic(tmp_path):
    """The gate's image statistics, fitted on synthetic renderings as the demo's are, mark the
    real NIH sample and pass fresh renderings (the pooled features here are drawn alike for
    every image, so the statistics alone must tell them apart)."""
    from tasks.images.geometry import network_pixels_from_image
    from tasks.images.loader import load_image
    from cxr.core.config import ModelParams

    geometry = ModelParams(backbone="resnet18", image_size=64, local_size=64)
    train, valid, fresh = _render(240, 1), _render(80, 2), _render(80, 3)
    films = np.stack([network_pixels_from_image(load_image(p), geometry) for p in sorted((NIH_SAMPLE / "images").glob("*.png"))])
    rng = np.random.default_rng(5)
    pooled = lambda n: rng.normal(size=(n, 16))  # noqa: E731
    gate = ood_gate.fit_gate(pooled(240), pooled(80), "e" * 64, 0.02, train_pixels=train, valid_pixels=valid)
    assert gate.two_part and gate.threshold == 1.0 and gate.valid_false_rejection <= 0.02 + 1e-9
    real = (gate.score(pooled(len(films)), films) > gate.threshold).mean()
    own = (gate.score(pooled(len(fresh)), fresh) > gate.threshold).mean()
    assert real >= 0.95 and own <= 0.05, (real, own)
    parts = gate.components(pooled(3), films[:3])
    assert set(parts) == {"features", "image_statistics"} and (parts["image_statistics"] > gate.stats_threshold).all()
    with pytest.raises(ValueError, match="pass the pixels"):
        gate.score(pooled(2))
    why = gate.reason(3.0)
    assert why.startswith(ood_gate.OOD_PREFIX) and "image's statistics" in why and "pooled features" in why
    # Stored and read back: the same scores; a features-only gate still reads as before.
    ood_gate.save_gate(tmp_path, gate)
    back = ood_gate.load_gate(tmp_path, "e" * 64)
    x, px = pooled(4), films[:4]
    np.testing.assert_allclose(back.score(x, px), gate.score(x, px))
    assert back.summary() == gate.summary() and back.summary()["stats_threshold"] == gate.stats_threshold


@pytest.fixture(scope="module")
def card(trained):
    return evaluated(trained)


def test_registration_stores_calibration_and_thresholds_on_its_scale(card):
    from tasks.bundle.registry import load_bundle
    from tasks.bundle.thresholds import operating_thresholds
    from tasks.training.registration import validation_branch_predictions

    params, _ = card
    bundle = load_bundle(params.paths.models)
    m = bundle.manifest
    assert m["format"] == 2 and m["calibration"]["method"] == "platt" and m["calibration"]["fitted_on"] == "valid"
    assert set(m["calibration"]["branches"]) == {"global", "local", "fusion"}
    # The sample's images are real films: not a synthetic training set.
    assert m["training_data"]["kind"] == "real" and sum(m["training_data"]["split"].values()) == 800
    assert bundle.ood_statement() == "This film is unlike the radiographs this model learned from; its scores for it are not meaningful."
    assert m["ood_gate"]["threshold"] == 1.0 and m["ood_gate"]["stats_threshold"] > 0
    entry = m["thresholds"]["youden"]
    assert entry["scale"] == "calibrated (platt)"
    y, probs, _ = validation_branch_predictions(params, bundle.agcnn(), torch.device("cpu"))
    calibrated = bundle.calibration().apply("fusion", probs["fusion"])
    s = params.score
    assert [entry["classes"][c] for c in PATHOLOGIES] == operating_thresholds(
        y, calibrated, "youden", s.target_sensitivity, s.fallback_threshold)


def test_the_scorer_calibrates_and_says_what_a_probability_means(card, monkeypatch):
    from tasks.scoring.rows import study_json
    from tasks.scoring.scorer import Scorer, batch_outputs

    params, _ = card
    scorer = Scorer.load(params)
    films = sorted((NIH_SAMPLE / "images").glob("*.png"))[:3]
    studies = scorer.score([(p.name, p) for p in films], "calibration")
    from tasks.scoring.studies import Study, sha_or_reason

    prepared = [scorer.prepare(Study(p.name, p, *sha_or_reason(p))) for p in films]
    raw = batch_outputs(scorer.model, torch.from_numpy(np.stack([s.pixels for s in prepared])), scorer.device)
    for k, study in enumerate(studies):
        expected = scorer.calibration.apply("fusion", raw["fusion"][k : k + 1])[0]
        np.testing.assert_allclose(study.probabilities["fusion"], expected, rtol=1e-5, atol=1e-6)
        facts = study_json(study)
        assert facts["probability_meaning"].startswith("Probabilities are calibrated on the validation split")
        assert "Youden" in facts["operating_point"] and set(facts["thresholds"]) == set(PATHOLOGIES)
        assert facts["flags"] == {c: bool(facts["probabilities"][c] >= facts["thresholds"][c] - 1e-6) for c in PATHOLOGIES}
        assert facts["ood"]["components"]["image_statistics"]["threshold"] > 0
    # Forced over the threshold: the plain-words statement is in the row, the JSON and its reason.
    monkeypatch.setattr(scorer, "gate", dataclasses.replace(scorer.gate, threshold=-1.0))
    flagged = scorer.score([(films[0].name, films[0])], "statement")[0]
    assert flagged.row["ood_flag"] is True and flagged.row["ood_statement"] == scorer.bundle.ood_statement()
    assert study_json(flagged)["ood"]["statement"] == flagged.row["ood_statement"]
    monkeypatch.setattr(scorer, "ood_mode", "reject")
    refused = scorer.score([(films[0].name, films[0])], "statement")[0]
    assert refused.row["status"] == "rejected" and refused.row["ood_statement"].endswith("It was not scored.")


def test_evaluate_draws_the_figures_and_writes_the_model_card(card):
    from tasks.bundle.bundle import FIGURES, MODEL_CARD
    from tasks.bundle.registry import load_bundle

    params, report = card
    reports = Path(params.paths.reports)
    figures = report["figures"]
    assert set(figures) >= {"roc", "auroc", "reliability", "training", "subgroups", "ood"}
    for name in figures.values():
        data = (reports / FIGURES / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    text = (reports / "evaluation.md").read_text()
    assert all(f"(figures/{name})" in text for name in figures.values())
    html = (reports / "evaluation.html").read_text()
    assert html.count("<img") == len(figures) and "<table>" in html
    # Every class reports its test positives; one without any shows n/a and no interval.
    fusion = report["branches"]["fusion"]["per_class"]
    positives = report["test_positives"]
    assert sum(positives.values()) > 0
    for c in PATHOLOGIES:
        if positives[c] == 0:
            assert isinstance(fusion[c], str) and "0 positives" in fusion[c]
        elif positives[c] < iv.MIN_CASES:
            assert fusion[c]["ci95"] is None and fusion[c]["positives"] == positives[c]
    # Calibration: the error before and after on the test split.
    ece = report["calibration"]["ece"]
    assert report["calibration"]["method"] == "platt" and 0 <= ece["calibrated"]["pooled"] <= 1
    metrics = json.loads((Path(params.paths.metrics) / "evaluate.json").read_text())
    assert metrics["fusion_ece_calibrated"] == ece["calibrated"]["pooled"] and "fusion_ece_uncalibrated" in metrics
    # Subgroups: sex, three age bands, two views; their sizes add up to the test split.
    groups = {(g["attribute"], g["group"]): g for g in report["subgroups"]}
    assert len(groups) == 7
    for attribute in ("sex", "age"):
        assert sum(g["images"] for (a, _), g in groups.items() if a == attribute) == report["test_images"]
    for g in groups.values():
        small = min(g["with_findings"], g["images"] - g["with_findings"]) < iv.MIN_CASES
        assert (g["any_finding"]["ci95"] is None) == (small or g["any_finding"]["auroc"] is None)
    # Expert labels: matched by Image Index, n as counted from the CSV itself.
    from tasks.metadata.ingest import packaged_metadata_path
    from tasks.metadata.split import read_splits

    google = pd.read_csv(packaged_metadata_path().parent / "google2019_nih-chest-xray-labels.csv.gz")
    splits = read_splits(Path(params.paths.processed) / "splits.parquet")
    test_ids = set(splits.loc[splits["split"] == "test", "image_id"])
    n = len(test_ids & set(google["Image Index"]))
    expert = report["expert_labels"]
    assert expert["test_images_with_labels"] == n and all(v["images"] == n for v in expert["labels"].values())
    # The model card, in the bundle beside its figures and in the reports.
    bundle = load_bundle(params.paths.models)
    card_text = (bundle.folder / MODEL_CARD).read_text()
    assert card_text == (reports / MODEL_CARD).read_text()
    for heading in ("## Intended use", "## Training data", "## Metrics (test split)", "## Subgroups", "## Calibration",
                    "## Out-of-distribution detector", "## Known limits", "not a diagnostic device"):
        assert heading in card_text, heading
    assert bundle.manifest["training_data_version"] in card_text
    assert all((bundle.folder / FIGURES / name).is_file() for name in figures.values())
    # The DVC plots' long-format data: one series per class.
    roc = json.loads((Path(params.paths.metrics) / "plots" / "roc_by_class.json").read_text())
    assert {r["class"] for r in roc} == {c for c in PATHOLOGIES if 0 < positives[c] < report["test_images"]} | {"any finding"}
