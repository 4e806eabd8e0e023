"""Training and evaluation read a split batch by batch from the image cache's shards, never
whole, with the same results as the in-memory split the loader decodes (real 64-px NIH sample)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cxr.core.errors import DataError
from tasks.images.cache_store import CacheReader
from tasks.images.image_cache import build_image_cache
from tasks.metadata.ingest import read_metadata
from tasks.metadata.split import read_splits
from tasks.training.dataset import SplitData, TrainBatches, load_split
from tasks.training.stages import epoch_draws, train_stage
from tests.conftest import sliced_params


def _with_cache(params, root):
    return params.model_copy(update={"paths": params.paths.model_copy(update={
        "models": root / "models", "metrics": root / "metrics", "cache": root / "cache"})})


def _splits(params):
    meta = read_metadata(params.paths.interim / "metadata.parquet")
    return meta, read_splits(params.paths.processed / "splits.parquet")


def _cache_images(params, shard_images: int = 16):
    ids = read_splits(params.paths.processed / "splits.parquet")["image_id"].tolist()
    build_image_cache(params.paths.images, ids, params.paths.cache / "images", params.model.load_size, shard_images)


@pytest.fixture(scope="module")
def both(workspace, sliced, tmp_path_factory):
    """(params with an image cache of the sliced split in 16-image shards, its train split
    from the cache, the same split decoded into memory)."""
    root = tmp_path_factory.mktemp("stream")
    params = _with_cache(sliced_params(workspace, sliced, root), root)
    _cache_images(params)
    meta, splits = _splits(params)
    streamed = load_split(meta, splits, "train", params.paths.images, params.model, params.paths.cache / "images")
    in_memory = load_split(meta, splits, "train", params.paths.images, params.model)
    return params, streamed, in_memory


def test_a_cached_split_holds_no_pixels_and_batches_equal_the_in_memory_split(both):
    params, streamed, in_memory = both
    assert streamed.loaded is None and streamed.cache is not None and len(streamed.rows) == len(streamed.ids)
    assert in_memory.loaded is not None and in_memory.cache is None
    assert streamed.ids == in_memory.ids and torch.equal(streamed.labels, in_memory.labels)
    # No tensor of the split's pixels anywhere on it: only ids, labels and index positions.
    held = [v for v in vars(streamed).values() if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim > 1]
    assert [v.shape for v in held] == [streamed.labels.shape]
    # An epoch's shuffled batches (flips too) and validation's sequential ones: the same bytes.
    order, flips, _ = epoch_draws(params, "global", 0, len(streamed.ids))
    batches = [order[i : i + 7].tolist() for i in range(0, len(order), 7)]
    for a, b in zip(TrainBatches(streamed, batches, flips), TrainBatches(in_memory, batches, flips)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(streamed.inputs(5, 37), in_memory.inputs(5, 37))
    assert torch.equal(streamed.take([9, 3, 3, 40]), in_memory.take([9, 3, 3, 40]))


def test_batches_are_read_when_asked_for_and_a_damaged_shard_is_named(both, tmp_path):
    params, _, _ = both
    params = _with_cache(params, tmp_path)
    _cache_images(params)
    meta, splits = _splits(params)
    data = load_split(meta, splits, "train", params.paths.images, params.model, params.paths.cache / "images")
    # Cut the shard that holds the split's last image after the split is opened: had opening it
    # read the pixels, the batch would still come from memory; it is read now and fails, with
    # the shard named (never zeros or garbage).
    reader = data.cache
    row = int(data.rows[-1])
    shard = int(reader.index["shard"][row].as_py())
    path = reader.root / reader.meta["version"] / f"shard-{shard:05d}.pixels"
    os.truncate(path, int(reader.index["offset"][row].as_py()) * params.model.load_size ** 2)
    with pytest.raises(DataError, match=f"shard-{shard:05d}.pixels is shorter"):
        data.inputs(len(data) - 1, len(data))


def test_pread_reads_equal_the_memory_map(both):
    params, streamed, _ = both
    reader = CacheReader(params.paths.cache / "images")
    rows = np.array([len(reader) - 1, 0, 17, 16, 15, 3, 3, 31, 32])  # across shards, out of order, repeated
    got = reader.get("pixels", rows)
    assert np.array_equal(got, np.stack([reader.item("pixels", r) for r in rows]))
    assert reader.get("pixels", rows[:0]).shape == (0, *got.shape[1:])


def test_training_from_the_cache_equals_training_in_memory(workspace, sliced, tmp_path):
    base = sliced_params(workspace, sliced, tmp_path / "a")
    decoded = train_stage(_with_cache(base, tmp_path / "a"), "global", progress=False)  # no image cache there
    cached = _with_cache(base, tmp_path / "b")
    _cache_images(cached)
    streamed = train_stage(cached, "global", progress=False)
    assert streamed["digest"] == decoded["digest"]
    assert streamed["valid_auroc"] == decoded["valid_auroc"]


def test_evaluation_batches_from_the_cache_equal_the_in_memory_split(trained, tmp_path):
    from tasks.bundle.weights import load_agcnn
    from tasks.evaluation.evaluate import branch_probabilities

    params = _with_cache(trained, tmp_path)
    _cache_images(params, shard_images=64)
    meta, splits = _splits(params)
    test = load_split(meta, splits, "test", params.paths.images, params.model, params.paths.cache / "images")
    assert isinstance(test, SplitData) and test.loaded is None
    memory = load_split(meta, splits, "test", params.paths.images, params.model)
    model = load_agcnn(trained.paths.models, params.model)
    (p_stream, box_stream), (p_mem, box_mem) = (branch_probabilities(model, d, torch.device("cpu"), 24) for d in (test, memory))
    assert all(np.array_equal(p_stream[b], p_mem[b]) for b in p_mem) and np.array_equal(box_stream, box_mem)
