"""Image and crop caches: format, rejects, resume after SIGKILL, readers during a rebuild,
staleness, crops equal to the on-the-fly path, stages II/III trained from the cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from models.agcnn import attention_crops
from tasks.images import cache_store
from tasks.images.cache_store import CacheReader
from tasks.training.crop_cache import build_crop_cache, crop_cache_dir, ensure_crop_cache, plan_crop_cache
from tasks.training.dataset import load_pixels
from tasks.images.geometry import to_input
from tasks.images.image_cache import build_image_cache, cached_pixels
from tasks.images.loader import load_image_uint8
from tasks.metadata.split import read_splits
from cxr.core.digest import file_sha256
from tasks.bundle.weights import load_branch, load_weights, save_weights
from tests.conftest import NIH_SAMPLE, ROOT
from tests.data.make_bad_corpus import make_bad_corpus

IMAGES = NIH_SAMPLE / "images"


@pytest.fixture(scope="module")
def sample_ids(workspace) -> list[str]:
    return read_splits(workspace / "processed" / "splits.parquet")["image_id"].tolist()


@pytest.fixture(scope="module")
def small(trained, tmp_path_factory):
    """A 240-image slice of the sample with the trained global weights, caches under a fresh root."""
    root = tmp_path_factory.mktemp("cache-ws")
    splits = read_splits(trained.paths.processed / "splits.parquet")
    sub = pd.concat([g.head({"train": 160}.get(name, 40)) for name, g in splits.groupby("split")])
    (root / "processed").mkdir()
    sub.to_parquet(root / "processed" / "splits.parquet", index=False)
    shutil.copy(trained.paths.processed / "class_weights.json", root / "processed")
    (root / "models").mkdir()
    shutil.copy(trained.paths.models / "global.safetensors", root / "models")
    paths = trained.paths.model_copy(update={"processed": root / "processed", "models": root / "models",
                                             "cache": root / "cache", "metrics": root / "metrics"})
    cache = trained.cache.model_copy(update={"image_size": 64, "shard_images": 64, "batch_size": 32})
    return trained.model_copy(update={"paths": paths, "cache": cache})


def test_image_cache_index_pixels_and_rejects(tmp_path):
    manifest = make_bad_corpus(tmp_path / "corpus")
    names = sorted(manifest)
    meta = build_image_cache(tmp_path / "corpus", names, tmp_path / "cache", 40, shard_images=6)
    # The index alone, read with plain pyarrow, says what is cached and how.
    index = pq.read_table(tmp_path / "cache" / "index.parquet")
    recorded = json.loads(index.schema.metadata[b"cxr_cache"])
    assert recorded["image_size"] == 40 and recorded["key"] == meta["key"]
    ok = sorted(n for n, why in manifest.items() if why == "ok")
    assert sorted(index["item_id"].to_pylist()) == ok
    rejects = cache_store.read_rejects(tmp_path / "cache").to_pydict()
    assert dict(zip(rejects["item_id"], rejects["reject_reason"])).keys() == set(names) - set(ok)
    for name, reason in zip(rejects["item_id"], rejects["reject_reason"]):
        assert manifest[name] in reason
    reader = CacheReader(tmp_path / "cache")
    for name in ok:
        assert np.array_equal(reader.get("pixels", reader.rows([name]))[0], load_image_uint8(tmp_path / "corpus" / name, 40))
    # Training asks for a rejected image: the recorded reason, as the loader would say it.
    with pytest.raises(Exception, match="truncated or corrupt"):
        cached_pixels(tmp_path / "cache", ["gray8.png", "truncated.png"], tmp_path / "corpus", 40)
    # Nothing changed: a second build is a no-op.
    assert build_image_cache(tmp_path / "corpus", names, tmp_path / "cache", 40, shard_images=6)["up_to_date"]


_KILLABLE_BUILD = """
import sys, time
import tasks.images.image_cache as ic
real = ic.build_image_chunk
def slow(plan, i):
    out = real(plan, i)
    time.sleep(0.4)  # room for the parent's SIGKILL between chunks and inside the next
    return out
ic.build_image_chunk = slow
ic.build_image_cache(sys.argv[1], sys.argv[2].split(","), sys.argv[3], 64, 100)
"""


def test_build_killed_mid_way_resumes_to_the_uninterrupted_index(tmp_path, sample_ids):
    straight = build_image_cache(IMAGES, sample_ids, tmp_path / "straight", 64, 100)
    child = subprocess.Popen([sys.executable, "-c", _KILLABLE_BUILD, str(IMAGES), ",".join(sample_ids), str(tmp_path / "killed")],
                             cwd=ROOT)
    vdir = cache_store.version_dir(tmp_path / "killed", straight["key"])
    deadline = time.time() + 60
    while len(list(vdir.glob("chunk-*.parquet"))) < 2 and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = len(list(vdir.glob("chunk-*.parquet")))
    assert 2 <= done < 8, "the build was not interrupted mid-way"
    assert not (tmp_path / "killed" / "index.parquet").exists()  # nothing half-built is published
    resumed = build_image_cache(IMAGES, sample_ids, tmp_path / "killed", 64, 100)
    assert resumed["key"] == straight["key"]
    a, b = (pq.read_table(p / "index.parquet") for p in (tmp_path / "straight", tmp_path / "killed"))
    assert a.equals(b) and a.schema.metadata == b.schema.metadata
    ra, rb = CacheReader(tmp_path / "straight"), CacheReader(tmp_path / "killed")
    rows = ra.rows(sample_ids)
    assert np.array_equal(ra.get("pixels", rows), rb.get("pixels", rows))


def test_reader_keeps_its_version_through_a_rebuild(tmp_path, sample_ids):
    root, ids = tmp_path / "cache", sample_ids[:300]
    first = build_image_cache(IMAGES, ids, root, 64, 100)
    old = CacheReader(root)
    before = old.get("pixels", old.rows(ids[:5]))
    # A rebuild in progress (killed after one chunk) is invisible to new readers.
    assert build_image_cache(IMAGES, ids, root, 48, 100, stop_after_chunks=1)["stopped_after_chunks"] == 1
    assert CacheReader(root).key == first["key"]
    second = build_image_cache(IMAGES, ids, root, 48, 100)
    assert not (root / first["version"]).exists()  # old version removed once the new one is published
    assert np.array_equal(old.get("pixels", old.rows(ids[:5])), before)  # still its own, valid data
    assert np.array_equal(old.get("pixels", old.rows(ids[-5:]))[0], load_image_uint8(IMAGES / ids[-5], 64))
    new = CacheReader(root)
    assert new.key == second["key"] != first["key"]
    assert new.get("pixels", new.rows(ids[:1])).shape == (1, 48, 48)


def test_cached_crops_equal_on_the_fly_crops(small):
    params = small
    build_image_cache(params.paths.images, read_splits(params.paths.processed / "splits.parquet")["image_id"],
                      params.paths.cache / "images", 64, 64)
    reader = ensure_crop_cache(params)
    assert reader.meta["global_digest"] == file_sha256(params.paths.models / "global.safetensors")
    ids = reader.ids[:24]
    rows = reader.rows(ids)
    pixels = load_pixels(ids, params.paths.images, 64)
    m = params.model
    branch = load_branch(params.paths.models / "global.safetensors", m.backbone)
    # One uint8 step after normalisation, the largest any channel can see.
    tol = (0.5 / 255) / 0.224 + 1e-4
    for view, column in ((0, "box"), (1, "box_mirrored")):
        images = pixels if view == 0 else pixels.flip(-1)
        with torch.no_grad():
            x = to_input(images)
            g = branch(x)
            crops, boxes = attention_crops(x, g.features, m.local_size, m.attention.threshold, m.attention.mode)
        cached_boxes = torch.tensor(reader.index.take(rows)[column].to_pylist())
        assert torch.equal(cached_boxes, boxes)
        cached = to_input(torch.from_numpy(reader.get("crops", rows)[:, view].copy()))
        assert (cached - crops).abs().max().item() <= tol
        pooled = torch.from_numpy(reader.get("pooled", rows)[:, view].copy())
        assert torch.allclose(pooled, g.pooled, atol=1e-4)


def test_crop_cache_build_stopped_mid_way_resumes_to_the_uninterrupted_index(small, tmp_path):
    """The crop cache resumes like the image cache: finished chunks are kept, nothing is
    published until the last one, and the result equals an uninterrupted build."""
    def at(root: Path):
        return small.model_copy(update={"paths": small.paths.model_copy(update={"cache": root})})

    straight = build_crop_cache(at(tmp_path / "straight"))
    assert build_crop_cache(at(tmp_path / "stopped"), stop_after_chunks=2)["stopped_after_chunks"] == 2
    root = crop_cache_dir(at(tmp_path / "stopped"))
    assert not (root / "index.parquet").exists()  # nothing half-built is published
    assert len(list(cache_store.version_dir(root, straight["key"]).glob("chunk-*.parquet"))) == 2
    resumed = build_crop_cache(at(tmp_path / "stopped"))
    assert resumed["key"] == straight["key"] and not resumed["up_to_date"]
    a, b = (pq.read_table(crop_cache_dir(at(tmp_path / n)) / "index.parquet") for n in ("straight", "stopped"))
    assert a.equals(b) and a.schema.metadata == b.schema.metadata
    ra, rb = CacheReader(crop_cache_dir(at(tmp_path / "straight"))), CacheReader(root)
    rows = ra.rows(ra.ids)
    for column in ("crops", "pooled"):
        assert np.array_equal(ra.get(column, rows), rb.get(column, rows)), column


def test_stale_weights_or_params_are_detected_and_rebuilt(small, tmp_path, prefect_server):
    from flows.cache import cache_crops_flow

    params = small.model_copy(update={"paths": small.paths.model_copy(update={"models": tmp_path / "models", "cache": tmp_path / "cache"})})
    (tmp_path / "models").mkdir()
    shutil.copy(small.paths.models / "global.safetensors", tmp_path / "models")
    built = cache_crops_flow(params)
    assert cache_crops_flow(params)["up_to_date"] and built["key"] == cache_crops_flow(params)["key"]
    other = params.model_copy(update={"model": params.model.model_copy(
        update={"attention": params.model.attention.model_copy(update={"threshold": 0.5})})})
    assert not plan_crop_cache(other).up_to_date
    # New global weights (one kernel nudged): same file name, different digest.
    branch = load_branch(tmp_path / "models" / "global.safetensors", params.model.backbone)
    with torch.no_grad():
        branch.body[0].weight.mul_(1.5)
    save_weights(branch, tmp_path / "models" / "global.safetensors", load_weights(tmp_path / "models" / "global.safetensors")[1])
    assert not plan_crop_cache(params).up_to_date
    rebuilt = cache_crops_flow(params)
    assert not rebuilt["up_to_date"] and rebuilt["key"] != built["key"]
    assert CacheReader(crop_cache_dir(params)).meta["global_digest"] == file_sha256(tmp_path / "models" / "global.safetensors")


def test_stages_two_and_three_train_from_the_crop_cache(small):
    from tasks.training.stages import train_stage

    key = build_crop_cache(small)["key"]
    local = train_stage(small, "local", progress=False)
    fusion = train_stage(small, "fusion", progress=False)
    for summary in (local, fusion):
        _, meta = load_weights(Path(summary["weights"]))
        assert meta["crop_cache"] == key and 0.0 <= summary["best_valid_mean_auroc"] <= 1.0
    # The cache was not rebuilt in between: stage III read the same one.
    assert CacheReader(crop_cache_dir(small)).key == key
    assert os.path.exists(small.paths.metrics / "train_fusion.json")
