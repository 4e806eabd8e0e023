"""The out-of-distribution gate (tasks/ood.py): the model-free precheck on the generated corpus
and the real NIH sample, the feature gate's threshold, its binding to the model digest, and
scoring runs that refuse out-of-distribution files with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NIH_SAMPLE, registered_copy
from cxr.core.errors import DataError
from tasks.scoring import precheck as ood
from tasks.images.loader import load_image

from tasks.evaluation.ood_corpus import FAR, NEAR, make_ood_corpus

STUDIES = NIH_SAMPLE.parent / "studies"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("ood-corpus")
    return out, make_ood_corpus(out, STUDIES)


def _precheck(path: Path) -> str | None:
    facts: dict = {}
    image = load_image(path, facts=facts)
    return ood.precheck(image, facts)


def test_corpus_has_every_kind(corpus):
    _, manifest = corpus
    names = " ".join(manifest)
    for kind in ("photo_colour", "photo_gray", "mr_slice", "ct_slice", "mr_relabelled_cr.dcm", "noise", "text_page", "blank"):
        assert kind in names
    assert sorted(n for n, k in manifest.items() if k == NEAR) == ["near_inverted.png", "near_rotated_90.png", "near_upside_down.png"]


def test_every_far_item_is_refused_by_the_precheck(corpus):
    root, manifest = corpus
    reasons = {name: _precheck(root / name) for name, kind in manifest.items() if kind == FAR}
    passed = [name for name, why in reasons.items() if why is None]
    assert not passed, f"not refused: {passed}"
    for name, why in reasons.items():
        assert why.startswith(ood.OOD_PREFIX), (name, why)
        assert len(why) > len(ood.OOD_PREFIX) + 20  # says what was compared
    # Each degree-one check is the one that fires for its kind of input.
    assert "colour picture" in reasons["photo_colour_astronaut.png"]
    assert "blank image" in reasons["blank_gray.png"]
    assert "image statistics unlike a chest radiograph" in reasons["mr_relabelled_cr.dcm"]
    assert "image statistics unlike a chest radiograph" in reasons["text_page.png"]


def test_relabelled_mr_gets_past_the_loader_modality_check(corpus):
    root, _ = corpus
    facts: dict = {}
    load_image(root / "mr_relabelled_cr.dcm", facts=facts)  # the loader accepts Modality CR
    assert facts["modality"] == "CR" and facts["format"] == "dicom"


def test_real_radiographs_pass_the_precheck():
    images = sorted((NIH_SAMPLE / "images").glob("*.png"))
    assert len(images) == 800
    refused = [p.name for p in images if _precheck(p) is not None]
    # 64-px RGB PNGs of gray films: colourfulness must read 0, not "colour".
    facts: dict = {}
    load_image(images[0], facts=facts)
    assert facts["channels"] == 3 and facts["colourfulness"] == 0.0
    assert len(refused) / len(images) <= 0.10, refused[:10]
    # Larger real films, a PNG and the MONOCHROME1 DICOM (neither in the reference fit).
    assert _precheck(STUDIES / "00000001_000.png") is None
    assert _precheck(STUDIES / "Fake_MONOHR1.dcm") is None


def test_synthetic_demo_images_pass_the_precheck():
    from cxr.core.labels import PATHOLOGIES
    from tasks.metadata.synth import anatomy, render_image

    rng = np.random.default_rng(2024)  # another seed than the reference's renderings
    refused = 0
    for i in range(120):
        size = (128, 96, 192)[i % 3]
        findings = list(rng.choice(PATHOLOGIES, size=int(rng.integers(0, 4)), replace=False))
        pixels, _ = render_image(size, anatomy(size, rng), findings, rng)
        refused += ood.precheck(pixels / 255.0, {}) is not None
    assert refused / 120 <= 0.05


def test_dicom_facts_and_body_part():
    facts: dict = {}
    image = load_image(STUDIES / "Fake_MONOHR1.dcm", facts=facts)
    assert facts["modality"] == "CR" and facts["body_part"] == "CHEST"
    why = ood.precheck(image, dict(facts, body_part="knee"))
    assert why.startswith(ood.OOD_PREFIX) and "Body Part" in why and "knee" in why


def test_feature_gate_threshold_gives_the_target_false_rejection_rate():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(32, 32)) / np.sqrt(32)
    train, valid, test = ((rng.standard_t(df=8, size=(n, 32)) @ mix).astype(np.float32) for n in (3000, 2000, 4000))
    gate = ood.fit_gate(train, valid, "d" * 64, 0.05)
    assert abs(gate.valid_false_rejection - 0.05) < 0.005
    held_out = (gate.score(torch.from_numpy(test)) > gate.threshold).mean()
    assert 0.03 <= held_out <= 0.07, held_out
    far = gate.score(torch.from_numpy(test[:100] * 4.0))
    assert (far > gate.threshold).mean() > 0.95
    reason = gate.reason(float(far[0]))
    assert reason.startswith(ood.OOD_PREFIX) and "threshold" in reason and "pooled features" in reason


def test_gate_is_bound_to_the_model_digest(tmp_path):
    rng = np.random.default_rng(1)
    gate = ood.fit_gate(rng.normal(size=(200, 8)), rng.normal(size=(100, 8)), "a" * 64, 0.01)
    assert ood.load_gate(tmp_path, "a" * 64) is None  # no gate stored: older models
    ood.save_gate(tmp_path, gate)
    loaded = ood.load_gate(tmp_path, "a" * 64)
    assert loaded.threshold == gate.threshold and loaded.digest == "a" * 64
    x = torch.from_numpy(rng.normal(size=(5, 8)))
    np.testing.assert_allclose(loaded.score(x), gate.score(x))
    with pytest.raises(DataError, match="fitted for model aaaaaaaaaaaa"):
        ood.load_gate(tmp_path, "b" * 64)
    (tmp_path / ood.GATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="cannot be read"):
        ood.load_gate(tmp_path, "a" * 64)


@pytest.fixture(scope="module")
def gated(trained):
    """A registered copy of the trained models (registering fits the gate) at a 5% target."""
    return registered_copy(trained, "models-ood", ood_false_rejection=0.05)


def test_registering_fits_the_gate_on_the_train_split(gated):
    from tasks.training.crop_cache import ensure_crop_cache
    from tasks.metadata.split import read_splits
    from tasks.bundle.weights import model_digest

    params = gated
    models = Path(params.paths.models)
    digest = model_digest(models)
    entry = json.loads((models / "registry.json").read_text())["models"][digest]
    gate = ood.load_gate(models, digest)
    assert gate is not None and entry["ood_gate"]["threshold"] == pytest.approx(gate.threshold)
    assert gate.valid_false_rejection <= 0.05 + 1e-9
    # The held-out test split's features: about the target rate (a small split, so loosely).
    cache = ensure_crop_cache(params)
    splits = read_splits(Path(params.paths.processed) / "splits.parquet")
    ids = [i for i in splits.loc[splits["split"] == "test", "image_id"] if i in cache]
    test = torch.from_numpy(cache.get("pooled", cache.rows(ids))[:, 0])
    assert (gate.score(test) > gate.threshold).mean() <= 0.20
    # Other weights in the same folder: the gate refuses to serve them.
    other = models.parent / "models-ood-other"
    shutil.copytree(models, other, dirs_exist_ok=True)
    with pytest.raises(DataError, match="fitted for model"):
        ood.load_gate(other, "f" * 64)


def test_scoring_refuses_out_of_distribution_files(gated, corpus, tmp_path):
    from tasks.scoring.scorer import Scorer

    root, _ = corpus
    items = [("photo", root / "photo_colour_chelsea.png"), ("text", root / "text_page.png"),
             ("mr_as_cr", root / "mr_relabelled_cr.dcm"), ("film", STUDIES / "00000001_000.png"),
             ("dicom", STUDIES / "Fake_MONOHR1.dcm")]
    for mode in ("flag", "reject"):
        params = gated.model_copy(update={"score": gated.score.model_copy(update={"ood": mode})})
        scorer = Scorer.load(params)
        assert scorer.gate is not None
        rows = {s.row["study_id"]: s.row for s in scorer.score(items, f"ood-{mode}")}
        for name in ("photo", "text", "mr_as_cr"):
            assert rows[name]["status"] == "rejected", rows[name]
            assert rows[name]["reason"].startswith("out of distribution: "), rows[name]["reason"]
            assert rows[name]["ood_flag"] is True
        for name in ("film", "dicom"):  # real radiographs: scored (flag) or refused by the gate (reject)
            row = rows[name]
            assert row["ood_score"] is not None and np.isfinite(row["ood_score"])
            over = row["ood_score"] > scorer.gate.threshold
            assert row["ood_flag"] is bool(over)
            if mode == "flag" or not over:
                assert row["status"] == "scored", row
            else:
                assert row["status"] == "rejected" and row["reason"].startswith("out of distribution: ")
                assert "pooled features" in row["reason"]


def test_evaluation_reports_the_detector(gated):
    from tasks.training.dataset import load_split
    from tasks.evaluation.evaluate import ood_detector, ood_metrics, render_ood
    from tasks.metadata.ingest import read_metadata
    from tasks.metadata.split import read_splits
    from tasks.bundle.weights import load_agcnn

    params = gated
    meta = read_metadata(Path(params.paths.interim) / "metadata.parquet")
    splits = read_splits(Path(params.paths.processed) / "splits.parquet")
    test = load_split(meta, splits, "test", Path(params.paths.images), params.model)
    model = load_agcnn(Path(params.paths.models), params)
    report = ood_detector(params, model, test, "cpu")
    assert report["test"]["images"] == len(test.ids)
    # The sample's real radiographs pass the precheck; under flag only the precheck refuses.
    assert report["test"]["false_rejection_rate"] <= 0.10
    far = report["corpus"]["far"]
    assert far["detection_rate"] == 1.0 and far["items"] >= 25
    assert report["corpus"]["near"]["items"] == 3
    assert all(r["ood_score"] is not None for r in report["corpus"]["items"].values() if r["refused_by"] != "loader")
    metrics = ood_metrics(report)
    assert metrics["ood_far_detection"] == 1.0 and "ood_test_false_rejection" in metrics
    text = "\n".join(render_ood(report))
    assert "Out-of-distribution detector" in text and "mr_relabelled_cr.dcm" in text
