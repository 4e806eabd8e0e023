"""Attention-guided crops for AG-CNN (Guan et al. 2018), batched on the tensors' device.

From the global branch's last feature map: a heatmap per image (max over channels
of |f|), min-max normalised, upsampled to the image size, thresholded; the largest
8-connected region's bounding box is the crop that the local branch sees.

Connected components are found on horizontal runs of foreground pixels rather
than on pixels: runs of consecutive rows that 8-touch become graph edges, and
min-label propagation with pointer jumping merges them. Everything is whole-batch
tensor work (no Python loop over images, pixels or crops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HEATMAP_MODES = ("max_abs", "l1")


def _chunk(batch: int, bytes_per_item: int, budget: int = 1 << 22) -> int:
    """Items per chunk so a chunk's temporaries stay near `budget` bytes (allocator reuses them)."""
    return max(1, min(batch, budget // max(1, bytes_per_item)))


def attention_heatmap(features: torch.Tensor, mode: str = "max_abs") -> torch.Tensor:
    """Channel-reduced activation map.

    features: (B, C, h, w). mode "max_abs": max over C of |f| (the paper);
    "l1": sum over C of |f| (accumulated in float64, so the result does not depend
    on summation order). Returns (B, h, w) float32, in the units of features; not
    differentiable (it only places the crop).
    """
    features = features.detach()
    if mode == "max_abs":
        # One library reduction. A hand-written halving tree of elementwise maxima was ~4x faster
        # on an idle CPU but slower once other processes kept the cores busy (many small parallel
        # ops, each a thread-pool barrier); benchmarks/bench_attention.py keeps it as the candidate.
        return features.abs().amax(dim=1).float()
    if mode == "l1":
        batch, channels, h, w = features.shape
        step = _chunk(batch, channels * h * w * features.element_size())
        return torch.cat(
            [features[i : i + step].abs().sum(dim=1, dtype=torch.float64) for i in range(0, batch, step)]
        ).float()
    raise ValueError(f"unknown heatmap mode {mode!r}; choose one of {', '.join(HEATMAP_MODES)}")


def _size2(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _normalized_heatmap(features: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w) float32 min-max normalised to [0, 1]; NaN where constant."""
    heat = attention_heatmap(features, mode)
    lo = heat.amin(dim=(1, 2), keepdim=True)
    hi = heat.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    # A constant map has no region: NaN survives upsampling and fails every `>` test.
    return torch.where(span == 0, torch.full_like(heat, float("nan")), (heat - lo) / span)


def _mask_transitions_interpolate(norm: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """`_mask_transitions` through F.interpolate on every pixel (shapes where the row path is not exact)."""
    batch = norm.shape[0]
    height, width = size
    step = _chunk(batch, height * width * 4)  # a few images at a time: the float maps never exist whole
    found = []
    for i in range(0, batch, step):
        up = F.interpolate(norm[i : i + step, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        found.append(_mask_to_transitions(up > threshold) + i * height * (width + 1))
    return torch.cat(found)


def _unit_sampling(extent: int, out_size: int, device: torch.device):
    """`_axis_sampling` for one whole axis: (lo, hi, w_lo, w_hi), each (out_size,)."""
    zero = torch.zeros(1, dtype=torch.int64)
    lo, hi, w_lo, w_hi = (v[0] for v in _axis_sampling(zero, zero + extent - 1, out_size))
    return lo.to(device), hi.to(device), w_lo.to(device), w_hi.to(device)


def _row_blocks(extent: int, out_size: int) -> list[tuple[int, int, int, int]]:
    """Output rows grouped by their two source rows: [(y0, y1, lo, hi)], rows y0..y1-1 blend lo and hi."""
    lo, hi, _, _ = _unit_sampling(extent, out_size, torch.device("cpu"))
    pairs = list(zip(lo.tolist(), hi.tolist()))
    blocks, y0 = [], 0
    for y in range(1, out_size + 1):
        if y == out_size or pairs[y] != pairs[y0]:
            blocks.append((y0, y, *pairs[y0]))
            y0 = y
    return blocks


def _x_pass(norm: torch.Tensor, width: int) -> torch.Tensor:
    """(B, h, w) -> (B, h, W): each source row interpolated along x, as upsample_bilinear2d's inner sums."""
    xlo, xhi, wx0, wx1 = _unit_sampling(norm.shape[2], width, norm.device)
    # addcmul rounds once (a fused multiply-add), which is how the CPU kernel evaluates
    # w0 * a + w1 * b; `_rows_exact` checks that this holds on the device before use.
    return torch.addcmul(norm[:, :, xhi] * wx1, norm[:, :, xlo], wx0)


def _y_blend(top: torch.Tensor, bottom: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """(k, 1, W) source rows and (n, 1) weights -> (k, n, W) output rows."""
    return torch.addcmul(bottom * w1, top, w0)


_ROWS_EXACT: dict[tuple, bool] = {}


def _rows_exact(device: torch.device, source: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether `_x_pass` + `_y_blend` reproduce F.interpolate bit for bit for this device and shape.

    The kernel's rounding order is matched for the usual integer scale factors (7 -> 224,
    8 -> 256) but not for every ratio, so each (device type, source, size) is probed once.
    """
    key = (device.type, tuple(source), tuple(size))
    if key not in _ROWS_EXACT:
        probe = torch.rand(4, *source, generator=torch.Generator().manual_seed(0)).to(device)
        tx = _x_pass(probe, size[1])
        _, _, wy0, wy1 = _unit_sampling(source[0], size[0], device)
        rows = [_y_blend(tx[:, a, None], tx[:, b, None], wy0[y0:y1, None], wy1[y0:y1, None])
                for y0, y1, a, b in _row_blocks(source[0], size[0])]
        theirs = F.interpolate(probe[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        _ROWS_EXACT[key] = torch.equal(torch.cat(rows, dim=1), theirs)
    return _ROWS_EXACT[key]


def _mask_transitions(norm: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Flat indices of run starts/ends of the upsampled, thresholded maps.

    norm: (B, h, w) normalised heatmaps. Returns sorted int64 indices into a
    (B * H, W + 1) grid of column transitions (see `_runs_from_transitions`).

    Most of an upsampled heatmap is below the threshold, and an output row is a
    convex blend of two x-interpolated source rows, so it can only cross the
    threshold where one of those rows does. Rows are computed in blocks that share
    their source rows, and only for images whose source rows are hot; the values are
    F.interpolate's to the bit (checked per device and shape, else every pixel is upsampled).
    """
    batch, h, w = norm.shape
    height, width = size
    if not _rows_exact(norm.device, (h, w), size):
        return _mask_transitions_interpolate(norm, size, threshold)
    tx = _x_pass(norm, width)
    # A blend of values <= m is <= m up to two roundings; the margin keeps every row
    # that could exceed the threshold. NaN rows (constant maps) are never hot.
    hot = tx.amax(dim=2) > threshold - 1e-6 * abs(threshold)
    _, _, wy0, wy1 = _unit_sampling(h, height, norm.device)
    found = [torch.zeros(0, dtype=torch.int64, device=norm.device)]
    stride = (width + 1 + 7) // 8 * 8
    for y0, y1, a, b in _row_blocks(h, height):
        images = torch.nonzero(hot[:, a] | hot[:, b]).view(-1)
        step = _chunk(images.numel(), (y1 - y0) * (width + 2) * 5)
        for i in range(0, images.numel(), step):
            chosen = images[i : i + step]
            rows = _y_blend(tx[chosen, a, None], tx[chosen, b, None], wy0[y0:y1, None], wy1[y0:y1, None])
            padded = torch.zeros((chosen.numel(), y1 - y0, width + 2), dtype=torch.bool, device=norm.device)
            torch.gt(rows, threshold, out=padded[..., 1:-1])
            pos = _sparse_nonzero(padded[..., 1:], padded[..., :-1], stride)
            line = torch.div(pos, stride, rounding_mode="floor")
            img = torch.div(line, y1 - y0, rounding_mode="floor")
            found.append((chosen[img] * height + y0 + line - img * (y1 - y0)) * (width + 1) + pos - line * stride)
    return torch.sort(torch.cat(found)).values


def _sparse_nonzero(a: torch.Tensor, b: torch.Tensor, stride: int) -> torch.Tensor:
    """Flat positions where a != b, both (..., n) bool, in a (..., stride) layout (stride % 8 == 0).

    Transitions are sparse (a few per row), so the comparison is laid out with rows
    padded to whole 8-byte words: nonzero scans the words, then only the few
    nonzero words are split into bytes.
    """
    n = a.shape[-1]
    buffer = torch.zeros((*a.shape[:-1], stride), dtype=torch.bool, device=a.device)
    torch.ne(a, b, out=buffer[..., :n])
    words = buffer.view(torch.int64).view(-1)
    hit = torch.nonzero(words).view(-1)
    byte = torch.nonzero(words[hit].view(torch.uint8).view(-1, 8))
    return hit[byte[:, 0]] * 8 + byte[:, 1]


def attention_mask(
    features: torch.Tensor,
    image_size: int | tuple[int, int],
    threshold: float = 0.7,
    mode: str = "max_abs",
) -> torch.Tensor:
    """Foreground mask of the upsampled, min-max normalised heatmap.

    features: (B, C, h, w); image_size: H or (H, W) in pixels; threshold on the
    normalised heatmap in [0, 1] (strict `>`). Returns (B, H, W) bool; all False
    for an image whose heatmap is constant (no region).
    """
    size = _size2(image_size)
    norm = _normalized_heatmap(features, mode)
    up = F.interpolate(norm[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return up > threshold


def _mask_to_transitions(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, H, W) bool -> sorted flat transition indices in the (B * H, W + 1) grid."""
    b, h, w = mask.shape
    padded = torch.zeros((b * h, w + 2), dtype=torch.bool, device=mask.device)
    padded[:, 1:-1] = mask.reshape(b * h, w)
    return torch.nonzero((padded[:, 1:] != padded[:, :-1]).view(-1)).view(-1)


def _runs_from_transitions(flat: torch.Tensor, width: int):
    """Horizontal runs from transition indices.

    A transition at grid column k of a row (between padded columns k and k + 1)
    starts a run at image column k when it rises and ends one at column k - 1 when
    it falls; within a row they alternate, starting with a rise. Returns
    (rowid, start, end, flat_start, flat_end) int64, sorted by (image, row, start):
    rowid = b * H + row, start/end inclusive columns, flat_* = rowid * (W + 1) + start/end.
    """
    flat_start = flat[0::2].contiguous()
    flat_end = flat[1::2] - 1
    rowid = torch.div(flat_start, width + 1, rounding_mode="floor")
    start = flat_start - rowid * (width + 1)
    end = flat_end - rowid * (width + 1)
    return rowid, start, end, flat_start, flat_end


def _run_edges(rowid, start, end, flat_start, flat_end, height: int, width: int):
    """Pairs (i, j) of runs in consecutive rows of one image that 8-touch.

    Run i (row r) and j (row r + 1) touch iff s_j <= e_i + 1 and e_j >= s_i - 1;
    those j form one contiguous index range [lo, hi], found by searchsorted on the
    sorted flat keys. Returns (src, dst) int64 run indices.
    """
    next_row = (rowid + 1) * (width + 1)
    lo = torch.searchsorted(flat_end, next_row + start - 1, right=False)
    hi = torch.searchsorted(flat_start, next_row + end + 1, right=True) - 1
    # An image's last row has no next row (rowid + 1 is the next image's row 0).
    last_row = torch.remainder(rowid, height) == height - 1
    count = torch.where(last_row, torch.zeros_like(lo), (hi - lo + 1).clamp_min(0))
    src = torch.repeat_interleave(torch.arange(rowid.numel(), device=rowid.device), count)
    first_edge = torch.cumsum(count, 0) - count
    dst = lo[src] + torch.arange(src.numel(), device=rowid.device) - first_edge[src]
    return src, dst


def _component_roots(num_runs: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Root (smallest run index) of each run's connected component, (num_runs,) int64."""
    label = torch.arange(num_runs, device=src.device)
    if src.numel() == 0:
        return label
    while True:
        ls, ld = label[src], label[dst]
        if torch.equal(ls, ld):
            return label
        low = torch.minimum(ls, ld)
        # Hook each current root onto the smaller label it touches; labels only decrease.
        label.scatter_reduce_(0, torch.cat([ls, ld]), torch.cat([low, low]), reduce="amin")
        while True:  # pointer jumping until every run points at its root
            jumped = label[label]
            if torch.equal(jumped, label):
                break
            label = jumped


def _boxes_from_transitions(flat: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Largest 8-connected region's box per image from transition indices; see `largest_component_boxes`."""
    device = flat.device
    boxes = torch.tensor([0, 0, height - 1, width - 1], dtype=torch.int64, device=device).repeat(batch, 1)
    rowid, start, end, flat_start, flat_end = _runs_from_transitions(flat, width)
    n = rowid.numel()
    if n == 0:
        return boxes
    src, dst = _run_edges(rowid, start, end, flat_start, flat_end, height, width)
    root = _component_roots(n, src, dst)

    index = torch.arange(n, device=device)
    image = torch.div(rowid, height, rounding_mode="floor")
    row = rowid - image * height
    size = torch.zeros(n, dtype=torch.int64, device=device).scatter_add_(0, root, end - start + 1)
    is_root = root == index
    # Per image: largest size, then the smallest root (= first pixel in raster order).
    best_size = torch.zeros(batch, dtype=torch.int64, device=device)
    best_size.scatter_reduce_(0, image, torch.where(is_root, size, 0), reduce="amax")
    candidate = is_root & (size == best_size[image])
    best_root = torch.full((batch,), n, dtype=torch.int64, device=device)
    best_root.scatter_reduce_(0, image, torch.where(candidate, index, n), reduce="amin")

    member = root == best_root[image]
    img = image[member]
    found = torch.zeros(batch, dtype=torch.bool, device=device)
    found[img] = True
    for col, values, how in ((0, row, "amin"), (1, start, "amin"), (2, row, "amax"), (3, end, "amax")):
        reduced = boxes[:, col].clone()
        reduced.scatter_reduce_(0, img, values[member], reduce=how, include_self=False)
        boxes[:, col] = torch.where(found, reduced, boxes[:, col])
    return boxes


def largest_component_boxes(mask: torch.Tensor) -> torch.Tensor:
    """Bounding box of the largest 8-connected True region per image.

    mask: (B, H, W) bool. Returns (B, 4) int64 `y0, x0, y1, x1`, inclusive pixel
    coordinates; (0, 0, H-1, W-1) for an image with no True pixel. Among equally
    large regions the one whose first pixel in raster order comes first wins
    (as skimage.measure.label numbering + argmax of sizes does).
    """
    if mask.dim() != 3:
        raise ValueError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}")
    batch, height, width = mask.shape
    return _boxes_from_transitions(_mask_to_transitions(mask.bool()), batch, height, width)


def attention_boxes(
    features: torch.Tensor,
    image_size: int | tuple[int, int],
    threshold: float = 0.7,
    mode: str = "max_abs",
) -> torch.Tensor:
    """Attention crop box per image from the global branch's feature map.

    features: (B, C, h, w) float; image_size: H or (H, W) in pixels of the image
    the boxes refer to; threshold on the min-max normalised heatmap, strict `>`.
    Returns (B, 4) int64 `y0, x0, y1, x1` inclusive pixel coordinates of the
    largest 8-connected region; the whole image (0, 0, H-1, W-1) when there is
    no region (constant heatmap or nothing above threshold).
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, h, w), got shape {tuple(features.shape)}")
    size = _size2(image_size)
    with torch.no_grad():
        norm = _normalized_heatmap(features.detach(), mode)
        flat = _mask_transitions(norm, size, float(threshold))
        return _boxes_from_transitions(flat, features.shape[0], *size)


def _axis_sampling(first: torch.Tensor, last: torch.Tensor, out_size: int):
    """Per-box source indices and weights along one axis, as F.interpolate computes them.

    first, last: (B,) int64 inclusive box bounds; returns (lo, hi, w_lo, w_hi), each
    (B, out_size): absolute pixel indices (int64) and bilinear weights (float32).
    """
    extent = last - first + 1
    # float32 scale and source coordinate, clamped as upsample_bilinear2d does (align_corners=False).
    scale = extent.to(torch.float32) / out_size
    dst = torch.arange(out_size, device=first.device, dtype=torch.float32)
    # The kernel evaluates scale * (dst + 0.5) - 0.5 as one fused multiply-add; in float64 the
    # product and difference are exact for every unclamped coordinate, so one rounding remains.
    src = (scale.double()[:, None] * (dst.double() + 0.5) - 0.5).float().clamp_min(0)
    lo = torch.minimum(src.floor().to(torch.int64), (extent - 1)[:, None])
    w_hi = (src - lo).clamp(0, 1)
    w_lo = 1 - w_hi
    hi = torch.where(lo < (extent - 1)[:, None], lo + 1, lo)
    return lo + first[:, None], hi + first[:, None], w_lo, w_hi


def crop_boxes(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int | tuple[int, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bilinear crop-and-resize of one box per image.

    images: (B, C, H, W) float; boxes: (B, 4) int `y0, x0, y1, x1` inclusive pixel
    coordinates; size: output S or (S_h, S_w) pixels. Returns (B, C, S_h, S_w), equal
    (to float rounding, ~1e-6 relative) to per-image
    `F.interpolate(img[:, y0:y1+1, x0:x1+1][None], size, mode="bilinear", align_corners=False)`.
    out: optional preallocated (B, C, S_h, S_w) result tensor (reused buffers avoid
    page-faulting a fresh result every batch); not allowed when images require grad.
    Differentiable with respect to images when out is None.
    """
    out_h, out_w = _size2(size)
    batch, channels, height, width = images.shape
    if boxes.shape != (batch, 4):
        raise ValueError(f"boxes must be ({batch}, 4), got {tuple(boxes.shape)}")
    boxes = boxes.to(device=images.device, dtype=torch.int64)
    images = images.contiguous()
    y_lo, y_hi, wy_lo, wy_hi = _axis_sampling(boxes[:, 0], boxes[:, 2], out_h)
    x_lo, x_hi, wx_lo, wx_hi = _axis_sampling(boxes[:, 1], boxes[:, 3], out_w)
    wy_lo, wy_hi, wx_lo, wx_hi = (w.to(images.dtype) for w in (wy_lo, wy_hi, wx_lo, wx_hi))
    plane = torch.arange(batch * channels, device=images.device).view(batch, channels, 1) * height
    rows_lo = (plane + y_lo[:, None, :]).reshape(batch, channels * out_h)
    rows_hi = (plane + y_hi[:, None, :]).reshape(batch, channels * out_h)
    flat = images.view(batch * channels * height, width)

    grad = torch.is_grad_enabled() and images.requires_grad
    if out is None and not grad:
        out = torch.empty((batch, channels, out_h, out_w), device=images.device, dtype=images.dtype)
    if out is not None and tuple(out.shape) != (batch, channels, out_h, out_w):
        raise ValueError(f"out must be {(batch, channels, out_h, out_w)}, got {tuple(out.shape)}")
    # Chunks of images keep the intermediates a few MB, so the allocator reuses them.
    step = max(1, (1 << 22) // max(1, channels * out_h * width * images.element_size()))
    pieces = []
    for i in range(0, batch, step):
        j = min(batch, i + step)
        k = j - i
        # Separable bilinear: blend the two source rows, then the two source columns.
        top = flat.index_select(0, rows_lo[i:j].reshape(-1)).view(k, channels, out_h, width)
        bottom = flat.index_select(0, rows_hi[i:j].reshape(-1)).view(k, channels, out_h, width)
        rows = (top * wy_lo[i:j, None, :, None]).addcmul_(bottom, wy_hi[i:j, None, :, None])
        rows = rows.view(k, channels * out_h, width)
        left = rows.gather(2, x_lo[i:j, None, :].expand(k, channels * out_h, out_w))
        right = rows.gather(2, x_hi[i:j, None, :].expand(k, channels * out_h, out_w))
        if out is None:
            pieces.append((left * wx_lo[i:j, None, :]).addcmul_(right, wx_hi[i:j, None, :]))
        else:
            target = out[i:j].view(k, channels * out_h, out_w)
            torch.mul(left, wx_lo[i:j, None, :], out=target)
            target.addcmul_(right, wx_hi[i:j, None, :])
    if out is None:
        return torch.cat(pieces).view(batch, channels, out_h, out_w)
    return out
