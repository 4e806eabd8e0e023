"""The paper's input pipeline: resize to `model.resize`, random `image_size` crop in stage-I
training, centre crop everywhere else (evaluation, thresholds, crop cache, scoring)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cxr.core.config import ModelParams, Params, load_params
from cxr.core.errors import DataError
from tasks.training.dataset import PixelDataset, SplitData, load_split
from tasks.images.geometry import center_crop, center_offset, crop, input_box_to_image, network_pixels_from_image
from tasks.images.image_cache import build_image_cache, cached_pixels
from tasks.images.loader import load_image, load_image_uint8
from tasks.metadata.ingest import read_metadata
from tasks.metadata.split import read_splits
from tasks.training.stages import epoch_draws, train_stage
from tasks.bundle.weights import load_branch, load_weights
from tests.conftest import NIH_SAMPLE, ROOT, make_params

IMAGES = NIH_SAMPLE / "images"
CROPPED = {"image_size": 48, "resize": 64, "local_size": 48}  # the NIH sample is 64 px: crop 48 of it


def with_model(params: Params, **model) -> Params:
    return params.model_copy(update={"model": params.model.model_copy(update=model)})


# --------------------------------------------------------------------------- geometry


def test_center_crop_geometry_tensor_and_numpy_alike():
    x = torch.arange(2 * 8 * 8).view(2, 8, 8)
    c = center_crop(x, 4)
    assert c.shape == (2, 4, 4) and torch.equal(c, x[:, 2:6, 2:6])
    assert np.array_equal(center_crop(x.numpy(), 4), x.numpy()[:, 2:6, 2:6])
    assert torch.equal(center_crop(x, 8), x)  # no margin: the image itself
    assert center_offset(9, 4) == 2  # odd margin: the extra pixel goes to the bottom/right
    assert torch.equal(crop(x, 1, 3, 4), x[:, 1:5, 3:7])


def test_resize_defaults_to_image_size_and_the_paper_profile_crops_224_from_256():
    assert ModelParams(image_size=96).load_size == 96 and ModelParams(image_size=96).resize is None
    paper = load_params(ROOT / "profiles" / "paper.yaml")
    assert (paper.model.resize, paper.model.image_size, paper.model.load_size) == (256, 224, 256)
    assert paper.cache.image_size == paper.model.load_size  # the image cache serves the 256-px pixels
    assert load_params(ROOT / "params.yaml").model.resize is None  # the demo: no crop, dvc.lock stays valid


def test_network_pixels_are_the_evaluation_pixels_and_boxes_map_back(workspace):
    params = with_model(make_params(workspace), **CROPPED)
    meta = read_metadata(workspace / "interim" / "metadata.parquet")
    test = load_split(meta, read_splits(workspace / "processed" / "splits.parquet"), "test", IMAGES, params.model)
    assert test.loaded.shape[1:] == (64, 64) and test.pixels.shape[1:] == (48, 48)
    for i in (0, 7):
        image = load_image(IMAGES / test.ids[i])
        assert np.array_equal(network_pixels_from_image(image, params.model), test.pixels[i].numpy())
    # Without resize: exactly today's loader output, no crop.
    plain = make_params(workspace).model
    assert np.array_equal(network_pixels_from_image(image, plain), load_image_uint8(IMAGES / test.ids[7], 64))
    # A box in input pixels -> image pixels: shift by the crop offset, then scale load_size -> image.
    paper = ModelParams(image_size=224, resize=256)
    assert input_box_to_image((0, 0, 223, 223), paper, (1024, 1024)) == (64, 64, 959, 959)
    assert input_box_to_image((10, 20, 30, 40), paper, (512, 256)) == ((10 + 16) * 2, 20 + 16, (30 + 16 + 1) * 2 - 1, 40 + 16)
    assert input_box_to_image((0, 0, 63, 63), plain, (1024, 1024)) == (0, 0, 1023, 1023)


# --------------------------------------------------------------------------- random crops


def test_random_crops_are_seeded_per_epoch_and_stage_one_only():
    base = make_params(NIH_SAMPLE)
    params = with_model(base, **CROPPED)
    n = 50
    order, flips, offsets = epoch_draws(params, "global", 0, n)
    again = epoch_draws(params, "global", 0, n)
    assert all(torch.equal(a, b) for a, b in zip((order, flips, offsets), again))  # from the seed alone
    assert offsets.shape == (n, 2) and offsets.min() >= 0 and offsets.max() <= 64 - 48
    assert len({tuple(o) for o in offsets.tolist()}) > n // 2  # spread over the positions
    assert not torch.equal(offsets, epoch_draws(params, "global", 1, n)[2])  # new crops each epoch
    other_seed = params.model_copy(update={"seed": params.seed + 1})
    assert not torch.equal(offsets, epoch_draws(other_seed, "global", 0, n)[2])
    # Adding the crops leaves the order and flips of the same epoch as they were without them.
    plain = epoch_draws(base, "global", 0, n)
    assert torch.equal(plain[0], order) and torch.equal(plain[1], flips) and plain[2] is None
    # Stages II/III read the crop cache (centre crop); off switch; no room: no random crops.
    assert epoch_draws(params, "local", 0, n)[2] is None and epoch_draws(params, "fusion", 0, n)[2] is None
    no_crop = params.model_copy(update={"train": params.train.model_copy(update={"random_crop": False})})
    assert epoch_draws(no_crop, "global", 0, n)[2] is None
    assert epoch_draws(with_model(base, resize=64), "global", 0, n)[2] is None  # resize == image_size


def test_pixel_dataset_crops_at_the_drawn_offsets_then_flips():
    loaded = torch.arange(3 * 6 * 6, dtype=torch.int64).view(3, 6, 6)
    data = SplitData(["a", "b", "c"], loaded, torch.zeros(3, 14), 4)
    offsets = torch.tensor([[0, 0], [2, 1], [1, 2]])
    flips = torch.tensor([False, True, False])
    ds = PixelDataset(data, flips, offsets)
    assert torch.equal(ds[0][0], loaded[0, 0:4, 0:4])
    assert torch.equal(ds[1][0], loaded[1, 2:6, 1:5].flip(-1))
    assert torch.equal(ds[2][0], loaded[2, 1:5, 2:6])
    assert torch.equal(PixelDataset(data)[1][0], loaded[1, 1:5, 1:5])  # no offsets: the centre


# --------------------------------------------------------------------------- training and caches


@pytest.fixture(scope="module")
def tiny(workspace, sliced) -> Params:
    """Stage-I params cropping 48 px from the 64-px sample, 2 epochs on the 160-image slice of its split."""
    params = with_model(make_params(workspace, epochs=2, batch_size=32), **CROPPED)
    return params.model_copy(update={"paths": params.paths.model_copy(update={"processed": sliced})})


def _at(params: Params, root, **train) -> Params:
    paths = params.paths.model_copy(update={"models": root / "models", "metrics": root / "metrics", "cache": root / "cache"})
    return params.model_copy(update={"paths": paths, "train": params.train.model_copy(update=train)})


@pytest.fixture(scope="module")
def cropped(tiny, tmp_path_factory) -> tuple[Params, dict]:
    """Stage I trained once with random crops, pixels decoded by the loader (no image cache)."""
    params = _at(tiny, tmp_path_factory.mktemp("cropped"))
    return params, train_stage(params, "global", progress=False)


def test_stage_one_with_random_crops_is_deterministic_resumable_and_cache_agnostic(tiny, cropped, tmp_path):
    first = cropped[1]
    _, meta = load_weights(first["weights"])
    assert (meta["image_size"], meta["resize"]) == (48, 64)
    # Same seed, pixels from the image cache at resize (not image_size), killed after epoch 0
    # and resumed: bitwise the weights of the uninterrupted, decoding run.
    again = _at(tiny, tmp_path / "b")
    ids = read_splits(tiny.paths.processed / "splits.parquet")["image_id"].tolist()
    build_image_cache(IMAGES, ids, again.paths.cache / "images", tiny.model.resize, 64)
    assert cached_pixels(again.paths.cache / "images", ids[:2], IMAGES, tiny.model.load_size) is not None
    assert train_stage(again, "global", progress=False, stop_after_epoch=0) == {"stage": "global", "stopped_after_epoch": 0}
    assert train_stage(again, "global", progress=False)["digest"] == first["digest"]
    # The crops are really used: centre crops only train other weights.
    centre = train_stage(_at(tiny, tmp_path / "c", random_crop=False), "global", progress=False)
    assert centre["digest"] != first["digest"]


def test_crop_cache_global_input_is_the_centre_crop(cropped, tmp_path):
    from models.agcnn import attention_crops
    from tasks.training.crop_cache import ensure_crop_cache, plan_crop_cache
    from tasks.images.geometry import to_input

    params = _at(cropped[0], tmp_path)
    (tmp_path / "models").mkdir()
    shutil.copy(cropped[1]["weights"], tmp_path / "models")
    ids = read_splits(params.paths.processed / "splits.parquet")["image_id"].tolist()
    build_image_cache(IMAGES, ids, params.paths.cache / "images", params.model.load_size, 64)
    assert plan_crop_cache(params).image_cache is not None  # served from the 64-px image cache
    reader = ensure_crop_cache(params)
    assert reader.meta["load_size"] == 64 and reader.meta["image_size"] == 48
    assert plan_crop_cache(with_model(params, resize=56)).key != reader.key  # resize is part of the key
    some = reader.ids[:16]
    m = params.model
    pixels = torch.stack([torch.from_numpy(network_pixels_from_image(load_image(IMAGES / i), m)) for i in some])
    branch = load_branch(params.paths.models / "global.safetensors", m.backbone)
    with torch.no_grad():
        x = to_input(pixels)
        _, boxes = attention_crops(x, branch(x).features, m.local_size, m.attention.threshold, m.attention.mode)
    assert torch.equal(torch.tensor(reader.index.take(reader.rows(some))["box"].to_pylist()), boxes)


# --------------------------------------------------------------------------- refused params


def test_resize_below_image_size_is_refused_before_any_work(tmp_path, capsys):
    from cxr.cli import main

    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  image_size: 224\n  resize: 200\n")
    with pytest.raises(DataError, match=r"model: .*model\.resize \(200\) is smaller than model\.image_size \(224\)"):
        load_params(bad)
    # The CLI entry point in-process (the `cxr` script may be installed from another checkout).
    out = tmp_path / "processed"
    assert main(["--params", str(bad), "split", "--metadata", str(tmp_path / "none.parquet"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert err.startswith("cxr split: error:") and "model.resize (200) is smaller than model.image_size (224)" in err
    assert not out.exists()


def test_weights_refuse_another_input_geometry(trained):
    """Scoring and evaluation load the model through load_agcnn: weights trained on 64 px
    inputs from 64 px images are refused for 64 px crops of 80 px images, with both named."""
    from tasks.bundle.weights import load_agcnn

    load_agcnn(trained.paths.models, trained.model)  # the params it was trained with
    other = trained.model_copy(update={"model": trained.model.model_copy(update={"resize": 80})})
    with pytest.raises(DataError, match=r"trained on 64 px inputs cut from images resized to 64 px.*64 px from 80 px"):
        load_agcnn(trained.paths.models, other.model)
