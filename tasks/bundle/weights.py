"""Model weights on disk: safetensors (no unpickling), content digests, the AG-CNN loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cxr.core.atomic import atomic_path
from cxr.core.config import ModelParams
from cxr.core.digest import file_sha256, text_sha256
from cxr.core.errors import DataError
from cxr.core.labels import STAGES
from models.agcnn import AGCNN
from models.branch import Branch, build_branch
from models.fusion import FusionHead

WEIGHT_FILES = {stage: f"{stage}.safetensors" for stage in STAGES}


def save_weights(module: torch.nn.Module, path: Path, metadata: dict) -> str:
    """Atomically write `module`'s state as safetensors with string metadata; return its digest."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        # One metadata entry: safetensors writes a map's keys in hash order, and a digest
        # of the file must not change with it.
        save_file(state, str(tmp), metadata={"cxr": json.dumps(metadata, sort_keys=True)})
    return file_sha256(path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) from a safetensors file; DataError when missing or not safetensors."""
    path = Path(path)
    if not path.exists():
        raise DataError("model weights not found; train this stage first (`cxr train --stage ...`)", where=str(path))
    try:
        state = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            raw_meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"not a readable safetensors weights file ({exc})", where=str(path)) from None
    return state, json.loads(raw_meta.get("cxr", "{}"))


def load_branch(path: Path, backbone: str, model=None) -> Branch:
    """A branch from safetensors; with `model` (ModelParams), also refuse weights trained on
    another input geometry (image_size, resize) than the params would feed them."""
    state, meta = load_weights(path)
    if meta.get("backbone", backbone) != backbone:
        raise DataError(f"weights were trained for backbone {meta.get('backbone')}, params ask for {backbone}", where=str(path))
    if model is not None and "image_size" in meta:
        trained = (meta["image_size"], meta.get("resize") or meta["image_size"])
        if trained != (model.image_size, model.load_size):
            raise DataError(f"weights were trained on {trained[0]} px inputs cut from images resized to {trained[1]} px, "
                            f"params ask for {model.image_size} px from {model.load_size} px (model.image_size, "
                            "model.resize); use the params the model was trained with", where=str(path))
    branch = build_branch(backbone, "none")
    try:
        branch.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"weights do not fit a {backbone} branch ({str(exc).splitlines()[0]})", where=str(path)) from None
    return branch.eval()


def load_fusion(path: Path, global_dim: int, local_dim: int) -> FusionHead:
    state, _ = load_weights(path)
    head = FusionHead(global_dim, local_dim)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"weights do not fit the fusion head ({str(exc).splitlines()[0]})", where=str(path)) from None
    return head.eval()


def model_digest(folder: Path) -> str:
    """One digest for the three stages' weights in `folder` together: what bundles, scores,
    caches and DICOM UIDs are keyed by."""
    return text_sha256(*(file_sha256(Path(folder) / WEIGHT_FILES[stage]) for stage in STAGES))


def load_agcnn(folder: Path, model: ModelParams) -> AGCNN:
    """The AG-CNN of the three weight files in `folder`, built for the geometry `model`."""
    g = load_branch(Path(folder) / WEIGHT_FILES["global"], model.backbone, model)
    local = load_branch(Path(folder) / WEIGHT_FILES["local"], model.backbone)
    fusion = load_fusion(Path(folder) / WEIGHT_FILES["fusion"], g.feature_dim, local.feature_dim)
    return AGCNN(g, local, fusion, local_size=model.local_size, threshold=model.attention.threshold,
                 mode=model.attention.mode).eval()
