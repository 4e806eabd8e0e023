"""Per-class operating thresholds for flagging scored studies, chosen on the validation split.

The rule is in params (`score.threshold_rule`): Youden's J (max TPR - FPR) or the highest
threshold that still reaches `score.target_sensitivity`. Thresholds are computed once per
model digest and rule from the fusion model's validation predictions and kept in one JSON
file keyed by digest; a class that the validation split cannot judge (no positives or no
negatives) falls back to `score.fallback_threshold`, and the file says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_curve

from cxr.atomic import atomic_write_json
from cxr.config import Params
from cxr.errors import DataError
from cxr.labels import PATHOLOGIES
from tasks.dataset import load_split, to_input
from tasks.ingest import read_metadata
from tasks.split import read_splits
from tasks.weights import digest_file


def rule_key(params: Params) -> str:
    """The name a rule's thresholds are stored under: 'youden' or 'sensitivity@0.90'."""
    s = params.score
    return "youden" if s.threshold_rule == "youden" else f"sensitivity@{s.target_sensitivity:.2f}"


def operating_thresholds(y: np.ndarray, p: np.ndarray, rule: str, target_sensitivity: float = 0.9,
                         fallback: float = 0.5) -> list[dict]:
    """One {threshold, source} per class from labels y (N, K) 0/1 and probabilities p (N, K).

    A study is flagged for class k when p >= threshold. source is the rule's name, or
    'fallback: ...' saying why the validation split could not choose one.
    """
    out = []
    for k in range(y.shape[1]):
        positives = int(y[:, k].sum())
        if positives == 0 or positives == len(y):
            why = "no positives" if positives == 0 else "no negatives"
            out.append({"threshold": float(fallback), "source": f"fallback: {why} in the validation split"})
            continue
        fpr, tpr, thr = roc_curve(y[:, k], p[:, k], drop_intermediate=False)
        # roc_curve's first threshold is +inf (nothing flagged); never choose it.
        fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]
        if rule == "youden":
            i = int(np.argmax(tpr - fpr))  # first (highest threshold) maximum
        elif rule == "sensitivity":
            i = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])
        else:
            raise ValueError(f"unknown threshold rule {rule!r}")
        out.append({"threshold": float(min(thr[i], 1.0)), "source": rule,
                    "valid_sensitivity": round(float(tpr[i]), 4), "valid_specificity": round(float(1 - fpr[i]), 4)})
    return out


def validation_predictions(params: Params, model: torch.nn.Module, device: torch.device) -> tuple[np.ndarray, np.ndarray, str]:
    """(labels (N, K), fusion probabilities (N, K), data version = digest of splits.parquet)."""
    paths = params.paths
    splits_path = Path(paths.processed) / "splits.parquet"
    meta = read_metadata(Path(paths.interim) / "metadata.parquet")
    valid = load_split(meta, read_splits(splits_path), "valid", Path(paths.images), params.model)
    probs = []
    with torch.no_grad():
        for start in range(0, len(valid.ids), params.score.batch_size):
            out = model(to_input(valid.pixels[start : start + params.score.batch_size], device))
            probs.append(torch.sigmoid(out.fusion_logits.float()).cpu())
    return valid.labels.numpy(), torch.cat(probs).numpy(), digest_file(splits_path)


def read_thresholds_file(path: Path) -> dict:
    if not Path(path).exists():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"thresholds file is not readable JSON ({exc})", where=str(path)) from None
    if not isinstance(data, dict):
        raise DataError("thresholds file must map model digests to thresholds", where=str(path))
    return data


def load_or_compute_thresholds(params: Params, model: torch.nn.Module, device: torch.device,
                               digest: str, path: Path) -> dict:
    """The thresholds of model `digest` under the params' rule, computed and stored on first use.

    Returns {rule, data_version, valid_images, classes: {pathology: {threshold, source, ...}}}.
    """
    path = Path(path)
    stored = read_thresholds_file(path)
    key = rule_key(params)
    entry = stored.get(digest, {}).get(key)
    if entry is not None:
        return entry
    y, p, data_version = validation_predictions(params, model, device)
    s = params.score
    per_class = operating_thresholds(y, p, s.threshold_rule, s.target_sensitivity, s.fallback_threshold)
    entry = {"rule": key, "data_version": data_version, "valid_images": int(len(y)),
             "classes": dict(zip(PATHOLOGIES, per_class))}
    # Re-read just before writing: another run may have added a digest meanwhile.
    stored = read_thresholds_file(path)
    stored.setdefault(digest, {})[key] = entry
    atomic_write_json(path, stored)
    return entry
