"""The crop cache: the frozen global branch's attention crops, computed once after stage I.

After stage I the global branch never changes, so its attention boxes, local crops and
pooled features are a pure function of (global weights, crop params, image). Stages II and
III read them here instead of re-running the global forward pass every epoch.

Per image the cache stores both orientations, view 0 = the image as stored and view 1 = its
horizontal mirror, each computed from its own global forward pass: a training-time flip
picks view 1, which is exactly what the on-the-fly path computes for a flipped image (a CNN
is not flip-equivariant, so mirroring the plain crop would not be).
Stored per view: the local crop as uint8 (local_size^2, cut from the un-normalised [0, 1]
pixels, so `to_input(crop)` equals the on-the-fly crop of `to_input(image)` within uint8
rounding: normalisation is per-channel affine and bilinear crops are linear), the global
pooled features (float32, fusion's input) and, in the index, the box and the heatmap peak.

The global branch's input is the centre `image_size` crop of the image resized to
`model.load_size` (tasks/dataset.py), so stages II/III, which read this cache, never see
stage I's random crops.

The key is the content digest of the global weights, the crop params and the source
images; a cache made for anything else is detected and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxr.core.config import Params
from cxr.core.errors import DataError
from cxr.core.progress import report
from models.agcnn import attention_crops
from models.attention import attention_heatmap
from tasks.images import cache_store
from tasks.images.cache_store import ArraySpec, CacheReader
from tasks.images.geometry import center_crop, to_input
from models.device import pick_device
from tasks.images.image_cache import hash_sources, image_cache_serves, sources_digest
from tasks.images.loader import load_image_uint8
from cxr.core.digest import file_sha256
from tasks.bundle.weights import load_branch

log = logging.getLogger("cxr.cache")

FORMAT = 1
VIEWS = 2  # 0: as stored, 1: horizontally mirrored


def crop_cache_dir(params: Params) -> Path:
    return Path(params.paths.cache) / "crops"


def image_cache_dir(params: Params) -> Path:
    return Path(params.paths.cache) / "images"


@dataclass(frozen=True)
class CropCachePlan:
    root: Path
    models_dir: Path
    image_dir: Path
    image_cache: Path | None  # where pixels come from; None = decode with the loader
    backbone: str
    image_size: int  # the global branch's input: the centre crop of the image resized to load_size
    load_size: int
    local_size: int
    threshold: float
    mode: str
    batch_size: int
    shard_images: int
    device: str
    ids: tuple[str, ...]
    global_digest: str
    sources: str
    key: str
    up_to_date: bool

    @property
    def chunks(self) -> list[int]:
        return list(range(max(1, -(-len(self.ids) // self.shard_images))))

    def meta(self) -> dict:
        return {"kind": "crops", "format": FORMAT, "global_digest": self.global_digest, "backbone": self.backbone,
                "image_size": self.image_size, "load_size": self.load_size, "local_size": self.local_size, "threshold": self.threshold,
                "mode": self.mode, "sources_digest": self.sources, "views": ["plain", "mirrored"]}


def _split_ids(params: Params) -> list[str]:
    from tasks.metadata.split import read_splits

    return read_splits(Path(params.paths.processed) / "splits.parquet")["image_id"].tolist()


def _sources(params: Params, ids) -> tuple[str, Path | None]:
    """Digest of the source images, and the image cache when it holds exactly these at load_size."""
    m, root = params.model, image_cache_dir(params)
    meta = image_cache_serves(root, params.paths.images, m.load_size)
    if meta is not None:
        reader = CacheReader(root)
        rejects = cache_store.read_rejects(root).to_pydict()
        if sorted(reader.ids + rejects["item_id"]) == sorted(ids):
            return meta["sources_digest"], root
    return sources_digest(ids, hash_sources(params.paths.images, ids)), None


def plan_crop_cache(params: Params) -> CropCachePlan:
    """The build the current global weights and params call for; up_to_date when published."""
    m, c = params.model, params.cache
    weights = Path(params.paths.models) / "global.safetensors"
    if not weights.exists():
        raise DataError("global weights not found; train stage I first (`cxr train --stage global`)", where=str(weights))
    ids = tuple(dict.fromkeys(_split_ids(params)))
    sources, image_cache = _sources(params, ids)
    global_digest = file_sha256(weights)
    # resize is keyed only when set: caches built before it existed (no crop) keep their key.
    key = hashlib.sha256(json.dumps({
        "kind": "crops", "format": FORMAT, "global": global_digest, "backbone": m.backbone, "image_size": m.image_size,
        **({"resize": m.resize} if m.resize is not None else {}),
        "local_size": m.local_size, "threshold": m.attention.threshold, "mode": m.attention.mode,
        "shard_images": c.shard_images, "sources": sources}, sort_keys=True).encode()).hexdigest()
    published = cache_store.published_meta(crop_cache_dir(params))
    return CropCachePlan(
        crop_cache_dir(params), Path(params.paths.models), Path(params.paths.images), image_cache, m.backbone,
        m.image_size, m.load_size, m.local_size, m.attention.threshold, m.attention.mode, c.batch_size, c.shard_images,
        pick_device(params.train.device).type, ids, global_digest, sources, key,
        up_to_date=published is not None and published.get("key") == key)


def compute_crops(branch: torch.nn.Module, pixels: torch.Tensor, local_size: int, threshold: float, mode: str,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Both views of a batch through the frozen global branch.

    pixels: (B, S, S) uint8. Returns on CPU: crops (B, 2, L, L) uint8, pooled (B, 2, C)
    float32, boxes (B, 2, 4) int64 `y0, x0, y1, x1` inclusive in view pixels, peak (B, 2)
    float32 heatmap maximum and peak_yx (B, 2, 2) its feature-map cell.
    """
    batch, size = pixels.shape[0], pixels.shape[-1]
    views = torch.stack([pixels, pixels.flip(-1)], 1).reshape(batch * VIEWS, size, size).to(device)
    with torch.no_grad():
        g = branch(to_input(views, device))
        # Crop the un-normalised pixels: uint8-exact storage, normalised later by to_input.
        crops, boxes = attention_crops(views.float().div_(255.0)[:, None], g.features, local_size, threshold, mode)
        heat = attention_heatmap(g.features, mode)
        peak, where = heat.flatten(1).max(dim=1)
    width = heat.shape[-1]
    return {
        "crops": crops.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).view(batch, VIEWS, local_size, local_size).cpu(),
        "pooled": g.pooled.float().view(batch, VIEWS, -1).cpu(),
        "boxes": boxes.view(batch, VIEWS, 4).cpu(),
        "peak": peak.float().view(batch, VIEWS).cpu(),
        "peak_yx": torch.stack([where // width, where % width], -1).view(batch, VIEWS, 2).cpu(),
    }


def _chunk_pixels(plan: CropCachePlan, ids: list[str], reader: CacheReader | None = None) -> tuple[list[np.ndarray | None], list[str | None]]:
    if plan.image_cache is not None:
        reader = reader if reader is not None else CacheReader(plan.image_cache)
        found = [i in reader for i in ids]
        pixels = reader.get("pixels", reader.rows([i for i, f in zip(ids, found) if f]))
        reasons = {}
        if not all(found):
            rejects = cache_store.read_rejects(plan.image_cache).to_pydict()
            reasons = dict(zip(rejects["item_id"], rejects["reject_reason"]))
        it = iter(pixels)
        return [next(it) if f else None for f in found], [None if f else reasons.get(i, "not in the image cache") for i, f in zip(ids, found)]
    out, why = [], []
    for image_id in ids:
        try:
            out.append(load_image_uint8(plan.image_dir / image_id, plan.load_size))
            why.append(None)
        except DataError as exc:
            out.append(None)
            why.append(str(exc))
    return out, why


def _build_inputs(plan: CropCachePlan) -> dict:
    """What every chunk of one build reads, opened once for an in-process build of all chunks:
    the image cache's reader (its index: 112,120 rows on the whole archive) and the global branch."""
    return {"reader": CacheReader(plan.image_cache) if plan.image_cache is not None else None,
            "branch": load_branch(plan.models_dir / "global.safetensors", plan.backbone).to(torch.device(plan.device))}


def build_crop_chunk(plan: CropCachePlan, i: int, *, reader: CacheReader | None = None,
                     branch: torch.nn.Module | None = None) -> dict:
    """Crops, boxes and pooled features of chunk `i`, in batches on the device. `reader` (the
    image cache) and `branch` (the global branch on plan.device), when given, are reused
    rather than opened for this chunk alone (`_build_inputs`)."""
    if cache_store.chunk_done(plan.root, plan.key, i):
        log.info("crop cache chunk %d/%d: already built (resumed)", i + 1, len(plan.chunks))
        return {"chunk": i, "skipped": True}
    t0 = time.perf_counter()
    ids = list(plan.ids[i * plan.shard_images : (i + 1) * plan.shard_images])
    images, reasons = _chunk_pixels(plan, ids, reader)
    good = torch.from_numpy(np.stack([p for p in images if p is not None])) if any(r is None for r in reasons) else None
    if good is not None:
        good = center_crop(good, plan.image_size)  # the global input evaluation sees
    device = torch.device(plan.device)
    if branch is None:
        branch = load_branch(plan.models_dir / "global.safetensors", plan.backbone).to(device)
    parts: list[dict] = []
    if good is not None:
        for start in range(0, len(good), plan.batch_size):
            parts.append(compute_crops(branch, good[start : start + plan.batch_size], plan.local_size, plan.threshold, plan.mode, device))
    out = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]} if parts else None
    n = len(ids)
    box = np.full((n, VIEWS, 4), -1, dtype=np.int64)
    peak = np.full((n, VIEWS), np.nan, dtype=np.float32)
    peak_yx = np.full((n, VIEWS, 2), -1, dtype=np.int64)
    ok = np.array([r is None for r in reasons])
    if out is not None:
        box[ok], peak[ok], peak_yx[ok] = out["boxes"], out["peak"], out["peak_yx"]
    rows = {"item_id": ids, "box": box[:, 0].tolist(), "box_mirrored": box[:, 1].tolist(),
            "peak": peak[:, 0].tolist(), "peak_mirrored": peak[:, 1].tolist(),
            "peak_yx": peak_yx[:, 0].tolist(), "peak_yx_mirrored": peak_yx[:, 1].tolist()}
    C = branch.feature_dim
    arrays = {"crops": out["crops"] if out is not None else np.empty((0, VIEWS, plan.local_size, plan.local_size), np.uint8),
              "pooled": out["pooled"] if out is not None else np.empty((0, VIEWS, C), np.float32)}
    cache_store.write_chunk(plan.root, plan.key, i, rows, arrays, reasons)
    log.info("crop cache chunk %d/%d: %d images cropped, %d rejected, %.1f s", i + 1, len(plan.chunks), int(ok.sum()),
             int((~ok).sum()), time.perf_counter() - t0)
    return {"chunk": i, "skipped": False, "cached": int(ok.sum()), "rejected": int((~ok).sum())}


def publish_crop_cache(plan: CropCachePlan) -> dict:
    from models.branch import build_branch

    dim = build_branch(plan.backbone, "none").feature_dim
    spec = {"crops": ArraySpec("uint8", (VIEWS, plan.local_size, plan.local_size)), "pooled": ArraySpec("float32", (VIEWS, dim))}
    return cache_store.publish(plan.root, plan.key, len(plan.chunks), plan.meta(), spec)


def build_crop_cache(params: Params, *, stop_after_chunks: int | None = None) -> dict:
    """Plan, build every chunk in turn (resuming a killed build), publish."""
    plan = plan_crop_cache(params)
    if plan.up_to_date:
        return {**cache_store.published_meta(plan.root), "up_to_date": True}
    inputs = _build_inputs(plan)
    for done, i in enumerate(plan.chunks):
        if stop_after_chunks is not None and done >= stop_after_chunks:
            return {"stopped_after_chunks": done, "key": plan.key}
        build_crop_chunk(plan, i, **inputs)
        report("crop-cache", done + 1, len(plan.chunks), unit="chunks")
    return {**publish_crop_cache(plan), "up_to_date": False}


def ensure_crop_cache(params: Params) -> CacheReader:
    """A reader of the crop cache for the current global weights and params, (re)built when
    missing or stale."""
    plan = plan_crop_cache(params)
    if not plan.up_to_date:
        log.info("crop cache %s is missing or stale: building %d chunks", plan.root, len(plan.chunks))
        inputs = _build_inputs(plan)
        for i in plan.chunks:
            build_crop_chunk(plan, i, **inputs)
            report("crop-cache", i + 1, len(plan.chunks), unit="chunks")
        publish_crop_cache(plan)
    reader = CacheReader(plan.root)
    if reader.key != plan.key:  # another build published in between: never use it silently
        raise DataError("the crop cache changed while opening it; run again", where=str(plan.root))
    return reader


@dataclass
class CropSplit:
    """A split read from the crop cache: rows of `cache` in the split's order, labels (N, K)."""

    ids: list[str]
    rows: np.ndarray
    labels: torch.Tensor
    cache: CacheReader


def crop_split(cache: CacheReader, meta, splits, split: str) -> CropSplit:
    from cxr.core.labels import LABEL_COLUMNS

    ids = splits.loc[splits["split"] == split, "image_id"].tolist()
    if not ids:
        raise DataError(f"the {split} split is empty", where="splits.parquet")
    if not all(i in cache for i in ids):
        rejects = cache_store.read_rejects(cache.root).to_pydict()
        reasons = dict(zip(rejects["item_id"], rejects["reject_reason"]))
        bad = [reasons.get(i, f"{i}: not in the crop cache") for i in ids if i not in cache]
        raise DataError(f"{len(bad)} of {len(ids)} {split} images cannot be used: {'; '.join(bad[:5])}", where=str(cache.root))
    labels = torch.from_numpy(meta.set_index("image_id").loc[ids, list(LABEL_COLUMNS)].to_numpy(dtype=np.float32, copy=True))
    return CropSplit(ids, cache.rows(ids), labels, cache)


class CropDataset(torch.utils.data.Dataset):
    """(crop (L, L) uint8, global pooled (C,) float32, labels) per item; a flip picks the mirrored view."""

    def __init__(self, data: CropSplit, flips: torch.Tensor | None = None):
        self.data = data
        self.flips = flips

    def __len__(self) -> int:
        return len(self.data.ids)

    def __getitem__(self, i: int):
        row, view = int(self.data.rows[i]), int(self.flips is not None and bool(self.flips[i]))
        crop = torch.from_numpy(np.array(self.data.cache.item("crops", row)[view]))
        pooled = torch.from_numpy(np.array(self.data.cache.item("pooled", row)[view]))
        return crop, pooled, self.data.labels[i]

    def batch(self, start: int, stop: int):
        """Unflipped (crops (B, L, L), pooled (B, C)) of items start..stop-1, read shard by shard."""
        rows = self.data.rows[start:stop]
        return (torch.from_numpy(self.data.cache.get("crops", rows)[:, 0].copy()),
                torch.from_numpy(self.data.cache.get("pooled", rows)[:, 0].copy()))
