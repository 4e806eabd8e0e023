"""The out-of-distribution gate of a model (degree 2 of ARCHITECTURE.md's "Out of distribution
has two degrees"): is this chest radiograph unlike this model's training data?

A Gaussian with a Ledoit-Wolf covariance on the global branch's pooled features of the train
split, fitted when the model is registered (`fit_gate`); its threshold is the
(1 - ood_false_rejection) quantile of the valid split's distances. Stored in the model's
bundle (ood_gate.safetensors: tensors and JSON metadata, never pickle), bound to the model
digest; `load_gate` refuses a gate fitted for other weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.core.atomic import atomic_path
from cxr.core.errors import DataError

OOD_PREFIX = "out of distribution: "
GATE_FILE = "ood_gate.safetensors"


@dataclass(frozen=True)
class Gaussian:
    """Standardise, then Mahalanobis distance under a Ledoit-Wolf covariance."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,) standardisation before the covariance
    precision: np.ndarray  # (D, D) of the standardised features

    @classmethod
    def fit(cls, x: np.ndarray) -> "Gaussian":
        from sklearn.covariance import LedoitWolf

        x = np.asarray(x, dtype=np.float64)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        lw = LedoitWolf().fit((x - mean) / scale)
        return cls(mean, scale, np.asarray(lw.precision_, dtype=np.float64))

    def distance(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) Mahalanobis distance (a D-dim standard Gaussian sits near sqrt(D))."""
        d = (np.atleast_2d(np.asarray(x, dtype=np.float64)) - self.mean) / self.scale
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, self.precision, d), 0.0))

    def to_json(self) -> dict:
        # 6 significant digits: far below the distances' resolution, and the file stays small.
        return {k: np.vectorize(lambda v: float(f"{v:.6g}"))(getattr(self, k)).tolist() for k in ("mean", "scale", "precision")}

    @classmethod
    def from_json(cls, data: dict) -> "Gaussian":
        return cls(*(np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "precision")))


@dataclass
class OODGate:
    """Distance of the global branch's pooled features to the training split's Gaussian."""

    threshold: float
    method: str
    digest: str  # the model digest the gate is bound to
    gaussian: Gaussian
    false_rejection: float  # target false-rejection rate on the valid split
    valid_false_rejection: float  # achieved on the valid split

    def score(self, pooled) -> np.ndarray:
        """pooled: (B, C) global-branch pooled features (torch.Tensor or array) -> (B,) float64,
        higher = further out."""
        if hasattr(pooled, "detach"):  # a torch tensor (this module itself needs no torch)
            pooled = pooled.detach().cpu().double().numpy()
        return self.gaussian.distance(np.asarray(pooled, dtype=np.float64))

    def reason(self, value: float) -> str:
        return (f"{OOD_PREFIX}unlike this model's training radiographs (Mahalanobis distance {value:.1f} of the "
                f"global branch's pooled features to the training split, threshold {self.threshold:.1f}, set for "
                f"{self.false_rejection:.0%} false rejections on the validation split)")


def fit_gate(train: np.ndarray, valid: np.ndarray, digest: str, false_rejection: float) -> OODGate:
    """train (N, C), valid (M, C) pooled features -> a gate whose threshold rejects about
    `false_rejection` of the valid split."""
    if len(train) < 2 or len(valid) < 1:
        raise DataError(f"too few images to fit the out-of-distribution gate (train {len(train)}, valid {len(valid)})")
    g = Gaussian.fit(train)
    dist = g.distance(valid)
    threshold = float(np.quantile(dist, 1.0 - false_rejection, method="higher"))
    return OODGate(threshold, "ledoit-wolf mahalanobis on global pooled features", digest, g, float(false_rejection),
                   float((dist > threshold).mean()))


def save_gate(models_dir: Path, gate: OODGate) -> Path:
    """Write the gate beside the weights as safetensors (tensors + JSON metadata, no pickle)."""
    from safetensors.numpy import save_file

    path = Path(models_dir) / GATE_FILE
    tensors = {k: np.ascontiguousarray(getattr(gate.gaussian, k), dtype=np.float64) for k in ("mean", "scale", "precision")}
    meta = {"method": gate.method, "digest": gate.digest, "threshold": gate.threshold,
            "false_rejection": gate.false_rejection, "valid_false_rejection": gate.valid_false_rejection}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"cxr": json.dumps(meta, sort_keys=True)})
    return path


def load_gate(models_dir: Path, digest: str) -> OODGate | None:
    """The gate stored beside the weights; None when there is none (models registered before
    the gate existed); DataError when it belongs to other weights or cannot be read."""
    from safetensors import SafetensorError, safe_open

    path = Path(models_dir) / GATE_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="np") as handle:
            meta = json.loads((handle.metadata() or {})["cxr"])
            arrays = {k: handle.get_tensor(k) for k in ("mean", "scale", "precision")}
        gate = OODGate(float(meta["threshold"]), str(meta["method"]), str(meta["digest"]), Gaussian(**arrays),
                       float(meta["false_rejection"]), float(meta["valid_false_rejection"]))
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"the out-of-distribution gate cannot be read ({exc}); register the model again",
                        where=str(path)) from None
    if gate.digest != digest:
        raise DataError(f"the out-of-distribution gate was fitted for model {gate.digest[:12]}, not for the weights "
                        f"on disk ({digest[:12]}); register the model again (`cxr train --stage fusion`)", where=str(path))
    return gate
