"""Test-split evaluation of the three branches: AUROC with bootstrap intervals (BCa, scipy),
ROC points, the published comparison, localization IoU of the attention box against true boxes,
the calibration (expected calibration error before and after, on the test split), subgroups
(sex, age band, view position), AUROC against radiologist-adjudicated labels, the
out-of-distribution detector, figures (PNG) and the model card; the same AUROC figures on the
validation split, where the branches are compared (does fusion, the served model, beat its own
global branch?) and recorded in the model registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr.core.atomic import atomic_write_json, atomic_write_text
from cxr.core.config import Params
from cxr.core.labels import PATHOLOGIES
from tasks.images.geometry import center_offset, network_pixels_from_image, to_input
from tasks.training.dataset import load_split
from tasks.metadata.ingest import packaged_metadata_path, read_metadata
from tasks.metadata.split import read_splits
from models.device import pick_device
from cxr.core.errors import DataError
from cxr.core.labels import BRANCHES
from tasks.bundle.bundle import FIGURES, MODEL_CARD, update_manifest
from tasks.bundle.calibration import Calibration, expected_calibration_error
from tasks.bundle.weights import load_agcnn, model_digest
from tasks.evaluation import figures as fig
from tasks.evaluation import intervals as iv
from tasks.evaluation.ood_corpus import FAR, NEAR, SHARED_STUDIES, make_ood_corpus
from tasks.evaluation.sections import interval_text as _ci, calibration_markdown, expert_markdown, render_ood, subgroup_markdown
from tasks.images.loader import load_image
from tasks.scoring.scorer import Scorer, batch_outputs
from tasks.training.metrics import roc_points
from tasks.training.registration import bundle_of_working_weights

# Mean AUROC over the 14 classes on the official ChestX-ray14 splits, as published. Other
# data, other hardware: a reference point, not a like-for-like comparison.
PUBLISHED = [
    ("Wang et al. (2017)", 0.738),
    ("Yao et al. (2017)", 0.803),
    ("Kumar et al. (2018)", 0.795),
    ("Rajpurkar et al. (2017), CheXNet", 0.842),
    ("Guan et al. (2018), AG-CNN ResNet-50", 0.868),
    ("Guan et al. (2018), AG-CNN DenseNet-121", 0.871),
]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of inclusive pixel boxes (N, 4) y0, x0, y1, x1, row by row."""
    y0, x0 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    y1, x1 = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(y1 - y0 + 1, 0, None) * np.clip(x1 - x0 + 1, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0] + 1) * (r[:, 3] - r[:, 1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def image_side(path: Path) -> int | None:
    """Width of a square image file from its header (None if unreadable or not square)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.width if im.width == im.height else None
    except (OSError, ValueError):
        return None


def read_true_boxes(path: Path) -> pd.DataFrame:
    """Boxes as (image_id, label, x, y, w, h): our synth `boxes.csv` or NIH's BBox_List_2017."""
    raw = pd.read_csv(path)
    if "image_id" in raw.columns:
        return raw[["image_id", "label", "x", "y", "w", "h"]]
    # NIH's header "Bbox [x,y,w,h]" spreads over four cells: name them by position.
    cols = list(raw.columns)
    return pd.DataFrame({"image_id": raw[cols[0]], "label": raw[cols[1]], "x": raw[cols[2]], "y": raw[cols[3]], "w": raw[cols[4]], "h": raw[cols[5]]})


def localization(boxes_px: np.ndarray, ids: list[str], truth: pd.DataFrame, scale: dict[str, float]) -> dict:
    """Best IoU per image between its attention box and any true box of that image.

    boxes_px are in the pixels of the image resized to load_size (the network input's crop
    offset added); `scale[id]` maps true-box pixels to them.
    """
    truth = truth[truth["image_id"].isin(ids)]
    if truth.empty:
        return {"images": 0}
    index = {image_id: i for i, image_id in enumerate(ids)}
    rows = truth["image_id"].map(index).to_numpy()
    s = truth["image_id"].map(scale).to_numpy()
    true = np.stack([truth["y"] * s, truth["x"] * s, (truth["y"] + truth["h"]) * s - 1, (truth["x"] + truth["w"]) * s - 1], 1)
    iou = pd.Series(box_iou(boxes_px[rows].astype(float), true)).groupby(truth["image_id"].to_numpy()).max()
    return {
        "images": int(len(iou)),
        "mean_iou": round(float(iou.mean()), 4),
        "iou_at_0.1": round(float((iou >= 0.1).mean()), 4),
        "iou_at_0.3": round(float((iou >= 0.3).mean()), 4),
    }


def true_box_scales(truth: pd.DataFrame, ids: list[str], images: Path, size: int, *, nih: bool, real: bool) -> dict[str, float]:
    """Per image, the factor from true-box pixels to those of the image resized to `size`;
    images the boxes do not apply to are left out.

    Synthetic boxes are in the pixels of the file they were drawn on: each file's side is read
    from its header. NIH's boxes are in the pixels of NIH's 1024-px release, whatever size the
    copy here has (the 64-px sample is a plain downscale). They count only for real NIH images,
    declared by params `data.metadata` (`real`) or recognisable as 1024-px files: synthetic demo
    images reuse NIH file names but not NIH anatomy.
    """
    boxed = set(truth["image_id"])
    sides = {i: image_side(images / i) for i in ids if i in boxed}
    if nih:
        return {i: size / 1024 for i, side in sides.items() if side and (real or side == 1024)}
    return {i: size / side for i, side in sides.items() if side}


def any_finding_auroc(y: np.ndarray, p: np.ndarray, bootstrap: int, seed: int) -> dict | str:
    """"No Finding" versus any finding: AUROC of the largest of the 14 probabilities for
    "at least one pathology", with its stratified BCa interval. Robust where the 14 per-class
    figures are not: on a small sample every class is rare, but about half the images
    have some finding (399 of the 800 NIH sample images are No Finding)."""
    out = iv.any_finding(y, p, bootstrap, seed)
    if out["auroc"] is None:
        return "not computable (the test split is all No Finding or all findings)"
    return out


def per_class(y: np.ndarray, p: np.ndarray, bootstrap: int, seed: int) -> dict:
    """{class: {auroc, ci95, positives, negatives, interval}}, or a sentence with the counts
    where the class has no positives or no negatives."""
    out = {}
    for k, label in enumerate(PATHOLOGIES):
        cell = iv.class_auroc(y[:, k], p[:, k], bootstrap, seed + k)
        out[label] = cell if cell["auroc"] is not None else (
            f"not computable ({cell['positives']} positives, {cell['negatives']} negatives in the split)")
    return out


def branch_probabilities(model, data, device: torch.device, batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({branch: (N, K) probabilities}, attention boxes (N, 4)) of the AG-CNN over a split."""
    outs = {b: [] for b in BRANCHES}
    boxes = []
    with torch.no_grad():
        for start in range(0, len(data.ids), batch_size):
            # One batch read at a time (from the image cache's shards): the split is never held whole.
            result = model(to_input(data.inputs(start, start + batch_size), device))
            for name, logits in zip(BRANCHES, (result.global_logits, result.local_logits, result.fusion_logits)):
                outs[name].append(torch.sigmoid(logits.float()).cpu())
            boxes.append(result.boxes.cpu())
    return {b: torch.cat(v).numpy() for b, v in outs.items()}, torch.cat(boxes).numpy()


def split_figures(y: np.ndarray, probs: dict[str, np.ndarray], bootstrap: int, seed: int) -> dict:
    """Per branch: mean AUROC with its bootstrap interval and the any-finding AUROC."""
    return {name: {**iv.mean_auroc(y, probs[name], bootstrap, seed),
                   "any_finding": any_finding_auroc(y, probs[name], bootstrap, seed)} for name in BRANCHES}


def fusion_vs_global(y: np.ndarray, probs: dict[str, np.ndarray], bootstrap: int, seed: int) -> dict:
    """Fusion minus global on one split, for the mean AUROC and the any-finding AUROC, with a
    paired bootstrap interval (the same resampled images for both; BCa). `worse`: the whole
    interval is below zero, i.e. fusion is worse than global beyond the sampling noise."""
    return iv.paired_difference(y, probs["fusion"], probs["global"], bootstrap, seed)


# --------------------------------------------------------------------------- calibration

def calibration_report(y: np.ndarray, raw: np.ndarray, calibration: Calibration) -> tuple[dict, dict]:
    """ECE of the served (fusion) probabilities on the test split before and after the bundle's
    calibration, per class and pooled, and the reliability curves (sklearn's calibration_curve,
    10 equal-width bins, all classes pooled). Returns (report entry, curves for the figures)."""
    from sklearn.calibration import calibration_curve

    after = calibration.apply("fusion", raw)
    out = {"method": calibration.method, "bins": 10, "split": "test", "ece": {}}
    curves = {}
    for name, p in (("uncalibrated", raw), ("calibrated", after)):
        per = {c: round(expected_calibration_error(y[:, k], p[:, k]), 4) for k, c in enumerate(PATHOLOGIES)}
        out["ece"][name] = {"per_class": per, "pooled": round(expected_calibration_error(y.ravel(), p.ravel()), 4),
                            "mean_over_classes": round(float(np.mean(list(per.values()))), 4)}
        frac, mean_p = calibration_curve(y.ravel(), p.ravel(), n_bins=10, strategy="uniform")
        curves[name] = (mean_p, frac)
    if calibration.is_identity:
        out["note"] = "no calibration stored with these weights (registered before calibration, or not registered)"
    return out, curves


# --------------------------------------------------------------------------- subgroups

AGE_BANDS = (("under 40", None, 40), ("40-59", 40, 60), ("60 and over", 60, None))


def subgroups(meta: pd.DataFrame, ids: list[str], y: np.ndarray, p: np.ndarray, bootstrap: int, seed: int) -> list[dict]:
    """Test AUROC of the served model by patient sex, age band and view position: the
    any-finding AUROC (stratified interval) and the mean over classes (image resamples). A
    group with fewer than MIN_CASES images with or without findings shows its n and no
    interval."""
    facts = meta.set_index("image_id").loc[ids]
    sex = facts["sex"].astype(str).str.upper().to_numpy()
    age = pd.to_numeric(facts["age"], errors="coerce").to_numpy()
    view = facts["view"].astype(str).str.upper().to_numpy()
    masks = [("sex", "female", sex == "F"), ("sex", "male", sex == "M")]
    masks += [("age", name, (age >= (lo if lo is not None else -np.inf)) & (age < (hi if hi is not None else np.inf)))
              for name, lo, hi in AGE_BANDS]
    masks += [("view", "PA", view == "PA"), ("view", "AP", view == "AP")]
    out = []
    for i, (attribute, group, mask) in enumerate(masks):
        yy, pp = y[mask], p[mask]
        anyf = y[mask].max(1) if len(yy) else np.zeros(0)
        enough = len(yy) and min(int(anyf.sum()), int(len(anyf) - anyf.sum())) >= iv.MIN_CASES
        entry = {"attribute": attribute, "group": group, "images": int(mask.sum()),
                 "with_findings": int(anyf.sum()) if len(yy) else 0}
        if not len(yy):
            entry.update(any_finding={"auroc": None, "ci95": None}, mean={"auroc": None, "ci95": None},
                         note="no test images in this group")
            out.append(entry)
            continue
        a = iv.any_finding(yy, pp, bootstrap if enough else 0, seed + i)
        m = iv.mean_auroc(yy, pp, bootstrap if enough else 0, seed + i)
        entry["any_finding"] = {"auroc": a["auroc"], "ci95": a["ci95"]}
        entry["mean"] = {"auroc": m["mean_auroc"], "ci95": m["mean_auroc_ci95"],
                         "classes": int(np.isfinite(iv.auroc_columns(yy, pp)).sum())}
        if not enough:
            entry["note"] = f"too small for an interval (fewer than {iv.MIN_CASES} images with or without findings)"
        out.append(entry)
    return out


# --------------------------------------------------------------------------- expert labels

GOOGLE_LABELS = "google2019_nih-chest-xray-labels.csv.gz"
#: Google's adjudicated label -> the classes whose largest probability scores it. Airspace
#: opacity covers consolidation, pneumonia and infiltrates (Majkowska et al. 2019); fracture
#: has no ChestX-ray14 class and is left out.
EXPERT_CLASSES = {"Pneumothorax": ("Pneumothorax",), "Nodule or mass": ("Nodule", "Mass"),
                  "Airspace opacity": ("Consolidation", "Pneumonia", "Infiltration")}


def expert_labels(ids: list[str], p: np.ndarray, bootstrap: int, seed: int, *, synthetic: bool,
                  path: Path | None = None) -> dict:
    """AUROC of the served model against the radiologist-adjudicated labels Google published
    for 4,376 NIH images (Majkowska et al., Radiology 2019; the CSV in the torchxrayvision
    wheel), on the test images that have them (matched by Image Index), with n."""
    try:
        path = path or packaged_metadata_path().parent / GOOGLE_LABELS
        labels = pd.read_csv(path)
    except (DataError, OSError, ValueError) as exc:
        return {"error": f"the adjudicated labels cannot be read ({exc})"}
    labels = labels.drop_duplicates("Image Index").set_index("Image Index")
    index = {image_id: i for i, image_id in enumerate(ids)}
    matched = [i for i in ids if i in labels.index]
    out = {"source": "Majkowska et al. (2019), radiologist-adjudicated labels (torchxrayvision/data/" + GOOGLE_LABELS + ")",
           "labelled_images": int(len(labels)), "test_images_with_labels": len(matched), "labels": {},
           "not_scored": {"Fracture": "no ChestX-ray14 class"}}
    if synthetic:
        out["note"] = ("the test images are synthetic renderings that reuse NIH file names: these labels describe the "
                       "real films of those names, not the pictures the model saw; shown for the mechanics only")
    rows = np.array([index[i] for i in matched], dtype=int)
    for label, classes in EXPERT_CLASSES.items():
        truth = labels.loc[matched, label].astype(str).str.upper().eq("YES").to_numpy() if matched else np.zeros(0, bool)
        score = p[rows][:, [PATHOLOGIES.index(c) for c in classes]].max(1) if matched else np.zeros(0)
        cell = iv.class_auroc(truth, score, bootstrap, seed)
        out["labels"][label] = {**cell, "images": len(matched), "classes": list(classes)}
    return out


# --------------------------------------------------------------------------- training curves

def training_histories(metrics_dir: Path) -> dict[str, list[dict]]:
    """Each stage's epoch history (loss, validation mean AUROC) from its train_<stage>.json."""
    out = {}
    for stage in BRANCHES:
        path = Path(metrics_dir) / f"train_{stage}.json"
        try:
            out[stage] = list(json.loads(path.read_text()).get("history") or [])
        except (OSError, ValueError):
            out[stage] = []
    return out


def evaluate(params: Params, *, truth_boxes: list[Path] | None = None) -> dict:
    paths = params.paths
    device = pick_device(params.train.device)
    meta = read_metadata(Path(paths.interim) / "metadata.parquet")
    splits = read_splits(Path(paths.processed) / "splits.parquet")
    test = load_split(meta, splits, "test", Path(paths.images), params.model, Path(paths.cache) / "images")
    valid = load_split(meta, splits, "valid", Path(paths.images), params.model, Path(paths.cache) / "images")
    model = load_agcnn(Path(paths.models), params.model).to(device)
    batch = params.train.fusion.batch_size
    probs, boxes = branch_probabilities(model, test, device, batch)
    valid_probs, _ = branch_probabilities(model, valid, device, batch)
    y, y_valid = test.labels.numpy(), valid.labels.numpy()
    # Attention boxes from network-input pixels into the resized image the input was cropped from.
    boxes_px = boxes + center_offset(params.model.load_size, params.model.image_size)
    b, seed = params.evaluate.bootstrap, params.seed
    bundle = bundle_of_working_weights(params)
    calibration = bundle.calibration() if bundle is not None else Calibration.identity()

    report: dict = {"model_digest": model_digest(Path(paths.models)), "test_images": len(test.ids), "branches": {},
                    "test_positives": {c: int(v) for c, v in zip(PATHOLOGIES, y.sum(0))},
                    "intervals": f"95%, scipy.stats.bootstrap with {b} resamples: BCa where it is defined (up to "
                                 f"{iv.BCA_MAX_IMAGES} images), per class stratified by label; no interval with fewer "
                                 f"than {iv.MIN_CASES} positives or negatives"}
    for name in BRANCHES:
        classes = per_class(y, probs[name], b, seed)
        report["branches"][name] = {
            **iv.mean_auroc(y, probs[name], b, seed), "per_class": classes,
            "classes_in_mean": int(sum(isinstance(v, dict) for v in classes.values())),
            "any_finding": any_finding_auroc(y, probs[name], b, seed),
        }
    # Localization against every true-box file that covers test images.
    report["localization"] = {}
    size = params.model.load_size
    for box_file in truth_boxes or []:
        if not Path(box_file).exists():
            continue
        truth = read_true_boxes(Path(box_file))
        scale = true_box_scales(truth, test.ids, Path(paths.images), size, nih="BBox" in Path(box_file).name,
                                real=params.data.metadata is not None)
        report["localization"][Path(box_file).name] = localization(
            boxes_px, test.ids, truth[truth["image_id"].isin(scale)], scale)
    report["validation"] = {"images": len(valid.ids), "branches": split_figures(y_valid, valid_probs, b, seed),
                            "fusion_minus_global": fusion_vs_global(y_valid, valid_probs, b, seed)}
    report["test_fusion_minus_global"] = fusion_vs_global(y, probs, b, seed)
    report["calibration"], curves = calibration_report(y, probs["fusion"], calibration)
    report["subgroups"] = subgroups(meta, test.ids, y, probs["fusion"], b, seed)
    synthetic = bundle is not None and bundle.training_kind == "synthetic"
    report["expert_labels"] = expert_labels(test.ids, probs["fusion"], b, seed, synthetic=synthetic)
    report["ood"] = ood_detector(params, report["model_digest"], test.ids)
    report["published"] = [{"method": m, "mean_auroc": v, "note": "published on the official ChestX-ray14 split; other data and hardware"} for m, v in PUBLISHED]
    if bundle is not None:
        report["bundle"] = {"training_data": bundle.manifest.get("training_data"),
                            "training_data_version": bundle.manifest.get("training_data_version"),
                            "thresholds": bundle.manifest.get("thresholds"), "ood_gate": bundle.manifest.get("ood_gate"),
                            "calibration": bundle.manifest.get("calibration")}

    metrics = Path(paths.metrics)
    histories = training_histories(metrics)
    report["figures"] = render_figures(report, y, probs["fusion"], curves, histories, Path(paths.reports) / FIGURES)
    fig.write_plot_data(metrics / "plots", fig.roc_long(y, probs["fusion"]), curves, histories)
    atomic_write_json(metrics / "evaluate.json", {
        "model_digest": report["model_digest"], "test_images": report["test_images"],
        **{f"{b}_mean_auroc": report["branches"][b]["mean_auroc"] for b in BRANCHES},
        **{f"{b}_any_finding_auroc": report["branches"][b]["any_finding"]["auroc"] for b in BRANCHES
           if isinstance(report["branches"][b]["any_finding"], dict)},
        **{f"localization_{k.split('.')[0]}_mean_iou": v.get("mean_iou") for k, v in report["localization"].items() if v["images"]},
        "fusion_ece_uncalibrated": report["calibration"]["ece"]["uncalibrated"]["pooled"],
        "fusion_ece_calibrated": report["calibration"]["ece"]["calibrated"]["pooled"],
        **ood_metrics(report["ood"]),
    })
    atomic_write_json(metrics / "evaluate_detail.json", report)
    record_evaluation(params, report)
    atomic_write_json(metrics / "roc_fusion.json", roc_points(y, probs["fusion"], list(PATHOLOGIES)))
    text = render_markdown(report)
    reports = Path(paths.reports)
    atomic_write_text(reports / "evaluation.md", text)
    from tasks.evaluation.model_card import markdown_html, model_card

    atomic_write_text(reports / "evaluation.html", markdown_html(text, "AG-CNN evaluation"))
    card = model_card(report, bundle.manifest if bundle is not None else None)
    atomic_write_text(reports / MODEL_CARD, card)
    if bundle is not None and bundle.digest == report["model_digest"]:
        # The bundle keeps its own card and figures (a rollback shows the card of what it serves).
        atomic_write_text(bundle.folder / MODEL_CARD, card)
        (bundle.folder / FIGURES).mkdir(exist_ok=True)
        for name in report["figures"].values():
            shutil.copy2(reports / FIGURES / name, bundle.folder / FIGURES / name)
    return report


def render_figures(report: dict, y: np.ndarray, p: np.ndarray, curves: dict, histories: dict, folder: Path) -> dict[str, str]:
    """Every figure of the report as a PNG in `folder`: {key: file name}."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = report["model_digest"][:12]
    fusion = report["branches"]["fusion"]
    aurocs = {c: v["auroc"] for c, v in fusion["per_class"].items() if isinstance(v, dict)}
    anyf = fusion["any_finding"]["auroc"] if isinstance(fusion["any_finding"], dict) else None
    out = {"roc": fig.roc_figure(y, p, aurocs, anyf, folder / fig.FIGURES["roc"],
                                 f"ROC, fusion (served), test split ({len(y)} images), model {digest}"),
           "auroc": fig.auroc_figure({b: report["branches"][b]["per_class"] for b in BRANCHES}, report["test_positives"],
                                     folder / fig.FIGURES["auroc"], f"per-class test AUROC, model {digest}"),
           "reliability": fig.reliability_figure(curves, report["calibration"]["ece"], folder / fig.FIGURES["reliability"],
                                                 f"calibration ({report['calibration']['method']}), model {digest}"),
           "subgroups": fig.subgroup_figure(report["subgroups"], folder / fig.FIGURES["subgroups"],
                                            f"test AUROC by subgroup, model {digest}")}
    if any(histories.values()):
        out["training"] = fig.training_figure(histories, folder / fig.FIGURES["training"], "training curves per stage")
    ood = report.get("ood") or {}
    if ood.get("scores") and ood.get("gate"):
        out["ood"] = fig.ood_figure(ood["scores"], ood["gate"]["threshold"], folder / fig.FIGURES["ood"],
                                    f"out-of-distribution gate score, model {digest}")
    return out


def record_evaluation(params: Params, report: dict) -> dict | None:
    """Add the evaluation's branch figures (global, local, fusion: validation and test mean and
    any-finding AUROC with bootstrap intervals, fusion minus global), the calibration error
    before and after, and the detector's rates to the bundle of the evaluated weights. None,
    and nothing written, when those weights are not registered."""
    bundle = bundle_of_working_weights(params)
    if bundle is None or bundle.digest != report["model_digest"]:
        return None

    def figures(branch: dict) -> dict:
        anyf = branch["any_finding"]
        return {"mean_auroc": branch["mean_auroc"], "mean_auroc_ci95": branch["mean_auroc_ci95"],
                "any_finding_auroc": anyf.get("auroc") if isinstance(anyf, dict) else None,
                "any_finding_ci95": anyf.get("ci95") if isinstance(anyf, dict) else None}

    evaluation = {
        "test_images": report["test_images"],
        "validation": {b: figures(v) for b, v in report["validation"]["branches"].items()},
        "test": {b: figures(v) for b, v in report["branches"].items()},
        "fusion_minus_global": {"validation": report["validation"]["fusion_minus_global"],
                                "test": report["test_fusion_minus_global"]},
        "calibration_ece": {k: v["pooled"] for k, v in report["calibration"]["ece"].items()},
        "ood": ood_metrics(report.get("ood") or {}),
    }
    update_manifest(bundle, evaluation=evaluation)
    return evaluation


def render_markdown(report: dict) -> str:
    figures = report.get("figures", {})
    lines = ["# AG-CNN evaluation (test split)", "", f"Model digest `{report['model_digest'][:16]}`, {report['test_images']} test images. "
             f"Intervals: {report.get('intervals', '95% bootstrap')}.", ""]
    lines += ["| class | test positives | global | local | fusion |", "| --- | --- | --- | --- | --- |"]
    for label in PATHOLOGIES:
        cells = []
        for b in BRANCHES:
            v = report["branches"][b]["per_class"][label]
            cells.append(f"{v['auroc']:.3f}{_ci(v.get('ci95'))}" if isinstance(v, dict) else "n/a")
        lines.append(f"| {label} | {report.get('test_positives', {}).get(label, '?')} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | | " + " | ".join(_mean_cell(report["branches"][b], bold=True) for b in BRANCHES) + " |")
    cells = [_cell(report["branches"][b]["any_finding"]) for b in BRANCHES]
    anyf = report["branches"]["fusion"]["any_finding"]
    lines.append(f"| No Finding vs any finding (max of the 14) | {anyf.get('images_with_findings', '?') if isinstance(anyf, dict) else '?'} | "
                 + " | ".join(cells) + " |")
    lines += ["", "A class without positives or negatives in the test split is n/a and left out of the mean; a class "
              f"with fewer than {iv.MIN_CASES} positives shows its AUROC without an interval.", ""]
    lines += [f"![{alt}](figures/{figures[k]})" for k, alt in (("roc", "ROC curves per class"), ("auroc", "per-class AUROC with intervals"))
              if k in figures] + [""]
    if "validation" in report:
        lines += validation_markdown(report)
    lines += calibration_markdown(report.get("calibration"), figures)
    lines += subgroup_markdown(report.get("subgroups"), figures)
    lines += expert_markdown(report.get("expert_labels"))
    if "training" in figures:
        lines += ["## Training curves", "", f"![training curves per stage](figures/{figures['training']})", ""]
    lines += ["## Published results (other data and hardware: context, not a like-for-like comparison)", "", "| method | mean AUROC |", "| --- | --- |"]
    lines += [f"| {p['method']} | {p['mean_auroc']:.3f} |" for p in report["published"]]
    if report["localization"]:
        lines += ["", "## Localization: attention box vs true lesion box", "", "| boxes | images | mean IoU | IoU≥0.1 | IoU≥0.3 |", "| --- | --- | --- | --- | --- |"]
        for name, v in report["localization"].items():
            lines.append(f"| {name} | {v['images']} | {v.get('mean_iou', 'n/a')} | {v.get('iou_at_0.1', 'n/a')} | {v.get('iou_at_0.3', 'n/a')} |")
    lines += render_ood(report.get("ood"))
    if "ood" in figures:
        lines += ["", f"![out-of-distribution gate scores](figures/{figures['ood']})"]
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if isinstance(v, dict) and v.get("auroc") is not None:
        return f"{v['auroc']:.3f}{_ci(v.get('ci95'))}"
    return "n/a"


def _mean_cell(v: dict, bold: bool = False) -> str:
    if v["mean_auroc"] is None:
        return "n/a"
    value = f"**{v['mean_auroc']:.3f}**" if bold else f"{v['mean_auroc']:.3f}"
    return value + _ci(v.get("mean_auroc_ci95"))


def validation_markdown(report: dict) -> list[str]:
    """The branch comparison: validation and test, mean and any-finding AUROC with intervals,
    and in plain words whether the served fusion model is worse than its global branch."""
    val = report["validation"]
    test = {name: {"mean_auroc": v["mean_auroc"], "mean_auroc_ci95": v["mean_auroc_ci95"], "any_finding": v["any_finding"]}
            for name, v in report["branches"].items()}
    lines = ["## Branches on validation and test", "",
             f"{val['images']} validation images, {report['test_images']} test images; 95% bootstrap intervals.", "",
             "| branch | valid mean AUROC | valid any finding | test mean AUROC | test any finding |", "| --- | --- | --- | --- | --- |"]
    for name in BRANCHES:
        v, t = val["branches"][name], test[name]
        lines.append(f"| {name} | {_mean_cell(v)} | {_cell(v['any_finding'])} | {_mean_cell(t)} | {_cell(t['any_finding'])} |")
    lines.append("")
    for split, diff in (("validation", val["fusion_minus_global"]), ("test", report["test_fusion_minus_global"])):
        for key, what in (("mean_auroc", "mean AUROC"), ("any_finding_auroc", "No Finding vs any finding AUROC")):
            d = diff[key]
            if d["difference"] is None:
                continue
            interval = (f" (95% interval {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})" if None not in d["ci95"] else "")
            if d["worse"]:
                lines.append(f"- **On the {split} split, fusion (the served model) is worse than its global branch**: "
                             f"{what} {d['difference']:+.3f} (95% interval {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}, "
                             "entirely below zero). Serving the global branch alone would do better here.")
            else:
                lines.append(f"- On the {split} split, fusion minus global {what}: {d['difference']:+.3f}{interval}.")
    return lines + [""]
# --------------------------------------------------------------------------- out-of-distribution detector

# Real radiographs a model that learned from synthetic images never saw: the shared NIH sample
# beside a checkout (may be absent), all of it, and the shared real studies.
REAL_SAMPLE_IMAGES = 800
#: The honest mark: at least this share of real films marked under a synthetic model, at most
#: MAX_TEST_MARKED of its own test split.
MIN_REAL_MARKED, MAX_TEST_MARKED = 0.95, 0.05


def _screen_files(scorer: Scorer, paths: list[Path]) -> list[dict]:
    """Each file through the Scorer (the one loader, precheck, gate and verdict), as
    `cxr score` sees it: who refused it and why, and its gate distance.

    `refused_by` and `reason` are the verdict's. `ood_score` and `over_threshold` are the
    gate's view of every decoded file, also of one the precheck refused (scoring never runs the
    model on those): how the gate alone would judge it. `marked`: the study is marked unlike
    the training data (refused, or flagged by the gate). `components`: a two-part gate's
    distances."""
    rows = []
    for start in range(0, len(paths), scorer.params.score.batch_size):
        chunk = paths[start : start + scorer.params.score.batch_size]
        prechecked = []
        for path, study in zip(chunk, scorer.score([(p.name, p) for p in chunk], "evaluation")):
            verdict = study.verdict
            refused_by = None if study.row["status"] == "scored" else (verdict.refused_by if verdict else None) or "loader"
            score = None if verdict is None or verdict.score is None else round(float(verdict.score), 3)
            rows.append({"file": path.name, "refused_by": refused_by,
                         "reason": study.row["reason"] if refused_by else None, "ood_score": score,
                         "over_threshold": bool(verdict and verdict.over_threshold),
                         "components": (study.ood or {}).get("components")})
            if refused_by == "precheck":
                prechecked.append((rows[-1], path))
        if prechecked and scorer.gate is not None:
            scores, parts = _gate_distances(scorer, [p for _, p in prechecked])
            for j, (row, _) in enumerate(prechecked):
                row.update(ood_score=round(float(scores[j]), 3), over_threshold=bool(scores[j] > scorer.gate.threshold))
                if scorer.gate.two_part:
                    row["components"] = {k: {"distance": round(float(v[j]), 4)} for k, v in parts.items()}
    for row in rows:
        row["marked"] = row["refused_by"] in ("precheck", "gate") or row["over_threshold"]
    return rows


def _gate_distances(scorer: Scorer, paths: list[Path]) -> tuple[np.ndarray, dict]:
    """The gate's scores (and per-part distances) of decodable files, as the Scorer would feed
    them to the model."""
    pixels = np.stack([network_pixels_from_image(load_image(p, scorer.limits), scorer.geometry) for p in paths])
    pooled = batch_outputs(scorer.model, torch.from_numpy(pixels), scorer.device)["pooled"]
    parts = scorer.gate_parts(pooled, pixels)
    return scorer.gate.combine(parts), parts


def _rates(rows: list[dict]) -> dict:
    n = max(len(rows), 1)
    marked = sum(r["marked"] for r in rows)
    return {"images": len(rows), "refused": sum(r["refused_by"] is not None for r in rows),
            "precheck_refused": sum(r["refused_by"] == "precheck" for r in rows),
            "gate_over_threshold": sum(r["over_threshold"] for r in rows),
            "marked": marked, "marked_rate": round(marked / n, 4),
            "scored_rate": round(sum(r["refused_by"] is None for r in rows) / n, 4)}


def _part_rates(rows: list[dict], gate) -> dict | None:
    """Share of the rows each part of a two-part gate alone would mark."""
    if gate is None or not gate.two_part:
        return None
    n = max(len(rows), 1)
    limits = {"features": gate.feature_threshold, "image_statistics": gate.stats_threshold}
    return {k: round(sum(bool(r["components"]) and r["components"][k]["distance"] > lim for r in rows) / n, 4)
            for k, lim in limits.items()}


def real_sample_applies(params: Params, scorer: Scorer, sample: Path) -> bool:
    """Are the shared real films held out for this model? Yes for a model that learned from
    synthetic images (the demo); for an older bundle that does not say, when the params are the
    demo's and the sample is not its image folder."""
    if not sample.is_dir():
        return False
    kind = (scorer.entry.get("training_data") or {}).get("kind")
    if kind is not None:
        return kind == "synthetic"
    return params.data.metadata is None and Path(params.paths.images).resolve() != sample.resolve()


def ood_detector(params: Params, digest: str, test_ids: list[str]) -> dict:
    """The out-of-distribution detector of the bundle `digest` on the test split (false
    rejections and marks), on the generated non-chest corpus (detection; near cases apart) and,
    for a model that learned from synthetic images, on real radiographs it never saw (the
    shared NIH sample and studies), all through the Scorer under score.ood: the precheck
    refuses under reject and flag, the gate only under reject; `flagged` counts gate scores
    over the threshold, `marked` the studies marked unlike the training data either way."""
    import tempfile

    mode = params.score.ood
    try:
        scorer = Scorer.load(params, digest=digest)
    except DataError as exc:
        return {"mode": mode, "error": str(exc)}
    gate = scorer.gate
    report: dict = {"mode": mode, "gate": None if gate is None else {
        "method": gate.method, "threshold": round(gate.threshold, 3), "target_false_rejection": gate.false_rejection,
        "valid_false_rejection": round(gate.valid_false_rejection, 4), "two_part": gate.two_part,
        **({"feature_threshold": round(gate.feature_threshold, 3), "stats_threshold": round(gate.stats_threshold, 3)}
           if gate.two_part else {})}}
    if mode == "off":
        return report

    rows = _screen_files(scorer, [Path(params.paths.images) / i for i in test_ids])
    rates = _rates(rows)
    report["test"] = {**rates, "false_rejection_rate": round(rates["refused"] / max(len(rows), 1), 4),
                      "flag_rate": round(rates["gate_over_threshold"] / max(len(rows), 1), 4),
                      "by_part": _part_rates(rows, gate)}
    scores = {"test split": [r["ood_score"] for r in rows]}

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_ood_corpus(tmp, SHARED_STUDIES if (SHARED_STUDIES / "00000001_000.png").exists() else None)
        rows = _screen_files(scorer, [Path(tmp) / name for name in sorted(manifest)])
    report["corpus"] = {"items": {r["file"]: {**{k: v for k, v in r.items() if k not in ("file", "components")},
                                              "kind": manifest[r["file"]]} for r in rows}}
    for kind in (FAR, NEAR):
        items = [r for r in report["corpus"]["items"].values() if r["kind"] == kind]
        if items:
            detected = sum(r["refused_by"] is not None for r in items)
            report["corpus"][kind] = {"items": len(items), "refused": detected, "detection_rate": round(detected / len(items), 4),
                                      "flagged_or_refused": sum(r["refused_by"] is not None or r["over_threshold"] for r in items)}
    if "near" not in report["corpus"]:
        report["corpus"]["near_skipped"] = f"the shared radiograph {SHARED_STUDIES / '00000001_000.png'} is absent"
    scores["not a chest radiograph (corpus)"] = [r["ood_score"] for r in rows]

    # Real radiographs from outside this model's training data (the demo model learned from synthetic images).
    sample = SHARED_STUDIES.parent / "nih-sample-64" / "images"
    if real_sample_applies(params, scorer, sample):
        rows = _screen_files(scorer, sorted(sample.glob("*.png"))[:REAL_SAMPLE_IMAGES])
        report["real_sample"] = {**_rates(rows), "flagged": sum(r["over_threshold"] for r in rows),
                                 "by_part": _part_rates(rows, gate), "source": str(sample.parent.name)}
        scores["real NIH films"] = [r["ood_score"] for r in rows]
        studies = sorted(p for p in SHARED_STUDIES.glob("*") if p.suffix.lower() in (".png", ".dcm")) if SHARED_STUDIES.is_dir() else []
        if studies:
            rows = _screen_files(scorer, studies)
            report["real_studies"] = {r["file"]: {"marked": r["marked"], "ood_score": r["ood_score"],
                                                  "refused_by": r["refused_by"]} for r in rows}
        real, test = report["real_sample"]["marked_rate"], report["test"]["marked_rate"]
        report["honest_mark"] = {"real_marked": real, "test_marked": test, "target_real": MIN_REAL_MARKED,
                                 "target_test": MAX_TEST_MARKED, "met": bool(real >= MIN_REAL_MARKED and test <= MAX_TEST_MARKED)}
    report["scores"] = scores
    return report


def ood_metrics(ood: dict) -> dict:
    """The detector's headline numbers for evaluate.json."""
    out = {}
    if "test" in ood:
        out["ood_test_false_rejection"] = ood["test"]["false_rejection_rate"]
        out["ood_test_flag_rate"] = ood["test"]["flag_rate"]
        out["ood_test_marked"] = ood["test"]["marked_rate"]
    for kind in ("far", "near"):
        if kind in ood.get("corpus", {}):
            out[f"ood_{kind}_detection"] = ood["corpus"][kind]["detection_rate"]
    if "real_sample" in ood:
        out["ood_real_sample_scored"] = ood["real_sample"]["scored_rate"]
        out["ood_real_sample_marked"] = ood["real_sample"]["marked_rate"]
    return out
