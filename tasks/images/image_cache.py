"""The image cache: every source radiograph decoded once by the one loader, resized, stored uint8.

Decoding a 1024x1024 PNG costs tens of milliseconds; reading its resized pixels from a
shard costs microseconds. The cache is keyed by its resolution and the
SHA-256 of every source file, so changed images make a new key (and a rebuild); which
images it holds and with what params is readable from `index.parquet` with plain pyarrow.
Files the loader refuses are listed with the reason in the version's `rejects.parquet`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxr.core.errors import DataError
from cxr.core.progress import report
from tasks.images import cache_store
from tasks.images.cache_store import ArraySpec, CacheReader
from cxr.core.digest import file_sha256
from tasks.images.loader import load_image_uint8

log = logging.getLogger("cxr.cache")

FORMAT = 1  # bump when what is stored per image changes


def sources_digest(ids, checksums) -> str:
    """One digest of which files (by id) with which contents (SHA-256, or the read error)."""
    h = hashlib.sha256()
    for image_id, sha in sorted(zip(ids, checksums)):
        h.update(f"{image_id}\t{sha}\n".encode())
    return h.hexdigest()


def hash_sources(image_dir: Path, ids) -> list[str]:
    """SHA-256 per source file; an unreadable file gets "error: <reason>" (rejected later)."""
    out = []
    for image_id in ids:
        try:
            out.append(file_sha256(Path(image_dir) / image_id))
        except DataError as exc:
            out.append(f"error: {exc}")
    return out


@dataclass(frozen=True)
class ImageCachePlan:
    """What one image-cache build makes; chunk i holds ids[i*shard_images : (i+1)*shard_images]."""

    root: Path
    image_dir: Path
    size: int
    shard_images: int
    ids: tuple[str, ...]
    checksums: tuple[str, ...]
    key: str
    up_to_date: bool

    @property
    def chunks(self) -> list[int]:
        return list(range(max(1, -(-len(self.ids) // self.shard_images))))

    def chunk_ids(self, i: int) -> tuple[list[str], list[str]]:
        sl = slice(i * self.shard_images, (i + 1) * self.shard_images)
        return list(self.ids[sl]), list(self.checksums[sl])

    def meta(self) -> dict:
        return {"kind": "images", "format": FORMAT, "image_size": self.size, "shard_images": self.shard_images,
                "source_dir": source_dir_from(self.root, self.image_dir), "sources_digest": sources_digest(self.ids, self.checksums)}


def source_dir_from(root: Path, image_dir: Path) -> str:
    """`image_dir` relative to the cache folder `root`, as the published metadata records it.

    Relative, not absolute: the published index is a DVC output, and its hash must be the same
    in every clone, wherever it is checked out (the key itself hashes only contents and params).
    """
    return os.path.relpath(Path(image_dir).resolve(), Path(root).resolve())


def plan_image_cache(image_dir: Path, ids, root: Path, size: int, shard_images: int) -> ImageCachePlan:
    """Hash the sources (cheap next to decoding them) and name the build they call for."""
    ids = tuple(dict.fromkeys(ids))  # each image once, in the given order
    checksums = tuple(hash_sources(image_dir, ids))
    # Contents and params only, never a path: the version folder is named after the key, and
    # it must be the same in every clone of the repository.
    key = hashlib.sha256(json.dumps({"kind": "images", "format": FORMAT, "size": int(size), "shard_images": int(shard_images),
                                     "sources": sources_digest(ids, checksums)}, sort_keys=True).encode()).hexdigest()
    published = cache_store.published_meta(root)
    return ImageCachePlan(Path(root), Path(image_dir), int(size), int(shard_images), ids, checksums, key,
                          up_to_date=published is not None and published.get("key") == key)


def build_image_chunk(plan: ImageCachePlan, i: int) -> dict:
    """Decode, resize and store chunk `i` (skipped when a resumed build already has it)."""
    if cache_store.chunk_done(plan.root, plan.key, i):
        log.info("image cache chunk %d/%d: already built (resumed)", i + 1, len(plan.chunks))
        return {"chunk": i, "skipped": True}
    t0 = time.perf_counter()
    ids, checksums = plan.chunk_ids(i)
    pixels, reasons = [], []
    for image_id, sha in zip(ids, checksums):
        if sha.startswith("error: "):
            reasons.append(sha[len("error: "):])
            continue
        try:
            pixels.append(load_image_uint8(plan.image_dir / image_id, plan.size))
            reasons.append(None)
        except DataError as exc:
            reasons.append(str(exc))
    arrays = {"pixels": np.stack(pixels) if pixels else np.empty((0, plan.size, plan.size), np.uint8)}
    rows = {"item_id": ids, "source_sha256": [None if s.startswith("error: ") else s for s in checksums],
            "height": [plan.size] * len(ids), "width": [plan.size] * len(ids)}
    cache_store.write_chunk(plan.root, plan.key, i, rows, arrays, reasons)
    log.info("image cache chunk %d/%d: %d images cached, %d rejected, %.1f s", i + 1, len(plan.chunks), len(pixels),
             len(ids) - len(pixels), time.perf_counter() - t0)
    return {"chunk": i, "skipped": False, "cached": len(pixels), "rejected": len(ids) - len(pixels)}


def publish_image_cache(plan: ImageCachePlan) -> dict:
    spec = {"pixels": ArraySpec("uint8", (plan.size, plan.size))}
    return cache_store.publish(plan.root, plan.key, len(plan.chunks), plan.meta(), spec)


def build_image_cache(image_dir: Path, ids, root: Path, size: int, shard_images: int, *,
                      stop_after_chunks: int | None = None) -> dict:
    """Plan, build every chunk in turn, publish. `stop_after_chunks` ends the work early
    (an interruption, to test resume). Returns the published metadata (or a stop record)."""
    plan = plan_image_cache(image_dir, ids, root, size, shard_images)
    if plan.up_to_date:
        return {**cache_store.published_meta(root), "up_to_date": True}
    for done, i in enumerate(plan.chunks):
        if stop_after_chunks is not None and done >= stop_after_chunks:
            return {"stopped_after_chunks": done, "key": plan.key}
        build_image_chunk(plan, i)
        report("image-cache", done + 1, len(plan.chunks), unit="chunks")
    return {**publish_image_cache(plan), "up_to_date": False}


def image_cache_serves(root: Path, image_dir: Path, size: int) -> dict | None:
    """The published image cache's metadata when it holds `image_dir` at `size`, else None."""
    meta = cache_store.published_meta(root)
    if meta is None or meta.get("kind") != "images" or meta.get("format") != FORMAT:
        return None
    if meta.get("image_size") != int(size) or meta.get("source_dir") != source_dir_from(root, image_dir):
        return None
    return meta


def cached_rows(root: Path, ids: list[str], image_dir: Path, size: int) -> tuple[CacheReader, np.ndarray] | None:
    """(a reader of the image cache, the index positions of `ids` in it) when the cache holds
    `image_dir` at `size` and every one of `ids`, else None. Nothing is read but the index:
    pixels are read batch by batch with `reader.get("pixels", positions[...])`.

    An id the cache rejected raises the same DataError the loader would (with the recorded reason).
    """
    if image_cache_serves(root, image_dir, size) is None:
        return None
    reader = CacheReader(root)
    if all(i in reader for i in ids):
        return reader, reader.rows(ids)
    rejects = cache_store.read_rejects(root).to_pydict()
    reasons = dict(zip(rejects["item_id"], rejects["reject_reason"]))
    bad = [reasons[i] for i in ids if i not in reader and i in reasons]
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} of {len(ids)} training images cannot be used: {shown}", where=str(image_dir))
    log.info("image cache %s does not hold all %d images; decoding from %s", root, len(ids), image_dir)
    return None


def cached_pixels(root: Path, ids: list[str], image_dir: Path, size: int) -> torch.Tensor | None:
    """(N, size, size) uint8 of `ids` from the image cache, all at once, or None when it does
    not hold them all (see `cached_rows`, which training uses to read batch by batch)."""
    found = cached_rows(root, ids, image_dir, size)
    if found is None:
        return None
    reader, positions = found
    return torch.from_numpy(reader.get("pixels", positions))
