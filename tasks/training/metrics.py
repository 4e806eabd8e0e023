"""AUROC per class (not computable where a class lacks positives or negatives), bootstrap
intervals and ROC curve points."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def computable(y: np.ndarray) -> np.ndarray:
    """(K,) bool: the class has both positives and negatives in y (N, K)."""
    positives = y.sum(axis=0)
    return (positives > 0) & (positives < len(y))


def auroc_per_class(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(K,) AUROC; NaN where not computable (a split without positives is not a crash)."""
    out = np.full(y.shape[1], np.nan)
    for k in np.flatnonzero(computable(y)):
        out[k] = roc_auc_score(y[:, k], p[:, k])
    return out


def mean_auroc(y: np.ndarray, p: np.ndarray) -> float:
    values = auroc_per_class(y, p)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def bootstrap_auroc(y: np.ndarray, p: np.ndarray, n: int, seed: int) -> dict:
    """95% percentile intervals of per-class and mean AUROC over `n` image resamples."""
    rng = np.random.default_rng(seed)
    per_class = np.full((n, y.shape[1]), np.nan)
    for i in range(n):
        idx = rng.integers(0, len(y), len(y))
        per_class[i] = auroc_per_class(y[idx], p[idx])
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(per_class, axis=1)
            lo, hi = np.nanpercentile(per_class, [2.5, 97.5], axis=0) if n else (np.full(y.shape[1], np.nan),) * 2
            mlo, mhi = np.nanpercentile(means, [2.5, 97.5]) if n else (np.nan, np.nan)
    return {"per_class": np.stack([lo, hi], axis=1), "mean": (float(mlo), float(mhi))}


def roc_points(y: np.ndarray, p: np.ndarray, labels: list[str], max_points: int = 200) -> list[dict]:
    """Rows (label, fpr, tpr) for `dvc plots`, thinned to at most `max_points` per class."""
    rows = []
    for k in np.flatnonzero(computable(y)):
        fpr, tpr, _ = roc_curve(y[:, k], p[:, k])
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).round().astype(int))
        rows.extend({"label": labels[k], "fpr": round(float(fpr[i]), 5), "tpr": round(float(tpr[i]), 5)} for i in keep)
    return rows
