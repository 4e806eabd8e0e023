"""Probability calibration of a model, fitted on the validation split when it is registered.

Method: Platt scaling per class and branch, p' = sigmoid(a * logit(p) + b) with a > 0, fitted
by maximum likelihood under a weak Gaussian prior that pulls (log a, b) towards the identity
(a = 1, b = 0). Why this and not the alternatives:

* The stages train with a class-weighted BCE (positives up-weighted to balance each class), so
  every class's probabilities are pushed towards 0.5: a shift of the intercept. Temperature
  scaling (a alone) cannot move an intercept (on the demo: mean ECE 0.28 -> 0.22); Platt's b
  does.
* Isotonic regression needs many positives per class; a validation split with 1 to 8 positives
  per class (the demo) gives it a step function with ties that changes the ranking (and so the
  AUROC) and flags. Platt with a > 0 is strictly increasing: the AUROC and the order of studies
  are those of the model, and a threshold maps one to one.
* The prior keeps a class whose few validation positives are perfectly separated (a -> inf
  without it) finite; with thousands of validation images it is negligible.

A class the validation split cannot judge (no positives or no negatives) keeps the identity.
Stored in the bundle's manifest (`calibration`), applied by the Scorer; a bundle without it
(registered before calibration existed) scores with the identity, as it always did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxr.core.labels import BRANCHES, PATHOLOGIES

METHOD = "platt"
PRIOR = 1.0  # precision of the Gaussian prior on (log a, b); 0 = plain maximum likelihood
_EPS = 1e-7


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_platt(p: np.ndarray, y: np.ndarray, prior: float = PRIOR) -> tuple[float, float]:
    """(a, b) of sigmoid(a * logit(p) + b) for one class: the posterior mode under the prior."""
    from scipy.optimize import minimize

    z, y = logit(p), np.asarray(y, dtype=np.float64)

    def loss(theta):
        a, b = np.exp(theta[0]), theta[1]
        s = a * z + b
        # -log-likelihood of y under sigmoid(s), written stably: log(1 + e^s) - y s
        nll = np.logaddexp(0.0, s) - y * s
        q = _sigmoid(s)
        grad_s = q - y
        value = nll.sum() + prior * float(theta @ theta)
        grad = np.array([(grad_s * z).sum() * a, grad_s.sum()]) + 2 * prior * theta
        return value, grad

    result = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B")
    return float(np.exp(result.x[0])), float(result.x[1])


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE of one class: the share-weighted |observed frequency - mean probability| over
    `bins` equal-width probability bins (NaN without images)."""
    y, p = np.asarray(y, dtype=np.float64).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if not len(y):
        return float("nan")
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, y, bins) - np.bincount(which, p, bins))
    return float(gap.sum() / len(y)) if count.any() else float("nan")


def fit_calibration(y: np.ndarray, probs: dict[str, np.ndarray], *, prior: float = PRIOR) -> dict:
    """The manifest entry: {method, prior, fitted_on, valid_images, branches: {branch: {class:
    {a, b, source, valid_positives, valid_ece_before, valid_ece_after}}}} from validation labels
    y (N, K) and each branch's probabilities (N, K)."""
    y = np.asarray(y, dtype=np.float64)
    branches = {}
    for branch, p in probs.items():
        classes = {}
        for k, name in enumerate(PATHOLOGIES):
            positives = int(y[:, k].sum())
            if positives == 0 or positives == len(y):
                why = "no positives" if positives == 0 else "no negatives"
                classes[name] = {"a": 1.0, "b": 0.0, "source": f"identity: {why} in the validation split",
                                 "valid_positives": positives}
                continue
            a, b = fit_platt(p[:, k], y[:, k], prior)
            after = _sigmoid(a * logit(p[:, k]) + b)
            classes[name] = {"a": round(a, 6), "b": round(b, 6), "source": METHOD, "valid_positives": positives,
                             "valid_ece_before": round(expected_calibration_error(y[:, k], p[:, k]), 4),
                             "valid_ece_after": round(expected_calibration_error(y[:, k], after), 4)}
        branches[branch] = classes
    return {"method": METHOD, "prior": prior, "fitted_on": "valid", "valid_images": int(len(y)), "branches": branches}


@dataclass(frozen=True)
class Calibration:
    """Per branch, (K,) slopes a and intercepts b on the logit scale; identity when absent."""

    method: str  # "platt" or "identity"
    slopes: dict[str, np.ndarray]
    intercepts: dict[str, np.ndarray]
    valid_images: int | None = None

    @classmethod
    def identity(cls) -> "Calibration":
        ones, zeros = np.ones(len(PATHOLOGIES)), np.zeros(len(PATHOLOGIES))
        return cls("identity", {b: ones for b in BRANCHES}, {b: zeros for b in BRANCHES})

    @classmethod
    def from_manifest(cls, entry: dict | None) -> "Calibration":
        """From a manifest's `calibration` entry; the identity for a bundle without one."""
        if not entry:
            return cls.identity()
        base = cls.identity()
        slopes, intercepts = dict(base.slopes), dict(base.intercepts)
        for branch, classes in entry.get("branches", {}).items():
            slopes[branch] = np.array([float(classes[p]["a"]) for p in PATHOLOGIES])
            intercepts[branch] = np.array([float(classes[p]["b"]) for p in PATHOLOGIES])
        return cls(str(entry.get("method", METHOD)), slopes, intercepts, entry.get("valid_images"))

    @property
    def is_identity(self) -> bool:
        return self.method == "identity"

    def apply(self, branch: str, p) -> np.ndarray:
        """(N, K) probabilities of `branch` -> calibrated (N, K) float32 (unchanged under the identity)."""
        if hasattr(p, "detach"):
            p = p.detach().cpu().numpy()
        p = np.asarray(p)
        if self.is_identity:
            return p.astype(np.float32, copy=False)
        return _sigmoid(self.slopes[branch] * logit(p) + self.intercepts[branch]).astype(np.float32)

    def meaning(self) -> str:
        """What a probability means, in one sentence."""
        if self.is_identity:
            return ("Probabilities are the model's raw outputs, not calibrated: they rank studies "
                    "but are not frequencies.")
        images = f" ({self.valid_images} images)" if self.valid_images else ""
        return (f"Probabilities are calibrated on the validation split{images} by Platt scaling per finding: among "
                "images like those, a finding given 0.30 was present in about 30 of 100.")
