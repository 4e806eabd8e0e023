"""Three-stage training and evaluation on the real 64-px NIH sample (CPU, ResNet-18)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from tasks.images.geometry import to_input
from tasks.evaluation.evaluate import evaluate
from tasks.training.stages import train_stage
from cxr.core.digest import file_sha256
from tasks.bundle.weights import load_agcnn, load_weights
from tests.conftest import sliced_params


def test_three_stages_then_evaluate(trained):
    params = trained
    summaries = {stage: json.loads((params.paths.metrics / f"train_{stage}.json").read_text()) for stage in ("global", "local", "fusion")}
    for stage, summary in summaries.items():
        path = params.paths.models / f"{stage}.safetensors"
        assert summary["digest"] == file_sha256(path)
        _, meta = load_weights(path)
        assert meta["stage"] == stage and meta["backbone"] == "resnet18"
        assert 0.0 <= summary["best_valid_mean_auroc"] <= 1.0
        assert (params.paths.metrics / f"train_{stage}.json").exists()
    # Local and fusion record the exact upstream weights they were trained on.
    assert load_weights(params.paths.models / "fusion.safetensors")[1]["upstream"] == {"global": summaries["global"]["digest"], "local": summaries["local"]["digest"]}

    model = load_agcnn(params.paths.models, params.model)
    out = model(torch.zeros(2, 3, 64, 64))
    assert out.fusion_logits.shape == (2, 14) and out.boxes.shape == (2, 4)

    report = evaluate(params, truth_boxes=[])
    fusion = report["branches"]["fusion"]
    # The sample's test split lacks some classes: reported as not computable, left out of the mean.
    missing = [k for k, v in fusion["per_class"].items() if isinstance(v, str)]
    assert missing and fusion["classes_in_mean"] == 14 - len(missing)
    assert fusion["mean_auroc"] is not None
    metrics = json.loads((params.paths.metrics / "evaluate.json").read_text())
    assert set(metrics) >= {"global_mean_auroc", "local_mean_auroc", "fusion_mean_auroc"}
    roc = json.loads((params.paths.metrics / "roc_fusion.json").read_text())
    assert roc and set(roc[0]) == {"label", "fpr", "tpr"}
    assert "0.871" in (params.paths.reports / "evaluation.md").read_text()
    # No Finding vs any finding: computable on the sample whatever classes its test split lacks.
    anyf = fusion["any_finding"]
    assert 0.0 <= anyf["ci95"][0] <= anyf["auroc"] <= anyf["ci95"][1] <= 1.0
    assert 0 < anyf["images_with_findings"] < report["test_images"]
    assert metrics["fusion_any_finding_auroc"] == anyf["auroc"]


def test_any_finding_auroc_by_hand():
    import numpy as np

    from tasks.evaluation.evaluate import any_finding_auroc

    y = np.zeros((4, 14))
    y[1, 3] = y[3, 0] = y[3, 9] = 1  # images 1 and 3 have findings
    p = np.full((4, 14), 0.1)
    p[0, 5], p[1, 2], p[2, 0], p[3, 13] = 0.2, 0.9, 0.95, 0.3  # max scores 0.2, 0.9, 0.95, 0.3
    # Positives {0.9, 0.3} vs negatives {0.2, 0.95}: 2 of 4 pairs ordered right.
    assert any_finding_auroc(y, p, bootstrap=0, seed=0)["auroc"] == 0.5
    assert isinstance(any_finding_auroc(np.zeros((3, 14)), p[:3], bootstrap=0, seed=0), str)


def test_nih_boxes_scale_from_1024_px_and_apply_only_to_real_images(tmp_path):
    """NIH's lesion boxes are in the pixels of its 1024-px release: on the real 64-px sample they
    scale by 64/1024 to the sample's pixels; on synthetic images with NIH names they do not
    apply; synthetic boxes scale by the side of the file they were drawn on."""
    import numpy as np
    from PIL import Image

    from tasks.evaluation.evaluate import localization, read_true_boxes, true_box_scales
    from tasks.metadata.ingest import packaged_metadata_path
    from tests.conftest import NIH_SAMPLE

    nih = read_true_boxes(packaged_metadata_path().parent / "BBox_List_2017.csv.gz")
    images = NIH_SAMPLE / "images"
    boxed = sorted(set(nih["image_id"]) & {p.name for p in images.iterdir()})
    assert len(boxed) == 7  # of the 800 sample images, 7 carry a radiologist box
    ids = boxed + ["00000001_000.png"]
    scale = true_box_scales(nih, ids, images, 224, nih=True, real=True)
    assert scale == {i: 224 / 1024 for i in boxed}
    assert true_box_scales(nih, ids, images, 224, nih=True, real=False) == {}  # 64-px files, not declared real

    # A box equal to the true one, in the resized image's pixels, has IoU 1.
    row = nih[nih["image_id"] == boxed[0]].iloc[0]
    s = 64 / 1024
    exact = np.array([[row.y * s, row.x * s, (row.y + row.h) * s - 1, (row.x + row.w) * s - 1]])
    one = localization(exact, [boxed[0]], nih[nih["image_id"] == boxed[0]], {boxed[0]: s})
    assert one["images"] == 1 and one["mean_iou"] == 1.0

    # Synthetic boxes: the file's own side (a 128-px file seen at 64 px halves them).
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(tmp_path / "a.png")
    synth = nih.iloc[:1].assign(image_id="a.png")
    assert true_box_scales(synth, ["a.png"], tmp_path, 64, nih=False, real=False) == {"a.png": 0.5}


def test_resume_after_interruption_equals_uninterrupted_run(workspace, sliced, tmp_path):
    # With augmentation on: its draws come from the epoch generator, so resume stays bitwise.
    # On the 160-image slice of the split: resuming does not depend on the epoch's size.
    from cxr.core.config import AugmentParams

    def at(name):
        params = sliced_params(workspace, sliced, tmp_path / name, epochs=2)
        return params.model_copy(update={"train": params.train.model_copy(update={
            "augment": AugmentParams(rotation=7, scale=0.1, brightness=0.1, contrast=0.1)})})

    straight, resumed = at("a"), at("b")
    train_stage(straight, "global", progress=False)
    stopped = train_stage(resumed, "global", progress=False, stop_after_epoch=0)
    assert stopped == {"stage": "global", "stopped_after_epoch": 0}
    assert not (tmp_path / "b" / "models" / "global.safetensors").exists()
    summary = train_stage(resumed, "global", progress=False)
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert file_sha256(tmp_path / "a" / "models" / "global.safetensors") == file_sha256(tmp_path / "b" / "models" / "global.safetensors")


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/cxr-pwned", "w"))


def test_foreign_pickle_checkpoint_is_never_unpickled(workspace, sliced, tmp_path):
    params = sliced_params(workspace, sliced, tmp_path)
    ckpt = tmp_path / "models" / "checkpoints" / "global.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(pickle.dumps({"model": _Payload()}))
    import os

    if os.path.exists("/tmp/cxr-pwned"):
        os.remove("/tmp/cxr-pwned")
    summary = train_stage(params, "global", progress=False)
    assert not os.path.exists("/tmp/cxr-pwned")
    assert summary["history"][0]["epoch"] == 0


def test_fusion_starts_at_the_ensemble_and_stops_early(trained, tmp_path):
    """Stage III's head starts at the mean of the branch heads: on real crop-cache batches its
    logits are the mean of the two branches' logits. That start is epoch -1 of the selection:
    with updates too small to change anything (lr 1e-12) no epoch beats it, patience 1 ends
    the stage after one epoch, and the saved head is the ensemble exactly."""
    import shutil

    from models.fusion import FusionHead
    from tasks.training.crop_cache import CropDataset, crop_split, ensure_crop_cache
    from tasks.metadata.ingest import read_metadata
    from tasks.metadata.split import read_splits
    from tasks.training.stages import StageModel

    params = trained
    models = tmp_path / "models"
    shutil.copytree(params.paths.models, models, ignore=shutil.ignore_patterns("checkpoints", "fusion.*"))
    fusion_stage = params.train.fusion.model_copy(update={"lr": 1e-12, "epochs": 3, "patience": 1})
    params = params.model_copy(update={"paths": params.paths.model_copy(update={"models": models, "metrics": tmp_path / "metrics"}),
                                       "train": params.train.model_copy(update={"fusion": fusion_stage})})

    model = StageModel("fusion", params, models).eval()
    cache = ensure_crop_cache(params)
    meta, splits = read_metadata(params.paths.interim / "metadata.parquet"), read_splits(params.paths.processed / "splits.parquet")
    crops, pooled = CropDataset(crop_split(cache, meta, splits, "valid")).batch(0, 16)
    with torch.no_grad():
        fused = model.forward_batch((crops, pooled), torch.device("cpu"))
        g = model.frozen["global"].classifier(pooled)
        local = model.frozen["local"](to_input(crops)).logits
    torch.testing.assert_close(fused, (g + local) / 2, atol=1e-5, rtol=1e-5)

    summary = train_stage(params, "fusion", progress=False)
    assert summary["history"][0]["epoch"] == -1 and "ensemble" in summary["history"][0]["start"]
    assert summary["best_epoch"] == -1 and summary["stopped_early"] and summary["epochs_run"] == 1
    assert summary["best_valid_mean_auroc"] == summary["history"][0]["valid_mean_auroc"]
    state, meta_ = load_weights(models / "fusion.safetensors")
    start = FusionHead.from_branches(model.frozen["global"].classifier, model.frozen["local"].classifier)
    assert torch.equal(state["fc.weight"], start.fc.weight) and torch.equal(state["fc.bias"], start.fc.bias)
    assert meta_["best_epoch"] == -1


def test_param_groups_slow_a_pretrained_body_only():
    from cxr.core.config import StageParams
    from models.branch import build_branch
    from models.fusion import FusionHead
    from tasks.training.stages import param_groups, patience_spent

    branch = build_branch("resnet18")
    sp = StageParams(lr=0.01, body_lr_scale=0.1)
    body, head = param_groups(branch, sp, "imagenet")
    assert body["lr"] == pytest.approx(0.001) and head["lr"] == 0.01
    assert len(body["params"]) == len(list(branch.body.parameters())) and len(head["params"]) == 2
    assert len(param_groups(branch, sp, "none")) == 1  # a random-init body is new too
    assert len(param_groups(FusionHead(8, 8), sp, "imagenet")) == 1
    # Early stopping counts epochs since the best (the fusion start is epoch -1).
    assert not patience_spent(3, 2, 2) and patience_spent(4, 2, 2) and patience_spent(0, -1, 1)
    assert not patience_spent(50, 0, None)


def test_evaluation_compares_branches_on_validation_and_records_them(trained):
    from tasks.bundle.registry import load_bundle
    from tests.conftest import registered_copy

    params = registered_copy(trained, "models-eval")
    params = params.model_copy(update={"paths": params.paths.model_copy(update={"metrics": params.paths.models.parent / "metrics-eval",
                                                                                "reports": params.paths.models.parent / "reports-eval"})})
    report = evaluate(params, truth_boxes=[])
    val = report["validation"]
    assert val["images"] > 0 and set(val["branches"]) == {"global", "local", "fusion"}
    for key in ("mean_auroc", "any_finding_auroc"):
        d = val["fusion_minus_global"][key]
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1] and d["worse"] == (d["ci95"][1] < 0)
    entry = load_bundle(params.paths.models, report["model_digest"]).manifest["evaluation"]
    assert set(entry["validation"]) == set(entry["test"]) == {"global", "local", "fusion"}
    assert entry["test"]["fusion"]["any_finding_auroc"] == report["branches"]["fusion"]["any_finding"]["auroc"]
    text = (params.paths.reports / "evaluation.md").read_text()
    assert "## Branches on validation and test" in text
    assert "fusion minus global" in text or "worse than its global branch" in text
