"""Test-split evaluation of the three branches: AUROC with bootstrap intervals, ROC points,
the published comparison, and localization IoU of the attention box against true boxes; the
same AUROC figures on the validation split, where the branches are compared (does fusion,
the served model, beat its own global branch?) and recorded in the model registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr.core.atomic import atomic_write_json, atomic_write_text
from cxr.core.config import Params
from cxr.core.labels import PATHOLOGIES
from tasks.images.geometry import center_offset, network_pixels_from_image, to_input
from tasks.training.dataset import load_split
from tasks.metadata.ingest import read_metadata
from tasks.training.metrics import auroc_per_class, bootstrap_auroc, roc_points
from tasks.metadata.split import read_splits
from models.device import pick_device
from cxr.core.errors import DataError
from cxr.core.labels import BRANCHES
from tasks.bundle.bundle import update_manifest
from tasks.bundle.weights import load_agcnn, model_digest
from tasks.evaluation.ood_corpus import FAR, NEAR, SHARED_STUDIES, make_ood_corpus
from tasks.images.loader import load_image
from tasks.scoring.scorer import Scorer, batch_outputs
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
    "at least one pathology", with its bootstrap interval. Robust where the 14 per-class
    figures are not: on a small sample every class is rare, but about half the images
    have some finding (399 of the 800 NIH sample images are No Finding)."""
    has_finding = y.max(axis=1, keepdims=True)
    score = p.max(axis=1, keepdims=True)
    value = auroc_per_class(has_finding, score)[0]
    if not np.isfinite(value):
        return "not computable (the test split is all No Finding or all findings)"
    (lo, hi), = bootstrap_auroc(has_finding, score, bootstrap, seed)["per_class"]
    return {"auroc": round(float(value), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "score": "max of the 14 class probabilities", "images_with_findings": int(has_finding.sum())}


def branch_probabilities(model, data, device: torch.device, batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({branch: (N, K) probabilities}, attention boxes (N, 4)) of the AG-CNN over a split."""
    outs = {b: [] for b in BRANCHES}
    boxes = []
    with torch.no_grad():
        for start in range(0, len(data.ids), batch_size):
            result = model(to_input(data.pixels[start : start + batch_size], device))
            for name, logits in zip(BRANCHES, (result.global_logits, result.local_logits, result.fusion_logits)):
                outs[name].append(torch.sigmoid(logits.float()).cpu())
            boxes.append(result.boxes.cpu())
    return {b: torch.cat(v).numpy() for b, v in outs.items()}, torch.cat(boxes).numpy()


def split_figures(y: np.ndarray, probs: dict[str, np.ndarray], bootstrap: int, seed: int) -> dict:
    """Per branch: mean AUROC with its bootstrap interval and the any-finding AUROC."""
    out = {}
    for name in BRANCHES:
        per_class = auroc_per_class(y, probs[name])
        ci = bootstrap_auroc(y, probs[name], bootstrap, seed)
        out[name] = {"mean_auroc": round(float(np.nanmean(per_class)), 4) if np.isfinite(per_class).any() else None,
                     "mean_auroc_ci95": [round(v, 4) for v in ci["mean"]],
                     "any_finding": any_finding_auroc(y, probs[name], bootstrap, seed)}
    return out


def fusion_vs_global(y: np.ndarray, probs: dict[str, np.ndarray], bootstrap: int, seed: int) -> dict:
    """Fusion minus global on one split, for the mean AUROC and the any-finding AUROC, with a
    paired bootstrap interval (the same resampled images for both). `worse`: the whole interval
    is below zero, i.e. fusion is worse than global beyond the sampling noise."""
    rng = np.random.default_rng(seed)
    n = len(y)
    anyf = y.max(axis=1, keepdims=True)

    def diffs(idx):
        yy, g, f = y[idx], probs["global"][idx], probs["fusion"][idx]
        per_class = auroc_per_class(yy, f) - auroc_per_class(yy, g)  # NaN where not computable in this resample
        with np.errstate(all="ignore"):
            mean = np.nanmean(per_class) if np.isfinite(per_class).any() else np.nan
        a = auroc_per_class(anyf[idx], f.max(1, keepdims=True))[0] - auroc_per_class(anyf[idx], g.max(1, keepdims=True))[0]
        return mean, a

    point = diffs(np.arange(n))
    draws = np.array([diffs(rng.integers(0, n, n)) for _ in range(bootstrap)]) if bootstrap else np.full((1, 2), np.nan)
    out = {}
    for j, key in enumerate(("mean_auroc", "any_finding_auroc")):
        finite = draws[np.isfinite(draws[:, j]), j]
        lo, hi = (np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan))
        value = point[j]
        out[key] = {"difference": None if not np.isfinite(value) else round(float(value), 4),
                    "ci95": [None if not np.isfinite(v) else round(float(v), 4) for v in (lo, hi)],
                    "worse": bool(np.isfinite(hi) and hi < 0)}
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

    report: dict = {"model_digest": model_digest(Path(paths.models)), "test_images": len(test.ids), "branches": {}}
    for name in BRANCHES:
        per_class = auroc_per_class(y, probs[name])
        ci = bootstrap_auroc(y, probs[name], params.evaluate.bootstrap, params.seed)
        report["branches"][name] = {
            "mean_auroc": round(float(np.nanmean(per_class)), 4) if np.isfinite(per_class).any() else None,
            "mean_auroc_ci95": [round(v, 4) for v in ci["mean"]],
            "per_class": {
                label: ({"auroc": round(float(v), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]} if np.isfinite(v) else "not computable (no positives or no negatives in the test split)")
                for label, v, (lo, hi) in zip(PATHOLOGIES, per_class, ci["per_class"])
            },
            "classes_in_mean": int(np.isfinite(per_class).sum()),
            "any_finding": any_finding_auroc(y, probs[name], params.evaluate.bootstrap, params.seed),
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
    b, seed = params.evaluate.bootstrap, params.seed
    report["validation"] = {"images": len(valid.ids), "branches": split_figures(y_valid, valid_probs, b, seed),
                            "fusion_minus_global": fusion_vs_global(y_valid, valid_probs, b, seed)}
    report["test_fusion_minus_global"] = fusion_vs_global(y, probs, b, seed)
    report["ood"] = ood_detector(params, report["model_digest"], test.ids)
    report["published"] = [{"method": m, "mean_auroc": v, "note": "published on the official ChestX-ray14 split; other data and hardware"} for m, v in PUBLISHED]

    metrics = Path(paths.metrics)
    atomic_write_json(metrics / "evaluate.json", {
        "model_digest": report["model_digest"], "test_images": report["test_images"],
        **{f"{b}_mean_auroc": report["branches"][b]["mean_auroc"] for b in BRANCHES},
        **{f"{b}_any_finding_auroc": report["branches"][b]["any_finding"]["auroc"] for b in BRANCHES
           if isinstance(report["branches"][b]["any_finding"], dict)},
        **{f"localization_{k.split('.')[0]}_mean_iou": v.get("mean_iou") for k, v in report["localization"].items() if v["images"]},
        **ood_metrics(report["ood"]),
    })
    atomic_write_json(metrics / "evaluate_detail.json", report)
    record_evaluation(params, report)
    atomic_write_json(metrics / "roc_fusion.json", roc_points(y, probs["fusion"], list(PATHOLOGIES)))
    atomic_write_text(Path(paths.reports) / "evaluation.md", render_markdown(report))
    return report


def record_evaluation(params: Params, report: dict) -> dict | None:
    """Add the evaluation's branch figures (global, local, fusion: validation and test mean and
    any-finding AUROC with bootstrap intervals, fusion minus global) to the bundle of the
    evaluated weights. None, and nothing written, when those weights are not registered."""
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
        "ood": ood_metrics(report.get("ood") or {}),
    }
    update_manifest(bundle, evaluation=evaluation)
    return evaluation


def render_markdown(report: dict) -> str:
    lines = ["# AG-CNN evaluation (test split)", "", f"Model digest `{report['model_digest'][:16]}`, {report['test_images']} test images.", ""]
    lines += ["| class | global | local | fusion |", "| --- | --- | --- | --- |"]
    for label in PATHOLOGIES:
        cells = []
        for b in BRANCHES:
            v = report["branches"][b]["per_class"][label]
            cells.append(f"{v['auroc']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" if isinstance(v, dict) else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    means = [report["branches"][b]["mean_auroc"] for b in BRANCHES]
    lines.append("| **mean** | " + " | ".join("n/a" if m is None else f"**{m:.3f}**" for m in means) + " |")
    cells = []
    for b in BRANCHES:
        v = report["branches"][b]["any_finding"]
        cells.append(f"{v['auroc']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" if isinstance(v, dict) else "n/a")
    lines.append("| No Finding vs any finding (max of the 14) | " + " | ".join(cells) + " |")
    lines += ["", "Classes without positives or negatives in the test split are marked n/a and left out of the mean.", ""]
    if "validation" in report:
        lines += validation_markdown(report)
    lines += ["## Published results (other data and hardware: context, not a like-for-like comparison)", "", "| method | mean AUROC |", "| --- | --- |"]
    lines += [f"| {p['method']} | {p['mean_auroc']:.3f} |" for p in report["published"]]
    if report["localization"]:
        lines += ["", "## Localization: attention box vs true lesion box", "", "| boxes | images | mean IoU | IoU≥0.1 | IoU≥0.3 |", "| --- | --- | --- | --- | --- |"]
        for name, v in report["localization"].items():
            lines.append(f"| {name} | {v['images']} | {v.get('mean_iou', 'n/a')} | {v.get('iou_at_0.1', 'n/a')} | {v.get('iou_at_0.3', 'n/a')} |")
    lines += render_ood(report.get("ood"))
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if isinstance(v, dict) and v.get("auroc") is not None:
        return f"{v['auroc']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
    return "n/a"


def _mean_cell(v: dict) -> str:
    if v["mean_auroc"] is None:
        return "n/a"
    return f"{v['mean_auroc']:.3f} [{v['mean_auroc_ci95'][0]:.3f}, {v['mean_auroc_ci95'][1]:.3f}]"


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

# Real radiographs the demo model never saw: the shared NIH sample beside a checkout (may be absent).
REAL_SAMPLE_IMAGES = 200


def _screen_files(scorer: Scorer, paths: list[Path]) -> list[dict]:
    """Each file through the Scorer (the one loader, precheck, gate and verdict), as
    `cxr score` sees it: who refused it and why, and its gate distance.

    `refused_by` and `reason` are the verdict's. `ood_score` and `over_threshold` are the
    gate's view of every decoded file, also of one the precheck refused (scoring never runs the
    model on those): how the gate alone would judge it."""
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
                         "over_threshold": bool(verdict and verdict.over_threshold)})
            if refused_by == "precheck":
                prechecked.append((rows[-1], path))
        if prechecked and scorer.gate is not None:
            for row, distance in zip((r for r, _ in prechecked), _gate_distances(scorer, [p for _, p in prechecked])):
                row.update(ood_score=round(float(distance), 3), over_threshold=bool(distance > scorer.gate.threshold))
    return rows


def _gate_distances(scorer: Scorer, paths: list[Path]) -> np.ndarray:
    """The gate's distances of decodable files, as the Scorer would feed them to the model."""
    pixels = np.stack([network_pixels_from_image(load_image(p, scorer.limits), scorer.geometry) for p in paths])
    pooled = batch_outputs(scorer.model, torch.from_numpy(pixels), scorer.device)["pooled"]
    return scorer.gate.score(pooled)


def ood_detector(params: Params, digest: str, test_ids: list[str]) -> dict:
    """The out-of-distribution detector of the bundle `digest` on the test split (false
    rejections), on the generated non-chest corpus (detection; near cases apart) and, when the
    shared NIH sample is there, on real radiographs, all through the Scorer under score.ood:
    the precheck refuses under reject and flag, the gate only under reject; `flagged` counts
    gate distances over the threshold."""
    import tempfile

    mode = params.score.ood
    try:
        scorer = Scorer.load(params, digest=digest)
    except DataError as exc:
        return {"mode": mode, "error": str(exc)}
    gate = scorer.gate
    report: dict = {"mode": mode, "gate": None if gate is None else {
        "method": gate.method, "threshold": round(gate.threshold, 3), "target_false_rejection": gate.false_rejection,
        "valid_false_rejection": round(gate.valid_false_rejection, 4)}}
    if mode == "off":
        return report

    rows = _screen_files(scorer, [Path(params.paths.images) / i for i in test_ids])
    n = max(len(rows), 1)
    refused = sum(r["refused_by"] is not None for r in rows)
    over = sum(r["over_threshold"] for r in rows)
    report["test"] = {"images": len(rows), "precheck_refused": sum(r["refused_by"] == "precheck" for r in rows),
                      "gate_over_threshold": over, "refused": refused,
                      "false_rejection_rate": round(refused / n, 4), "flag_rate": round(over / n, 4)}

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_ood_corpus(tmp, SHARED_STUDIES if (SHARED_STUDIES / "00000001_000.png").exists() else None)
        rows = _screen_files(scorer, [Path(tmp) / name for name in sorted(manifest)])
    report["corpus"] = {"items": {r["file"]: {**{k: v for k, v in r.items() if k != "file"}, "kind": manifest[r["file"]]}
                                  for r in rows}}
    for kind in (FAR, NEAR):
        items = [r for r in report["corpus"]["items"].values() if r["kind"] == kind]
        if items:
            detected = sum(r["refused_by"] is not None for r in items)
            report["corpus"][kind] = {"items": len(items), "refused": detected, "detection_rate": round(detected / len(items), 4),
                                      "flagged_or_refused": sum(r["refused_by"] is not None or r["over_threshold"] for r in items)}
    if "near" not in report["corpus"]:
        report["corpus"]["near_skipped"] = f"the shared radiograph {SHARED_STUDIES / '00000001_000.png'} is absent"

    # Real radiographs from outside this model's training data (the demo model learned from synthetic images).
    sample = SHARED_STUDIES.parent / "nih-sample-64" / "images"
    if params.data.metadata is None and sample.is_dir():
        rows = _screen_files(scorer, sorted(sample.glob("*.png"))[:REAL_SAMPLE_IMAGES])
        n = max(len(rows), 1)
        report["real_sample"] = {"images": len(rows), "refused": sum(r["refused_by"] is not None for r in rows),
                                 "scored_rate": round(sum(r["refused_by"] is None for r in rows) / n, 4),
                                 "flagged": sum(r["over_threshold"] for r in rows),
                                 "precheck_refused": sum(r["refused_by"] == "precheck" for r in rows)}
    return report


def ood_metrics(ood: dict) -> dict:
    """The detector's headline numbers for evaluate.json."""
    out = {}
    if "test" in ood:
        out["ood_test_false_rejection"] = ood["test"]["false_rejection_rate"]
        out["ood_test_flag_rate"] = ood["test"]["flag_rate"]
    for kind in ("far", "near"):
        if kind in ood.get("corpus", {}):
            out[f"ood_{kind}_detection"] = ood["corpus"][kind]["detection_rate"]
    if "real_sample" in ood:
        out["ood_real_sample_scored"] = ood["real_sample"]["scored_rate"]
    return out


def render_ood(ood: dict | None) -> list[str]:
    if not ood:
        return []
    lines = ["", "## Out-of-distribution detector", ""]
    if "error" in ood:
        return lines + [f"Not evaluated: {ood['error']}"]
    gate = ood.get("gate")
    lines.append(f"`score.ood: {ood['mode']}`. " + ("No feature gate stored with these weights (precheck only)." if gate is None else
                 f"Feature gate: {gate['method']}, threshold {gate['threshold']} (target {gate['target_false_rejection']:.0%} "
                 f"false rejections on the validation split, achieved {gate['valid_false_rejection']:.1%})."))
    if "test" in ood:
        t = ood["test"]
        lines += ["", f"Test split: {t['images']} images, {t['refused']} refused (false-rejection rate {t['false_rejection_rate']:.1%}; "
                  f"precheck {t['precheck_refused']}, gate over threshold {t['gate_over_threshold']}, flag rate {t['flag_rate']:.1%})."]
    corpus = ood.get("corpus", {})
    for kind, title in (("far", "Not a chest radiograph (far)"), ("near", "A radiograph shown the wrong way (near)")):
        if kind in corpus:
            c = corpus[kind]
            lines += ["", f"**{title}**: {c['refused']} of {c['items']} refused (detection rate {c['detection_rate']:.0%}), "
                      f"{c['flagged_or_refused']} refused or flagged.", "", "| file | refused by | gate distance | reason |", "| --- | --- | --- | --- |"]
            for name, r in corpus["items"].items():
                if r["kind"] == kind:
                    reason = (r["reason"] or "").replace("|", "/")
                    lines.append(f"| {name} | {r['refused_by'] or '-'} | {r['ood_score'] if r['ood_score'] is not None else '-'} | {reason} |")
    if "near_skipped" in corpus:
        lines += ["", f"Near cases skipped: {corpus['near_skipped']}."]
    if "real_sample" in ood:
        r = ood["real_sample"]
        lines += ["", f"Real NIH radiographs (never seen by this model): {r['images']} images, {r['scored_rate']:.0%} scored, "
                  f"{r['flagged']} flagged by the gate, {r['precheck_refused']} refused by the precheck."]
    return lines
