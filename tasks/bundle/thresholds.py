"""Per-class operating thresholds for flagging scored studies, chosen on the validation split.

The rule is in params (`score.threshold_rule`): Youden's J (max TPR - FPR) or the highest
threshold that still reaches `score.target_sensitivity`. Thresholds are computed when a
model is registered (`tasks.training.registration`), from the fusion model's validation
predictions, and kept in its bundle under the rule's key; a class that the validation split cannot judge (no positives or no
negatives) falls back to `score.fallback_threshold`, and the file says so.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from cxr.core.config import ScoreParams


def rule_key(s: ScoreParams) -> str:
    """The name a rule's thresholds are stored under: 'youden' or 'sensitivity@0.90'."""
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
