"""Registering a trained model: the three stages in `paths.models` become one bundle.

Registration is where the model becomes data (`tasks.bundle`): the stage chain is checked
(local trained on this global, fusion on both), the out-of-distribution gate is fitted on
the train split's global features and the image statistics of its network inputs, the
probability calibration (Platt scaling per branch and class, `tasks.bundle.calibration`) is
fitted on the validation split, then the operating thresholds are chosen on the same split's
calibrated probabilities under `score.threshold_rule`, and all of it is written as the bundle folder
`paths.models/<digest>/`, listed in the registry and made current. Scoring never touches the
training data afterwards.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from cxr.core.config import Params
from cxr.core.digest import file_sha256, text_sha256
from cxr.core.errors import DataError
from cxr.core.labels import BRANCHES, PATHOLOGIES, STAGES
from models.device import pick_device
from tasks.bundle.bundle import Bundle, open_bundle, update_manifest, write_bundle
from tasks.bundle.calibration import Calibration, fit_calibration
from tasks.bundle.ood_gate import OODGate, fit_gate, save_gate
from tasks.bundle.registry import add_bundle, load_bundle
from tasks.bundle.thresholds import operating_thresholds, rule_key
from tasks.bundle.weights import WEIGHT_FILES, load_agcnn, load_weights, model_digest
from tasks.images.geometry import to_input
from tasks.metadata.ingest import read_metadata
from tasks.metadata.split import read_splits
from tasks.training.crop_cache import ensure_crop_cache
from tasks.training.dataset import load_split


def data_version(processed: Path, interim: Path) -> str:
    """Digest of the metadata, split and class weights a model was trained on."""
    paths = (Path(interim) / "metadata.parquet", Path(processed) / "splits.parquet", Path(processed) / "class_weights.json")
    return text_sha256(*(file_sha256(p) if p.exists() else "missing" for p in paths))


def training_data(params: Params) -> dict:
    """What the model learns from: {"kind": "synthetic" | "real", "source": ...}. Synthetic is
    the demo: no `data.metadata`, and the images are the ones `cxr synth` rendered into
    paths.raw (its Data_Entry_synth.csv beside them); anything else is taken to be real films."""
    raw, images = Path(params.paths.raw), Path(params.paths.images)
    if params.data.metadata is None and (raw / "Data_Entry_synth.csv").exists() and images.resolve() == (raw / "images").resolve():
        return {"kind": "synthetic", "source": "synthetic chest radiographs rendered by `cxr synth` (the demo data)"}
    source = Path(params.data.metadata).name if params.data.metadata is not None else f"the radiographs in {images.name}/"
    return {"kind": "real", "source": f"real radiographs ({source})"}


def _stage_facts(models_dir: Path) -> dict:
    stages = {}
    for stage in STAGES:
        path = models_dir / WEIGHT_FILES[stage]
        _, meta = load_weights(path)
        stages[stage] = {"file": path.name, "digest": file_sha256(path), "best_epoch": meta.get("best_epoch"),
                         "best_valid_mean_auroc": meta.get("best_valid_mean_auroc"), "upstream": meta.get("upstream", {}),
                         "labels": meta.get("labels")}
    # The chain must be consistent: local trained on this global, fusion on this global+local.
    for stage in ("local", "fusion"):
        for up, digest in stages[stage]["upstream"].items():
            if stages[up]["digest"] != digest:
                raise DataError(f"{stage} weights were trained on another {up} model ({digest[:12]}, on disk "
                                f"{stages[up]['digest'][:12]}); retrain the {stage} stage", where=str(models_dir))
    return stages


def register(params: Params) -> dict:
    """Bundle the three stages now in `paths.models`, list the bundle and make it current.

    Returns the bundle's manifest. DataError when the stages do not form one chain.
    """
    models_dir = Path(params.paths.models)
    stages = _stage_facts(models_dir)
    digest = model_digest(models_dir)
    labels = stages["fusion"].pop("labels")
    for facts in stages.values():
        facts.pop("labels", None)
    device = pick_device(params.train.device)
    model = load_agcnn(models_dir, params.model).to(device)
    gate = fit_model_gate(params, digest)
    thresholds = fit_thresholds(params, model, device)  # fits the calibration too (no bundle yet)
    calibration = thresholds.pop("calibration", None)
    manifest = {"digest": digest, "backbone": params.model.backbone, "labels": labels,
                "model": params.model.model_dump(mode="json"),
                "training_data_version": data_version(params.paths.processed, params.paths.interim),
                "training_data": {**training_data(params), "split": split_counts(params)},
                "stages": stages, "thresholds": {thresholds["rule"]: thresholds},
                "ood_gate": gate.summary()}
    if calibration is not None:
        manifest["calibration"] = calibration
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".gate.") as tmp:
        bundle = write_bundle(models_dir, models_dir, manifest, save_gate(Path(tmp), gate))
    add_bundle(models_dir, bundle)
    return bundle.manifest


def split_counts(params: Params) -> dict:
    """Images per split of the data the model was trained on."""
    splits = read_splits(Path(params.paths.processed) / "splits.parquet")
    return {k: int(v) for k, v in splits["split"].value_counts().sort_index().items()}


#: At most this many images per split feed the gate's image statistics (seeded sample).
GATE_STATS_IMAGES = 5000
#: At most this many images per split feed the gate's feature Gaussian and its threshold (seeded
#: sample): a 512- to 2048-dim covariance is well estimated from 20,000 images, and registration's
#: memory stays flat however large the archive (the whole of a 78,000-image train split in float64,
#: with Ledoit-Wolf's copies, took 2.7 GB at F = 1 in benchmarks/bench_archive.py).
GATE_FEATURE_IMAGES = 20000


def _sample(part, limit: int, seed: int):
    return part.sample(n=limit, random_state=seed) if len(part) > limit else part


def _split_pixels(params: Params, split: str, part) -> np.ndarray:
    """(N, S, S) uint8 network inputs of the split's images in `part` (rows of splits.parquet)."""
    paths = params.paths
    meta = read_metadata(Path(paths.interim) / "metadata.parquet")
    data = load_split(meta, part, split, Path(paths.images), params.model, Path(paths.cache) / "images")
    return data.pixels.numpy()


def fit_model_gate(params: Params, digest: str) -> OODGate:
    """The two-part out-of-distribution gate: the crop cache's global pooled features (the
    plain view, as scoring sees it) and the image statistics of the network inputs of the train
    split, thresholded on the valid split (each at most a seeded sample of GATE_FEATURE_IMAGES;
    the train statistics of GATE_STATS_IMAGES)."""
    cache = ensure_crop_cache(params)  # already up to date after stage III; rebuilt if stale
    splits = read_splits(Path(params.paths.processed) / "splits.parquet")
    pooled, parts = {}, {}
    for split in ("train", "valid"):
        part = splits[(splits["split"] == split) & splits["image_id"].map(lambda i: i in cache)]
        parts[split] = part = _sample(part, GATE_FEATURE_IMAGES, params.seed)
        ids = list(part["image_id"])
        pooled[split] = cache.get("pooled", cache.rows(ids))[:, 0] if ids else np.empty((0, 0), np.float32)
    return fit_gate(pooled["train"], pooled["valid"], digest, params.score.ood_false_rejection,
                    train_pixels=_split_pixels(params, "train", _sample(parts["train"], GATE_STATS_IMAGES, params.seed)),
                    valid_pixels=_split_pixels(params, "valid", parts["valid"]))  # the same images as `pooled`


def validation_branch_predictions(params: Params, model: torch.nn.Module,
                                  device: torch.device) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """(labels (N, K), {branch: raw probabilities (N, K)}, data version = digest of splits.parquet)."""
    paths = params.paths
    splits_path = Path(paths.processed) / "splits.parquet"
    meta = read_metadata(Path(paths.interim) / "metadata.parquet")
    valid = load_split(meta, read_splits(splits_path), "valid", Path(paths.images), params.model, Path(paths.cache) / "images")
    probs = {b: [] for b in BRANCHES}
    with torch.inference_mode():
        for start in range(0, len(valid.ids), params.score.batch_size):
            out = model(to_input(valid.inputs(start, start + params.score.batch_size), device))
            for b, logits in zip(BRANCHES, (out.global_logits, out.local_logits, out.fusion_logits)):
                probs[b].append(torch.sigmoid(logits.float()).cpu())
    return valid.labels.numpy(), {b: torch.cat(v).numpy() for b, v in probs.items()}, file_sha256(splits_path)


def validation_predictions(params: Params, model: torch.nn.Module, device: torch.device,
                           calibration: Calibration | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(labels (N, K), fusion probabilities (N, K), data version = digest of splits.parquet);
    with `calibration`, the probabilities on its scale (the one thresholds are chosen on)."""
    y, probs, version = validation_branch_predictions(params, model, device)
    p = probs["fusion"] if calibration is None else calibration.apply("fusion", probs["fusion"])
    return y, p, version


def fit_thresholds(params: Params, model: torch.nn.Module, device: torch.device,
                   calibration: Calibration | None = None) -> dict:
    """The thresholds under the params' rule from the validation split's calibrated fusion
    probabilities: {rule, data_version, valid_images, scale, classes: {pathology: {threshold,
    source, ...}}}. Without `calibration` (registering) the calibration is fitted on the same
    predictions first and returned under the key "calibration" (for the manifest)."""
    y, probs, version = validation_branch_predictions(params, model, device)
    entry = None
    if calibration is None:
        entry = fit_calibration(y, probs)
        calibration = Calibration.from_manifest(entry)
    p = calibration.apply("fusion", probs["fusion"])
    s = params.score
    per_class = operating_thresholds(y, p, s.threshold_rule, s.target_sensitivity, s.fallback_threshold)
    out = {"rule": rule_key(s), "data_version": version, "valid_images": int(len(y)),
           "scale": "raw" if calibration.is_identity else f"calibrated ({calibration.method})",
           "classes": dict(zip(PATHOLOGIES, per_class))}
    if entry is not None:
        out["calibration"] = entry
    return out


def refit_thresholds(params: Params, ref: str) -> Bundle:
    """`cxr models thresholds DIGEST`: thresholds of a registered bundle under the params'
    (changed) rule, added to its manifest beside the ones it has."""
    bundle = load_bundle(params.paths.models, ref)
    geometry = bundle.model
    device = pick_device(params.train.device)
    model = bundle.agcnn().to(device)
    # On the bundle's own calibrated scale (the identity for a bundle registered without one).
    entry = fit_thresholds(params.model_copy(update={"model": geometry}), model, device, bundle.calibration())
    return update_manifest(bundle, thresholds={**bundle.manifest.get("thresholds", {}), entry["rule"]: entry})


def bundle_of_working_weights(params: Params) -> Bundle | None:
    """The registered bundle of the weights now in `paths.models`, or None when they are not registered."""
    folder = Path(params.paths.models) / model_digest(params.paths.models)
    return open_bundle(folder) if folder.is_dir() else None
