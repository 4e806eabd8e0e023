"""AUROC and its 95% intervals, with scipy.stats.bootstrap (BCa).

* One class (or "No Finding vs any finding"): a stratified bootstrap, the positives' and the
  negatives' scores resampled apart (two independent samples to `scipy.stats.bootstrap`), so
  every resample has both and the AUROC is always defined. An interval needs at least
  MIN_CASES positives and MIN_CASES negatives; fewer are reported with their counts and no
  interval (two positives resampled give three distinct sets: no interval worth the name).
* The mean over classes and paired differences (fusion minus global): images resampled, the
  statistic recomputed per resample over the classes computable in it.
BCa needs a jackknife (one statistic per left-out image); above BCA_MAX_IMAGES images the
percentile method is used instead, and every interval says which method made it.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import bootstrap, rankdata

MIN_CASES = 5
BCA_MAX_IMAGES = 5000
CONFIDENCE = 0.95


def auroc_columns(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(N, K) labels and scores -> (K,) AUROC by the rank-sum (Mann-Whitney) formula, ties
    counted half; NaN where a class has no positives or no negatives."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim == 1:
        y, p = y[:, None], p[:, None]
    ranks = rankdata(p, axis=0)
    n1 = y.sum(0)
    n0 = len(y) - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


def _two_sample_auc(pos, neg, axis=-1):
    """Vectorised AUROC of positive vs negative scores along `axis` (scipy's bootstrap calls it
    with leading resample axes, its jackknife with batch shapes that differ between the two)."""
    pos, neg = np.moveaxis(np.asarray(pos), axis, -1), np.moveaxis(np.asarray(neg), axis, -1)
    n1, n0 = pos.shape[-1], neg.shape[-1]
    shape = np.broadcast_shapes(pos.shape[:-1], neg.shape[:-1])
    both = np.concatenate([np.broadcast_to(pos, shape + (n1,)), np.broadcast_to(neg, shape + (n0,))], axis=-1)
    ranks = rankdata(both, axis=-1)
    return (ranks[..., :n1].sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _interval(result, value: float, n_images: int) -> tuple[list[float] | None, str]:
    ci = result.confidence_interval
    lo, hi = float(ci.low), float(ci.high)
    dist = np.asarray(result.bootstrap_distribution, dtype=np.float64)
    if np.isfinite(lo) and np.isfinite(hi):
        return [lo, hi], "BCa" if n_images <= BCA_MAX_IMAGES else "percentile"
    finite = dist[np.isfinite(dist)]
    if len(finite) and np.ptp(finite) == 0:  # every resample the same (e.g. AUROC 1.0 throughout)
        return [float(finite[0])] * 2, "degenerate (every resample gives the same value)"
    if len(finite):
        lo, hi = np.percentile(finite, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
        return [float(lo), float(hi)], "percentile (BCa undefined here)"
    return None, "not computable"


def _rounded(ci):
    return None if ci is None else [round(float(v), 4) for v in ci]


def class_auroc(y: np.ndarray, p: np.ndarray, resamples: int, seed: int) -> dict:
    """One class: {auroc, ci95 (None when too few cases or no resamples), positives, negatives,
    interval}; auroc None when there are no positives or no negatives."""
    y = np.asarray(y).astype(bool).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    pos, neg = p[y], p[~y]
    out = {"auroc": None, "ci95": None, "positives": int(len(pos)), "negatives": int(len(neg))}
    if not len(pos) or not len(neg):
        out["interval"] = "no AUROC: no positives" if not len(pos) else "no AUROC: no negatives"
        return out
    value = float(_two_sample_auc(pos, neg))
    out["auroc"] = round(value, 4)
    if min(len(pos), len(neg)) < MIN_CASES:
        out["interval"] = f"none: fewer than {MIN_CASES} positives or negatives"
        return out
    if resamples <= 0:
        out["interval"] = "none: evaluate.bootstrap is 0"
        return out
    method = "BCa" if len(p) <= BCA_MAX_IMAGES else "percentile"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bootstrap((pos, neg), _two_sample_auc, n_resamples=resamples, vectorized=True, paired=False,
                           confidence_level=CONFIDENCE, method=method, rng=np.random.default_rng(seed))
    ci, how = _interval(result, value, len(p))
    out["ci95"], out["interval"] = _rounded(ci), f"{how}, stratified bootstrap, {resamples} resamples"
    return out


def image_bootstrap(statistic, n: int, resamples: int, seed: int) -> tuple[float, list[float] | None, str]:
    """(value, ci95, how) of `statistic(indices)` over the n images, resampling images."""
    value = float(statistic(np.arange(n)))
    if resamples <= 0 or not np.isfinite(value) or n < 2:
        return value, None, "none"
    method = "BCa" if n <= BCA_MAX_IMAGES else "percentile"

    def stat(idx):
        return statistic(idx.astype(int))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bootstrap((np.arange(n),), stat, n_resamples=resamples, vectorized=False,
                           confidence_level=CONFIDENCE, method=method, rng=np.random.default_rng(seed))
    ci, how = _interval(result, value, n)
    return value, ci, f"{how}, {resamples} image resamples"


def _nanmean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def mean_auroc(y: np.ndarray, p: np.ndarray, resamples: int, seed: int) -> dict:
    """Mean over the computable classes, with its interval over image resamples."""
    y, p = np.asarray(y), np.asarray(p)
    value, ci, how = image_bootstrap(lambda idx: _nanmean(auroc_columns(y[idx], p[idx])), len(y), resamples, seed)
    return {"mean_auroc": round(value, 4) if np.isfinite(value) else None, "mean_auroc_ci95": _rounded(ci),
            "interval": how}


def any_finding(y: np.ndarray, p: np.ndarray, resamples: int, seed: int) -> dict:
    """"No Finding" vs any finding: the largest of the 14 probabilities as the score."""
    out = class_auroc(np.asarray(y).max(axis=1), np.asarray(p).max(axis=1), resamples, seed)
    return {**out, "score": "max of the 14 class probabilities", "images_with_findings": out["positives"]}


def paired_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> dict:
    """a minus b (N, K probabilities of two branches on the same images), for the mean AUROC and
    the any-finding AUROC, with intervals over the same resampled images for both. `worse`:
    the whole interval is below zero."""
    y, a, b = np.asarray(y), np.asarray(a), np.asarray(b)
    anyf = y.max(axis=1)

    def mean_diff(idx):
        return _nanmean(auroc_columns(y[idx], a[idx]) - auroc_columns(y[idx], b[idx]))

    def any_diff(idx):
        return float(auroc_columns(anyf[idx], a[idx].max(1))[0] - auroc_columns(anyf[idx], b[idx].max(1))[0])

    out = {}
    for key, fn in (("mean_auroc", mean_diff), ("any_finding_auroc", any_diff)):
        value, ci, how = image_bootstrap(fn, len(y), resamples, seed)
        finite = np.isfinite(value)
        ci = ci if finite else None
        out[key] = {"difference": round(value, 4) if finite else None,
                    "ci95": _rounded(ci) if ci is not None else [None, None],
                    "worse": bool(ci is not None and ci[1] < 0), "interval": how}
    return out
