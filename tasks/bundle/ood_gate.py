"""The out-of-distribution gate of a model (degree 2 of ARCHITECTURE.md's "Out of distribution
has two degrees"): is this chest radiograph unlike this model's training data?

Two Gaussians with a Ledoit-Wolf covariance, both fitted on the train split when the model is
registered (`fit_gate`):

* features: the global branch's pooled features (what the model made of the image);
* image statistics: `input_statistics` of the network input itself (intensity quantiles,
  contrast, smoothness, local contrast, black/white floors, a coarse layout).

The pooled features alone let a quarter of real NIH films through under the demo model, which
learned from synthetic renderings: a 512-dimensional Gaussian fitted on a few hundred images
sits far from every held-out image, real or not, so its threshold (set on the valid split) is
loose. The statistics of the model's own inputs separate renderings from films by an order of
magnitude (the evaluation report's out-of-distribution section measures both). A study is out of distribution when either
distance passes its threshold, each the (1 - ood_false_rejection / 2) quantile of the valid
split's distances, so together about `ood_false_rejection` of the valid split is marked. The
gate's score is the larger of the two distances divided by its threshold (over 1 = out).

A gate fitted before the statistics existed (features only) scores its plain distance against
its threshold, as it always did. Stored in the model's bundle (ood_gate.safetensors: tensors
and JSON metadata, never pickle), bound to the model digest; `load_gate` refuses a gate fitted
for other weights.
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
    def fit(cls, x: np.ndarray, min_scale: float | None = None) -> "Gaussian":
        """min_scale: floor of the standardisation (a statistic constant on the training images,
        say no white pixels in any rendering, would otherwise make any other value infinitely far)."""
        from sklearn.covariance import LedoitWolf

        x = np.asarray(x, dtype=np.float64)
        mean, scale = x.mean(0), (x.std(0) + 1e-6 if min_scale is None else np.maximum(x.std(0), min_scale))
        lw = LedoitWolf().fit((x - mean) / scale)
        return cls(mean, scale, np.asarray(lw.precision_, dtype=np.float64))

    def distance(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) Mahalanobis distance (a D-dim standard Gaussian sits near sqrt(D))."""
        d = (np.atleast_2d(np.asarray(x, dtype=np.float64)) - self.mean) / self.scale
        # d P d per row as one matrix product and a row-wise dot: a three-operand einsum is a
        # plain N x D x D loop (4 ms a scoring batch on the 512 pooled features, 0.16 ms a study
        # on the precheck's statistics), the product a BLAS call.
        return np.sqrt(np.maximum(np.einsum("nd,nd->n", d @ self.precision, d), 0.0))

    def to_json(self) -> dict:
        # 6 significant digits: far below the distances' resolution, and the file stays small.
        return {k: np.vectorize(lambda v: float(f"{v:.6g}"))(getattr(self, k)).tolist() for k in ("mean", "scale", "precision")}

    @classmethod
    def from_json(cls, data: dict) -> "Gaussian":
        return cls(*(np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "precision")))


FEATURES_METHOD = "ledoit-wolf mahalanobis on global pooled features"
TWO_PART_METHOD = ("ledoit-wolf mahalanobis on global pooled features and on image statistics of the network "
                   "input; score = the larger distance / its threshold")
#: Floor of the statistics' standardisation (they are fractions and log contrasts of order 0.1-1).
STATS_MIN_SCALE = 0.02
INPUT_STAT_NAMES = (
    "2nd percentile", "10th percentile", "25th percentile", "median", "75th percentile", "90th percentile",
    "98th percentile", "mean", "log contrast", "horizontal gradient", "vertical gradient", "log Laplacian energy",
    "log low local contrast", "log median local contrast", "log high local contrast", "black floor", "white floor",
) + tuple(f"layout cell {r},{c}" for r in range(4) for c in range(4))


def _blocks(x: np.ndarray, n: int) -> np.ndarray:
    """(N, S, S) -> (N, n, n, b, b) non-overlapping blocks (the last S % n rows/columns dropped)."""
    count, side = x.shape[0], x.shape[1] // n
    return x[:, : side * n, : side * n].reshape(count, n, side, n, side).transpose(0, 1, 3, 2, 4)


def input_statistics(pixels) -> np.ndarray:
    """(N, S, S) uint8 network inputs (torch or numpy) -> (N, len(INPUT_STAT_NAMES)) float64.

    What a radiograph shows before any model looks at it: its intensity quantiles and mean, its
    contrast, how smooth it is (neighbour gradients and Laplacian energy of the standardised
    image), the spread of contrast over 8 x 8 blocks, the share of black and of white pixels,
    and the coarse layout (4 x 4 cells of the standardised image). Vectorised, in chunks.
    """
    if hasattr(pixels, "detach"):
        pixels = pixels.detach().cpu().numpy()
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[None]
    out = []
    for start in range(0, len(pixels), 256):
        x = pixels[start : start + 256].astype(np.float64) / 255.0
        n = len(x)
        flat = x.reshape(n, -1)
        q = np.quantile(flat, [0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98], axis=1).T
        mean, std = flat.mean(1), flat.std(1)
        z = (x - mean[:, None, None]) / np.maximum(std, 1e-3)[:, None, None]
        gx, gy = np.abs(np.diff(z, axis=2)).mean((1, 2)), np.abs(np.diff(z, axis=1)).mean((1, 2))
        lap = 4 * z[:, 1:-1, 1:-1] - z[:, :-2, 1:-1] - z[:, 2:, 1:-1] - z[:, 1:-1, :-2] - z[:, 1:-1, 2:]
        local = np.log(_blocks(x, 8).std((3, 4)).reshape(n, -1) + 1e-3)
        lq = np.quantile(local, [0.1, 0.5, 0.9], axis=1).T
        layout = _blocks(z, 4).mean((3, 4)).reshape(n, -1)
        out.append(np.column_stack([q, mean, np.log(std + 1e-3), gx, gy, np.log((lap**2).mean((1, 2)) + 1e-4), lq,
                                    np.sqrt((x <= 0.02).mean((1, 2))), np.sqrt((x >= 0.98).mean((1, 2))), layout]))
    return np.concatenate(out) if out else np.empty((0, len(INPUT_STAT_NAMES)))


@dataclass
class OODGate:
    """Distance of the global branch's pooled features (and, for a two-part gate, of the network
    input's image statistics) to the training split's Gaussians."""

    threshold: float  # of `score`: the feature distance's for a features-only gate, 1.0 for two parts
    method: str
    digest: str  # the model digest the gate is bound to
    gaussian: Gaussian
    false_rejection: float  # target false-rejection rate on the valid split
    valid_false_rejection: float  # achieved on the valid split
    stats: Gaussian | None = None  # image statistics of the train split's network inputs
    feature_threshold: float | None = None  # two-part gate: the two distances' own thresholds
    stats_threshold: float | None = None

    @property
    def two_part(self) -> bool:
        return self.stats is not None

    def components(self, pooled, pixels=None) -> dict[str, np.ndarray]:
        """{"features": (B,) distance, "image_statistics": (B,) distance (two-part gates)}."""
        if hasattr(pooled, "detach"):  # a torch tensor (this module itself needs no torch)
            pooled = pooled.detach().cpu().double().numpy()
        out = {"features": self.gaussian.distance(np.asarray(pooled, dtype=np.float64))}
        if self.stats is not None:
            if pixels is None:
                raise ValueError("this gate also compares the network input's image statistics: pass the pixels")
            out["image_statistics"] = self.stats.distance(input_statistics(pixels))
        return out

    def combine(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        if self.stats is None:
            return parts["features"]
        return np.maximum(parts["features"] / self.feature_threshold, parts["image_statistics"] / self.stats_threshold)

    def score(self, pooled, pixels=None) -> np.ndarray:
        """pooled: (B, C) global-branch pooled features (torch.Tensor or array); pixels: (B, S, S)
        uint8 network inputs (a two-part gate needs them) -> (B,) float64, higher = further out."""
        return self.combine(self.components(pooled, pixels))

    def reason(self, value: float) -> str:
        if self.stats is None:
            return (f"{OOD_PREFIX}unlike this model's training radiographs (Mahalanobis distance {value:.1f} of the "
                    f"global branch's pooled features to the training split, threshold {self.threshold:.1f}, set for "
                    f"{self.false_rejection:.0%} false rejections on the validation split)")
        return (f"{OOD_PREFIX}unlike this model's training radiographs (gate score {value:.2f}: the larger of the "
                f"Mahalanobis distances of the global branch's pooled features ({self.feature_threshold:.1f} allowed) "
                f"and of the image's statistics ({self.stats_threshold:.1f} allowed) to the training split, each over "
                f"its own allowance; over {self.threshold:g} is out, set for {self.false_rejection:.0%} false "
                "rejections on the validation split)")

    def summary(self) -> dict:
        """The manifest's `ood_gate` entry."""
        out = {"method": self.method, "threshold": self.threshold, "false_rejection": self.false_rejection,
               "valid_false_rejection": self.valid_false_rejection}
        if self.stats is not None:
            out.update(feature_threshold=self.feature_threshold, stats_threshold=self.stats_threshold,
                       statistics=len(INPUT_STAT_NAMES))
        return out


def fit_gate(train: np.ndarray, valid: np.ndarray, digest: str, false_rejection: float, *,
             train_pixels=None, valid_pixels=None) -> OODGate:
    """train (N, C), valid (M, C) pooled features -> a gate whose threshold rejects about
    `false_rejection` of the valid split. With the splits' network inputs (train_pixels,
    valid_pixels: (N, S, S) uint8), a two-part gate that also compares their image statistics."""
    if len(train) < 2 or len(valid) < 1:
        raise DataError(f"too few images to fit the out-of-distribution gate (train {len(train)}, valid {len(valid)})")
    g = Gaussian.fit(train)
    dist = g.distance(valid)
    if train_pixels is None or valid_pixels is None:
        threshold = float(np.quantile(dist, 1.0 - false_rejection, method="higher"))
        return OODGate(threshold, FEATURES_METHOD, digest, g, float(false_rejection), float((dist > threshold).mean()))
    if len(train_pixels) < 2 or len(valid_pixels) < 1:
        raise DataError(f"too few images to fit the out-of-distribution gate's image statistics "
                        f"(train {len(train_pixels)}, valid {len(valid_pixels)})")
    s = Gaussian.fit(input_statistics(train_pixels), min_scale=STATS_MIN_SCALE)
    sdist = s.distance(input_statistics(valid_pixels))
    each = 1.0 - false_rejection / 2  # either part marks a study: half the budget each
    ft = float(np.quantile(dist, each, method="higher"))
    st = float(np.quantile(sdist, each, method="higher"))
    gate = OODGate(1.0, TWO_PART_METHOD, digest, g, float(false_rejection), 0.0, s, ft, st)
    if len(sdist) == len(dist):  # the same valid images in both (as registration passes them)
        gate.valid_false_rejection = float((gate.combine({"features": dist, "image_statistics": sdist}) > 1.0).mean())
    else:
        gate.valid_false_rejection = float(max((dist > ft).mean(), (sdist > st).mean()))
    return gate


def save_gate(models_dir: Path, gate: OODGate) -> Path:
    """Write the gate beside the weights as safetensors (tensors + JSON metadata, no pickle)."""
    from safetensors.numpy import save_file

    path = Path(models_dir) / GATE_FILE
    tensors = {k: np.ascontiguousarray(getattr(gate.gaussian, k), dtype=np.float64) for k in ("mean", "scale", "precision")}
    meta = {"method": gate.method, "digest": gate.digest, "threshold": gate.threshold,
            "false_rejection": gate.false_rejection, "valid_false_rejection": gate.valid_false_rejection}
    if gate.stats is not None:
        tensors.update({f"stats_{k}": np.ascontiguousarray(getattr(gate.stats, k), dtype=np.float64)
                        for k in ("mean", "scale", "precision")})
        meta.update(feature_threshold=gate.feature_threshold, stats_threshold=gate.stats_threshold,
                    stat_names=list(INPUT_STAT_NAMES))
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
            stats = (Gaussian(**{k: handle.get_tensor(f"stats_{k}") for k in ("mean", "scale", "precision")})
                     if "stats_threshold" in meta else None)
        if stats is not None and meta.get("stat_names") != list(INPUT_STAT_NAMES):
            raise ValueError("its image statistics are not the ones this code computes")
        gate = OODGate(float(meta["threshold"]), str(meta["method"]), str(meta["digest"]), Gaussian(**arrays),
                       float(meta["false_rejection"]), float(meta["valid_false_rejection"]), stats,
                       None if stats is None else float(meta["feature_threshold"]),
                       None if stats is None else float(meta["stats_threshold"]))
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"the out-of-distribution gate cannot be read ({exc}); register the model again",
                        where=str(path)) from None
    if gate.digest != digest:
        raise DataError(f"the out-of-distribution gate was fitted for model {gate.digest[:12]}, not for the weights "
                        f"on disk ({digest[:12]}); register the model again (`cxr train --stage fusion`)", where=str(path))
    return gate
