"""The model registry: which AG-CNN weights exist, what they were trained on, and a gate that
refuses to score with weights that are not the registered ones.

`data/models/registry.json` records, per model (the digest of its three weight files), each
stage's file digest, the backbone, the labels and the training data version (digests of the
metadata and the split it was trained on) and its out-of-distribution gate (tasks/ood.py,
fitted here on the train split's global features, stored beside the weights). Scoring checks
the files on disk against it, so a weight file swapped in from somewhere else is refused
instead of silently used.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np

from cxr.atomic import atomic_write_json
from cxr.errors import DataError
from tasks.ood import GATE_FILE, OODGate, fit_gate, save_gate
from tasks.weights import STAGES, digest_file, load_weights, model_digest

REGISTRY = "registry.json"


def data_version(processed: Path, interim: Path) -> str:
    """Digest of the metadata and split a model was trained on."""
    h = hashlib.sha256()
    for path in (Path(interim) / "metadata.parquet", Path(processed) / "splits.parquet", Path(processed) / "class_weights.json"):
        h.update(digest_file(path).encode() if path.exists() else b"missing")
    return h.hexdigest()


def read_registry(models_dir: Path) -> dict:
    path = Path(models_dir) / REGISTRY
    if not path.exists():
        return {"current": None, "models": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"model registry is not valid JSON ({exc})", where=str(path)) from None


def register(params) -> dict:
    """Record the three stages now in `paths.models` as the current model."""
    models_dir = Path(params.paths.models)
    stages = {}
    for stage in STAGES:
        path = models_dir / f"{stage}.safetensors"
        _, meta = load_weights(path)
        stages[stage] = {"file": path.name, "digest": digest_file(path), "best_epoch": meta.get("best_epoch"),
                         "best_valid_mean_auroc": meta.get("best_valid_mean_auroc"), "upstream": meta.get("upstream", {})}
    # The chain must be consistent: local trained on this global, fusion on this global+local.
    for stage in ("local", "fusion"):
        for up, digest in stages[stage]["upstream"].items():
            if stages[up]["digest"] != digest:
                raise DataError(f"{stage} weights were trained on another {up} model ({digest[:12]}, on disk {stages[up]['digest'][:12]}); "
                                f"retrain the {stage} stage", where=str(models_dir))
    _, meta = load_weights(models_dir / "fusion.safetensors")
    digest = model_digest(models_dir)
    registry = read_registry(models_dir)
    registry["models"][digest] = {
        "digest": digest, "backbone": params.model.backbone, "labels": meta.get("labels"),
        "image_size": params.model.image_size, "local_size": params.model.local_size,
        "training_data_version": data_version(params.paths.processed, params.paths.interim),
        "stages": stages, "registered_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # The out-of-distribution gate is fitted for exactly these weights, before they become current.
    gate = fit_model_gate(params, digest)
    registry["models"][digest]["ood_gate"] = {"file": GATE_FILE, "method": gate.method, "threshold": gate.threshold,
                                              "false_rejection": gate.false_rejection,
                                              "valid_false_rejection": gate.valid_false_rejection}
    registry["current"] = digest
    atomic_write_json(models_dir / REGISTRY, registry)
    return registry["models"][digest]


def fit_model_gate(params, digest: str) -> OODGate:
    """Fit the out-of-distribution gate on the crop cache's global pooled features (the plain
    view, as scoring sees it) of the train split, threshold it on the valid split, and store it
    beside the weights bound to `digest`."""
    from tasks.crop_cache import ensure_crop_cache
    from tasks.split import read_splits

    cache = ensure_crop_cache(params)  # already up to date after stage III; rebuilt if stale
    splits = read_splits(Path(params.paths.processed) / "splits.parquet")
    pooled = {}
    for split in ("train", "valid"):
        ids = [i for i in splits.loc[splits["split"] == split, "image_id"] if i in cache]
        pooled[split] = cache.get("pooled", cache.rows(ids))[:, 0] if ids else np.empty((0, 0), np.float32)
    gate = fit_gate(pooled["train"], pooled["valid"], digest, params.score.ood_false_rejection)
    save_gate(Path(params.paths.models), gate)
    return gate


def verify(models_dir: Path) -> dict:
    """The registry entry of the weights on disk; DataError when they are not registered."""
    models_dir = Path(models_dir)
    registry = read_registry(models_dir)
    if not registry["models"]:
        raise DataError("no model registry; train the fusion stage (it registers the model) before scoring", where=str(models_dir / REGISTRY))
    digest = model_digest(models_dir)
    entry = registry["models"].get(digest)
    if entry is None:
        current = registry["models"].get(registry.get("current") or "", {})
        mismatched = [s for s in STAGES if current and current["stages"][s]["digest"] != digest_file(models_dir / f"{s}.safetensors")]
        detail = f" ({', '.join(mismatched)} weights differ from the registered ones)" if mismatched else ""
        raise DataError(f"the weights on disk (digest {digest[:12]}) are not in the model registry{detail}; refusing to use "
                        "unregistered weights", where=str(models_dir))
    return entry


def record_evaluation(models_dir: Path, report: dict) -> dict | None:
    """Add the evaluation's branch figures (global, local, fusion: validation and test mean and
    any-finding AUROC with bootstrap intervals, fusion minus global) to the registry entry of
    the evaluated model. None, and nothing written, when that model is not registered."""
    models_dir = Path(models_dir)
    registry = read_registry(models_dir)
    entry = registry["models"].get(report["model_digest"])
    if entry is None:
        return None

    def figures(branch: dict) -> dict:
        anyf = branch["any_finding"]
        return {"mean_auroc": branch["mean_auroc"], "mean_auroc_ci95": branch["mean_auroc_ci95"],
                "any_finding_auroc": anyf.get("auroc") if isinstance(anyf, dict) else None,
                "any_finding_ci95": anyf.get("ci95") if isinstance(anyf, dict) else None}

    entry["evaluation"] = {
        "evaluated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "validation": {b: figures(v) for b, v in report["validation"]["branches"].items()},
        "test": {b: figures(v) for b, v in report["branches"].items()},
        "fusion_minus_global": {"validation": report["validation"]["fusion_minus_global"],
                                "test": report["test_fusion_minus_global"]},
    }
    atomic_write_json(models_dir / REGISTRY, registry)
    return entry["evaluation"]
