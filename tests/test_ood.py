"""Out of distribution: the model-free precheck (tasks.scoring.precheck) on the generated corpus
and the real NIH sample, the model's feature gate (tasks.bundle.ood_gate: its threshold, its
binding to the model digest, its place in the bundle), the one verdict
(tasks.scoring.verdict), and scoring runs that refuse out-of-distribution files with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.core.errors import DataError
from tasks.bundle import ood_gate
from tasks.evaluation.ood_corpus import FAR, NEAR, make_ood_corpus
from tasks.images.loader import load_image
from tasks.scoring.precheck import precheck
from tests.conftest import NIH_SAMPLE, registered_copy

STUDIES = NIH_SAMPLE.parent / "studies"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("ood-corpus")
    return out, make_ood_corpus(out, STUDIES)


def _precheck(path: Path) -> str | None:
    facts: dict = {}
    image = load_image(path, facts=facts)
    return precheck(image, facts)


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
        assert why.startswith(ood_gate.OOD_PREFIX), (name, why)
        assert len(why) > len(ood_gate.OOD_PREFIX) + 20  # says what was compared
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
        refused += precheck(pixels / 255.0, {}) is not None
    assert refused / 120 <= 0.05


def test_dicom_facts_and_body_part():
    facts: dict = {}
    image = load_image(STUDIES / "Fake_MONOHR1.dcm", facts=facts)
    assert facts["modality"] == "CR" and facts["body_part"] == "CHEST"
    why = precheck(image, dict(facts, body_part="knee"))
    assert why.startswith(ood_gate.OOD_PREFIX) and "Body Part" in why and "knee" in why


def test_feature_gate_threshold_gives_the_target_false_rejection_rate():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(32, 32)) / np.sqrt(32)
    train, valid, test = ((rng.standard_t(df=8, size=(n, 32)) @ mix).astype(np.float32) for n in (3000, 2000, 4000))
    gate = ood_gate.fit_gate(train, valid, "d" * 64, 0.05)
    assert abs(gate.valid_false_rejection - 0.05) < 0.005
    held_out = (gate.score(torch.from_numpy(test)) > gate.threshold).mean()
    assert 0.03 <= held_out <= 0.07, held_out
    far = gate.score(torch.from_numpy(test[:100] * 4.0))
    assert (far > gate.threshold).mean() > 0.95
    reason = gate.reason(float(far[0]))
    assert reason.startswith(ood_gate.OOD_PREFIX) and "threshold" in reason and "pooled features" in reason


def test_gate_is_bound_to_the_model_digest(tmp_path):
    rng = np.random.default_rng(1)
    gate = ood_gate.fit_gate(rng.normal(size=(200, 8)), rng.normal(size=(100, 8)), "a" * 64, 0.01)
    assert ood_gate.load_gate(tmp_path, "a" * 64) is None  # no gate stored: older models
    ood_gate.save_gate(tmp_path, gate)
    loaded = ood_gate.load_gate(tmp_path, "a" * 64)
    assert loaded.threshold == gate.threshold and loaded.digest == "a" * 64
    x = torch.from_numpy(rng.normal(size=(5, 8)))
    np.testing.assert_allclose(loaded.score(x), gate.score(x))
    with pytest.raises(DataError, match="fitted for model aaaaaaaaaaaa"):
        ood_gate.load_gate(tmp_path, "b" * 64)
    (tmp_path / ood_gate.GATE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="cannot be read"):
        ood_gate.load_gate(tmp_path, "a" * 64)


@pytest.fixture(scope="module")
def gated(trained):
    """A registered copy of the trained models (registering fits the gate) at a 5% target."""
    return registered_copy(trained, "models-ood", ood_false_rejection=0.05)


def test_registering_fits_the_gate_on_the_train_split(gated):
    from tasks.bundle.bundle import MANIFEST
    from tasks.bundle.registry import load_bundle
    from tasks.metadata.split import read_splits
    from tasks.training.crop_cache import ensure_crop_cache

    params = gated
    models = Path(params.paths.models)
    bundle = load_bundle(models)
    digest, folder = bundle.digest, bundle.folder
    # The gate lives in the bundle folder, bound to its digest; the manifest summarises it.
    assert folder == models / digest and (folder / ood_gate.GATE_FILE).is_file()
    assert not (models / ood_gate.GATE_FILE).exists()  # nothing beside the working weights
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest == bundle.manifest and ood_gate.GATE_FILE in manifest["files"]
    gate = ood_gate.load_gate(folder, digest)
    assert gate is not None and bundle.gate().threshold == gate.threshold
    summary = manifest["ood_gate"]
    assert summary["threshold"] == pytest.approx(gate.threshold) and summary["false_rejection"] == 0.05
    assert summary["method"] == gate.method and summary["valid_false_rejection"] == gate.valid_false_rejection
    assert gate.valid_false_rejection <= 0.05 + 1e-9
    # The held-out test split's features: about the target rate (a small split, so loosely).
    cache = ensure_crop_cache(params)
    splits = read_splits(Path(params.paths.processed) / "splits.parquet")
    ids = [i for i in splits.loc[splits["split"] == "test", "image_id"] if i in cache]
    test = torch.from_numpy(cache.get("pooled", cache.rows(ids))[:, 0])
    # The two-part gate also compares the image statistics of the same network inputs.
    from tasks.metadata.ingest import read_metadata
    from tasks.training.dataset import load_split

    part = splits[(splits["split"] == "test") & splits["image_id"].isin(ids)]
    pixels = load_split(read_metadata(Path(params.paths.interim) / "metadata.parquet"), part, "test",
                        Path(params.paths.images), params.model, Path(params.paths.cache) / "images").pixels
    assert gate.two_part and (gate.score(test, pixels) > gate.threshold).mean() <= 0.20
    # Other weights: the gate refuses to serve them.
    other = models.parent / "models-ood-other"
    shutil.copytree(folder, other, dirs_exist_ok=True)
    with pytest.raises(DataError, match="fitted for model"):
        ood_gate.load_gate(other, "f" * 64)


def test_the_verdict_over_modes():
    from tasks.scoring.verdict import OOD_MODES, OODVerdict, ood_verdict

    rng = np.random.default_rng(3)
    gate = ood_gate.fit_gate(rng.normal(size=(300, 4)), rng.normal(size=(200, 4)), "c" * 64, 0.05)
    over, under = gate.threshold + 1.0, gate.threshold - 0.5
    why = ood_gate.OOD_PREFIX + "colour picture (colourfulness 40.0)"
    assert OOD_MODES == ("reject", "flag", "off")

    # "off": nothing is checked, whatever the precheck or the gate would say.
    for kwargs in ({}, {"precheck": why}, {"gate": gate, "score": over}, {"gate": gate, "score": under}):
        verdict = ood_verdict("off", **kwargs)
        assert verdict.refused_by is None and verdict.reason is None and verdict.flag is None
        assert verdict.over_threshold is False
    for mode in ("reject", "flag"):
        # The precheck refuses under both: not a chest radiograph is not a matter of degree.
        assert ood_verdict(mode, precheck=why) == OODVerdict("precheck", why, None, False, True)
        assert ood_verdict(mode, precheck=why, gate=gate, score=under).refused_by == "precheck"
        # Under the threshold: scored, not flagged, with the distance.
        assert ood_verdict(mode, gate=gate, score=under) == OODVerdict(None, None, under, False, False)
        # No gate (a bundle without one) or no distance: scored, not flagged.
        assert ood_verdict(mode) == OODVerdict(None, None, None, False, False)
        assert ood_verdict(mode, gate=None, score=over) == OODVerdict(None, None, over, False, False)
        # Exactly at the threshold is not over it.
        assert ood_verdict(mode, gate=gate, score=gate.threshold).over_threshold is False
    # Over the threshold: "reject" refuses with the gate's reason, "flag" scores and marks it.
    assert ood_verdict("reject", gate=gate, score=over) == OODVerdict("gate", gate.reason(over), over, True, True)
    assert ood_verdict("flag", gate=gate, score=over) == OODVerdict(None, gate.reason(over), over, True, True)
    assert gate.reason(over).startswith(ood_gate.OOD_PREFIX) and f"{over:.1f}" in gate.reason(over)
    with pytest.raises(ValueError, match="unknown out-of-distribution mode"):
        ood_verdict("warn")


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
    from tasks.bundle.registry import load_bundle
    from tasks.evaluation.evaluate import ood_detector, ood_metrics, render_ood
    from tasks.metadata.ingest import read_metadata
    from tasks.metadata.split import read_splits
    from tasks.training.dataset import load_split

    params = gated
    meta = read_metadata(Path(params.paths.interim) / "metadata.parquet")
    splits = read_splits(Path(params.paths.processed) / "splits.parquet")
    test = load_split(meta, splits, "test", Path(params.paths.images), params.model)
    bundle = load_bundle(params.paths.models)
    report = ood_detector(params, bundle.digest, test.ids)
    assert report["mode"] == params.score.ood == "flag"
    assert report["gate"]["threshold"] == pytest.approx(bundle.manifest["ood_gate"]["threshold"], abs=1e-3)
    assert report["test"]["images"] == len(test.ids)
    # The sample's real radiographs pass the precheck; under flag only the precheck refuses.
    assert report["test"]["false_rejection_rate"] <= 0.10
    assert report["test"]["refused"] == report["test"]["precheck_refused"]
    far = report["corpus"]["far"]
    assert far["detection_rate"] == 1.0 and far["items"] >= 25
    assert report["corpus"]["near"]["items"] == 3
    items = report["corpus"]["items"].values()
    # The gate's distance of every decoded file, also of those the precheck refused.
    assert all(r["ood_score"] is not None for r in items if r["refused_by"] != "loader")
    threshold = report["gate"]["threshold"]  # both rounded to 3 decimals
    assert all(r["over_threshold"] for r in items if r["ood_score"] is not None and r["ood_score"] > threshold + 1e-3)
    assert not any(r["over_threshold"] for r in items if r["ood_score"] is not None and r["ood_score"] < threshold - 1e-3)
    assert {r["refused_by"] for r in items} <= {None, "loader", "precheck"}  # flag: the gate refuses nothing
    metrics = ood_metrics(report)
    assert metrics["ood_far_detection"] == 1.0 and "ood_test_false_rejection" in metrics
    text = "\n".join(render_ood(report))
    assert "Out-of-distribution detector" in text and "mr_relabelled_cr.dcm" in text
    # Under reject the same files go through the same verdict: the gate now refuses too.
    strict = ood_detector(params.model_copy(update={"score": params.score.model_copy(update={"ood": "reject"})}),
                          bundle.digest, test.ids)
    lenient, strict_test = report["test"], strict["test"]
    assert strict_test["precheck_refused"] == lenient["precheck_refused"]
    assert strict_test["gate_over_threshold"] == lenient["gate_over_threshold"]
    assert lenient["precheck_refused"] <= strict_test["refused"] <= lenient["precheck_refused"] + lenient["gate_over_threshold"]
    for name, r in strict["corpus"]["items"].items():
        before = report["corpus"]["items"][name]
        assert (r["ood_score"], r["over_threshold"]) == (before["ood_score"], before["over_threshold"]), name
        expected = before["refused_by"] or ("gate" if r["over_threshold"] else None)
        assert r["refused_by"] == expected, (name, r)
        if expected == "gate":
            assert r["reason"].startswith(ood_gate.OOD_PREFIX) and "pooled features" in r["reason"]
