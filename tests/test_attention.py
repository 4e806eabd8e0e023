"""models.attention against the per-image numpy/skimage reference (benchmarks/attention_reference.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention_reference import (  # noqa: E402
    reference_boxes,
    reference_crops,
    reference_heatmap,
    reference_mask_box,
)
from models.attention import (  # noqa: E402
    attention_boxes,
    attention_heatmap,
    attention_mask,
    crop_boxes,
    largest_component_boxes,
)


def ref_mask_boxes(mask: torch.Tensor) -> np.ndarray:
    return np.array([reference_mask_box(m) for m in mask.numpy()], dtype=np.int64).reshape(-1, 4)


def blob_features(gen, batch, channels, h, w, signed=False):
    """Random maps with a few smooth blobs so that regions vary in number, size and place."""
    f = torch.randn(batch, channels, h, w, generator=gen)
    if not signed:
        f = torch.relu(f)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    for i in range(batch):
        for _ in range(int(torch.randint(0, 4, (), generator=gen))):
            cy, cx = torch.rand(2, generator=gen) * torch.tensor([h - 1, w - 1])
            s = 0.4 + 2 * float(torch.rand((), generator=gen))
            f[i, torch.randint(0, channels, (max(1, channels // 4),), generator=gen)] += 3 * torch.exp(
                -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)
            )
    return f


CASES = [
    # (batch, channels, h, w, image_size, threshold, mode, signed)
    (16, 32, 7, 7, 224, 0.7, "max_abs", False),
    (16, 16, 7, 7, 224, 0.5, "l1", False),
    (12, 8, 5, 9, (96, 160), 0.7, "max_abs", True),
    (12, 8, 8, 6, (70, 41), 0.3, "l1", True),
    (20, 4, 3, 3, 50, 0.7, "max_abs", False),
    (20, 4, 4, 4, 33, 0.9, "max_abs", True),
    (10, 64, 14, 14, 112, 0.6, "max_abs", False),
    (8, 3, 2, 2, 17, 0.2, "l1", False),
    (6, 5, 1, 6, (9, 31), 0.5, "max_abs", True),
    (1, 8, 7, 7, 224, 0.7, "max_abs", False),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_boxes_match_reference(case):
    batch, channels, h, w, size, thr, mode, signed = CASES[case]
    gen = torch.Generator().manual_seed(case)
    f = blob_features(gen, batch, channels, h, w, signed)
    ours = attention_boxes(f, size, thr, mode)
    assert ours.dtype == torch.int64 and ours.shape == (batch, 4)
    np.testing.assert_array_equal(ours.numpy(), reference_boxes(f.numpy(), size, thr, mode))


def test_many_small_random_maps_match_reference():
    gen = torch.Generator().manual_seed(123)
    for trial in range(30):
        h, w = (int(v) for v in torch.randint(1, 9, (2,), generator=gen))
        size = (int(torch.randint(1, 60, (), generator=gen)), int(torch.randint(1, 60, (), generator=gen)))
        thr = float(torch.rand((), generator=gen))
        f = torch.randn(6, 3, h, w, generator=gen)
        for mode in ("max_abs", "l1"):
            ours = attention_boxes(f, size, thr, mode).numpy()
            np.testing.assert_array_equal(ours, reference_boxes(f.numpy(), size, thr, mode), err_msg=f"trial {trial}")


def test_constant_maps_give_whole_image():
    f = torch.zeros(3, 4, 7, 7)
    f[1] = 2.5
    f[2] = -1.0
    boxes = attention_boxes(f, (100, 80))
    assert boxes.tolist() == [[0, 0, 99, 79]] * 3
    np.testing.assert_array_equal(boxes.numpy(), reference_boxes(f.numpy(), (100, 80)))


def test_single_hot_pixel_at_low_resolution():
    f = torch.zeros(4, 2, 7, 7)
    f[0, 0, 0, 0] = 1  # corner
    f[1, 1, 3, 3] = 5  # centre
    f[2, 0, 6, 2] = 1  # bottom border
    f[3, 0, 2, 6] = -3  # negative value counts through |f|
    for thr in (0.0, 0.5, 0.7, 0.95):
        ours = attention_boxes(f, 224, thr)
        np.testing.assert_array_equal(ours.numpy(), reference_boxes(f.numpy(), 224, thr))
    corner = attention_boxes(f[:1], 224, 0.7)[0].tolist()
    assert corner[0] == 0 and corner[1] == 0  # region touching the top-left border


def test_threshold_above_max_gives_whole_image():
    f = torch.rand(2, 3, 7, 7)
    assert attention_boxes(f, 64, threshold=1.0).tolist() == [[0, 0, 63, 63]] * 2


def test_heatmap_modes():
    f = torch.tensor([[[[1.0, -3.0]], [[-2.0, 2.0]]]])  # (1, 2, 1, 2)
    assert attention_heatmap(f, "max_abs").tolist() == [[[2.0, 3.0]]]
    assert attention_heatmap(f, "l1").tolist() == [[[3.0, 5.0]]]
    assert attention_heatmap(f).dtype == torch.float32
    with pytest.raises(ValueError, match="max_abs"):
        attention_heatmap(f, "mean")


def test_attention_mask_shape_and_constant():
    f = torch.rand(3, 4, 7, 7)
    f[2] = 1.0
    m = attention_mask(f, (30, 20))
    assert m.shape == (3, 30, 20) and m.dtype == torch.bool
    assert not m[2].any()


# ---- largest_component_boxes on masks built directly ------------------------------------


def as_mask(rows):
    return torch.tensor([[c == "#" for c in r] for r in rows])


def test_diagonal_connectivity_is_8_connected():
    m = as_mask(["#....", ".#...", "..#..", ".....", "....#"])
    assert largest_component_boxes(m[None]).tolist() == [[0, 0, 2, 2]]
    anti = as_mask(["..#", ".#.", "#.."])
    assert largest_component_boxes(anti[None]).tolist() == [[0, 0, 2, 2]]


def test_tie_goes_to_first_in_raster_order():
    # Two regions of 3 pixels; the one whose first pixel comes first in raster order wins.
    m = as_mask(["....#", "...##", "#....", "##..."])
    assert largest_component_boxes(m[None]).tolist() == [[0, 3, 1, 4]]
    # A U-shape starting at (0, 0) beats a same-size bar starting later at (0, 2).
    u = as_mask(["#.#.#", "#.#.#", "#...#", "#####"])
    np.testing.assert_array_equal(largest_component_boxes(u[None]).numpy(), ref_mask_boxes(u[None]))


def test_spiral_and_u_shapes_need_several_merges():
    m = as_mask([
        "#########",
        "#.......#",
        "#.#####.#",
        "#.#...#.#",
        "#.#.#.#.#",
        "#.#.#...#",
        "#.#.#####",
        "#.#......",
        "###.#####",
    ])
    np.testing.assert_array_equal(largest_component_boxes(m[None]).numpy(), ref_mask_boxes(m[None]))
    comb = torch.zeros(1, 10, 40, dtype=torch.bool)
    comb[0, :, ::2] = True
    comb[0, 9, :] = True
    assert largest_component_boxes(comb).tolist() == [[0, 0, 9, 39]]


def test_empty_and_full_masks():
    m = torch.zeros(3, 5, 7, dtype=torch.bool)
    m[1] = True
    m[2, 4, 6] = True  # bottom-right pixel
    assert largest_component_boxes(m).tolist() == [[0, 0, 4, 6], [0, 0, 4, 6], [4, 6, 4, 6]]


def test_runs_do_not_leak_across_rows_or_images():
    # Row ends at the right border and the next row starts at the left border: not connected.
    m = as_mask(["....##", "#.....", "#.....", "#....."])
    assert largest_component_boxes(m[None]).tolist() == [[1, 0, 3, 0]]
    # Last row of image 0 and first row of image 1 overlap in columns: separate images.
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, 3, :] = True
    a[1, 0, :2] = True
    a[1, 2:, 3] = True
    a[1, 3, 2] = True
    assert largest_component_boxes(a).tolist() == [[3, 0, 3, 3], [2, 2, 3, 3]]


@pytest.mark.parametrize("density", [0.05, 0.3, 0.45, 0.6, 0.9])
def test_random_masks_match_skimage(density):
    gen = torch.Generator().manual_seed(int(density * 100))
    for shape in [(40, 1, 1), (30, 1, 17), (30, 13, 1), (25, 23, 31), (8, 64, 48)]:
        m = torch.rand(shape, generator=gen) < density
        np.testing.assert_array_equal(largest_component_boxes(m).numpy(), ref_mask_boxes(m))


def test_random_masks_many_equal_size_ties():
    gen = torch.Generator().manual_seed(7)
    # Sparse masks: mostly single pixels and dominoes, so equal-size ties are common.
    m = torch.rand(200, 9, 11, generator=gen) < 0.12
    np.testing.assert_array_equal(largest_component_boxes(m).numpy(), ref_mask_boxes(m))


def test_mask_must_be_3d():
    with pytest.raises(ValueError):
        largest_component_boxes(torch.zeros(4, 4, dtype=torch.bool))


# ---- crop_boxes ------------------------------------------------------------------------


def per_image_crops(images, boxes, size):
    return torch.stack([
        F.interpolate(img[:, y0 : y1 + 1, x0 : x1 + 1][None], size=size, mode="bilinear", align_corners=False)[0]
        for img, (y0, x0, y1, x1) in zip(images, boxes.tolist())
    ])


def random_boxes(gen, batch, h, w):
    y = torch.sort(torch.randint(0, h, (batch, 2), generator=gen), dim=1).values
    x = torch.sort(torch.randint(0, w, (batch, 2), generator=gen), dim=1).values
    return torch.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], 1)


@pytest.mark.parametrize("size", [1, 7, 32, (24, 40)])
def test_crops_match_per_image_interpolate(size):
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(9, 3, 50, 37, generator=gen) * 4 - 2
    boxes = random_boxes(gen, 9, 50, 37)
    boxes[0] = torch.tensor([0, 0, 49, 36])  # whole image
    boxes[1] = torch.tensor([10, 5, 10, 5])  # single pixel
    boxes[2] = torch.tensor([49, 0, 49, 36])  # one row at the bottom border
    boxes[3] = torch.tensor([0, 36, 49, 36])  # one column at the right border
    sz = size if isinstance(size, tuple) else (size, size)
    ours = crop_boxes(images, boxes, size)
    assert ours.shape == (9, 3, *sz) and ours.dtype == images.dtype
    torch.testing.assert_close(ours, per_image_crops(images, boxes, sz), rtol=0, atol=1e-5)


def test_crops_agree_with_reference_module_and_out_buffer():
    gen = torch.Generator().manual_seed(11)
    images = torch.rand(5, 1, 64, 64, generator=gen)
    boxes = random_boxes(gen, 5, 64, 64)
    out = torch.full((5, 1, 48, 48), float("nan"))
    res = crop_boxes(images, boxes, 48, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, reference_crops(images, boxes.numpy(), 48), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        crop_boxes(images, boxes, 48, out=torch.empty(5, 1, 40, 40))


def test_crops_batch_of_one_and_downsampling():
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, 224, 224, generator=gen)
    boxes = torch.tensor([[3, 17, 200, 150]])
    torch.testing.assert_close(crop_boxes(images, boxes, 64), per_image_crops(images, boxes, (64, 64)), rtol=0, atol=1e-5)


def test_crops_are_differentiable():
    images = torch.rand(2, 3, 20, 20, requires_grad=True)
    boxes = torch.tensor([[0, 0, 19, 19], [5, 5, 9, 14]])
    crop_boxes(images, boxes, 8).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_boxes_then_crops_end_to_end_batch_of_one():
    f = torch.zeros(1, 4, 7, 7)
    f[0, 2, 2:4, 4:6] = 1.0
    images = torch.rand(1, 3, 112, 112)
    boxes = attention_boxes(f, 112)
    assert boxes.shape == (1, 4)
    np.testing.assert_array_equal(boxes.numpy(), reference_boxes(f.numpy(), 112))
    crops = crop_boxes(images, boxes, 56)
    assert crops.shape == (1, 3, 56, 56)


@pytest.mark.parametrize("mode", ["max_abs", "l1"])
def test_heatmap_equals_per_image_reference(mode):
    for shape in ((5, 2047, 3, 3), (3, 7, 2, 2), (40, 64, 7, 7), (2, 1, 4, 4), (3, 2048, 7, 7)):
        f = torch.randn(*shape)
        ours = attention_heatmap(f, mode)
        assert ours.dtype == torch.float32 and ours.shape == (shape[0], *shape[2:])
        np.testing.assert_array_equal(ours.numpy(), np.stack([reference_heatmap(x, mode) for x in f.numpy()]),
                                      err_msg=str(shape))


def test_benchmark_candidates_compute_what_the_kernels_compute():
    """bench_attention.py times each kernel against a library call; both sides must agree
    (the crops' roi_align only inside the box: it samples across the box's edges)."""
    from benchmarks.bench_attention import halving_tree_channel_max, roi_align_crops, scipy_component_boxes

    gen = torch.Generator().manual_seed(3)
    for shape in ((6, 2047, 3, 3), (4, 64, 7, 7), (2, 1, 4, 4)):
        f = torch.randn(*shape, generator=gen)
        assert torch.equal(halving_tree_channel_max(f), attention_heatmap(f)), shape
    for density in (0.0, 0.1, 0.45, 0.7):
        m = torch.rand(12, 40, 33, generator=gen) < density
        np.testing.assert_array_equal(scipy_component_boxes(m.numpy()), largest_component_boxes(m).numpy())
    images = torch.rand(6, 3, 64, 64, generator=gen)
    boxes = torch.tensor([[0, 0, 63, 63], [10, 12, 40, 50], [5, 5, 36, 36], [0, 20, 31, 51], [30, 0, 61, 31],
                          [16, 16, 47, 47]])
    ours, theirs = crop_boxes(images, boxes, 64), roi_align_crops(images, boxes, 64)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-5)  # whole image: no outside to read
    torch.testing.assert_close(ours[..., 4:-4, 4:-4], theirs[..., 4:-4, 4:-4], rtol=0, atol=1e-5)


@pytest.mark.parametrize("source,size", [((7, 7), (224, 224)), ((8, 8), (256, 256)), ((7, 5), (37, 61)),
                                         ((7, 7), (100, 100))])
def test_row_blocks_path_and_interpolate_path_agree_with_the_reference(source, size):
    """The hot-row path (exact for integer scale factors) and the every-pixel F.interpolate path
    (taken where the row path's rounding is not F.interpolate's) both give the reference's boxes."""
    from models.attention import _mask_transitions, _mask_transitions_interpolate, _normalized_heatmap, _rows_exact

    torch.manual_seed(1)
    f = torch.relu(torch.randn(48, 16, *source))
    norm = _normalized_heatmap(f, "max_abs")
    assert torch.equal(_mask_transitions(norm, size, 0.7), _mask_transitions_interpolate(norm, size, 0.7))
    np.testing.assert_array_equal(attention_boxes(f, size, 0.7).numpy(), reference_boxes(f.numpy(), size, 0.7))
    if source == (7, 7) and size == (224, 224):
        assert _rows_exact(f.device, source, size)  # the benchmark's shape takes the fast path
