"""The prepared GPU check: what one lent H100/H200 does with the project's own code, in one JSON.

    bash benchmarks/gpu/run.sh                                   # on the GPU machine (installs the wheels)
    .venv/bin/python benchmarks/gpu/gpu_check.py --device cpu --tiny --out /tmp/g   # CPU dry run, seconds

Imports torch, torchvision, numpy and the project's own code (models/, tasks.images,
tasks.training.crop_cache, tasks.scoring's pieces) and nothing that needs Prefect, Great
Expectations, DVC, pydicom or Dask: the GPU machine has Python 3.12, torch 2.11 and no network;
pydantic (for cxr.core.config) and isal (the thumbnail PNGs) travel as the wheels in wheels.txt.
The profile is profiles/paper.yaml (its backbone, 224 px input from 256 px, its batch sizes);
weights are random (no weights file on that machine; a step's time does not depend on them).

Measured, each with torch.cuda.synchronize() around the timed part and warm-up steps first:
  stage_i       forward+backward+SGD step of one branch on in-memory input tensors, under bf16
                autocast with channels-last (the issue's setting) and under fp16 autocast +
                GradScaler (what tasks/training/stages.py does on CUDA today); images/s
  loader        the image cache -> GPU path alone: memory-mapped uint8 shards written with the
                real cache_store, read by CacheReader in DataLoader workers (whole batches,
                random 224 windows of the 256-px images, flips), pinned, then to_input on the
                device with augmentation; images/s, and over stage I's images/s (target >= 1.5)
  crop_cache    the crop-cache build: shards read, centre crop, compute_crops (both views
                through the frozen global branch, attention crops), chunk written; images/s
  attention     models.attention_boxes on a batch vs one call per image, on the device
  scoring       studies/s end to end (PNG decode with the one loader, precheck, network pixels,
                display picture, batch_outputs = AG-CNN forward + CAMs + crops, overlay and
                thumbnail PNGs; threads as the run uses them) over forward-only (batch_outputs
                on in-memory pixels); no Parquet, GE gates or report (those need Great Expectations)
  archive       the three stages' epoch times on the full archive (78,484 train images), the
                crop-cache build and scoring the test split, extrapolated from the rates above
Writes <out>/gpu.json (out: --out, else $OUT, else the current folder).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ARCHIVE_IMAGES = 112_120
# Refused here: the GPU machine has none of them, so importing one would fail there.
FORBIDDEN = ("prefect", "great_expectations", "dvc", "pydicom", "highdicom", "dicomweb_client", "dask", "distributed")


class Timer:
    """Wall seconds of a block, with the device drained before and after."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


def setting(args) -> dict:
    """Sizes: the paper profile on a GPU, a tiny one for the dry run."""
    from cxr.core.config import load_params

    params = load_params(ROOT / "profiles" / "paper.yaml")
    if args.tiny:
        model = params.model.model_copy(update={"backbone": "resnet18", "image_size": 32, "resize": 40, "local_size": 32})
        return {"params": params, "model": model, "global_batch": 4, "local_batch": 4, "fusion_batch": 4, "score_batch": 4,
                "cache_batch": 8, "steps": 1, "warmup": 1, "images": 32, "shard": 16, "loader_batches": 6, "workers": 1,
                "studies": 8, "study_side": 64, "attention_batch": 4}
    t = params.train
    return {"params": params, "model": params.model, "global_batch": t.global_.batch_size,
            "local_batch": t.local.batch_size, "fusion_batch": t.fusion.batch_size, "score_batch": params.score.batch_size,
            "cache_batch": params.cache.batch_size, "steps": 30, "warmup": 8, "images": 8192,
            "shard": params.cache.shard_images, "loader_batches": 60, "workers": min(t.workers, os.cpu_count() or 1),
            "studies": 768, "study_side": 1024, "attention_batch": 128}


# --------------------------------------------------------------------------- stage I


def train_rate(device, model_params, batch: int, steps: int, warmup: int, precision: str, size: int | None = None) -> dict:
    """images/s of forward+backward+step of one branch on in-memory normalised input."""
    from models.branch import build_branch
    from models.loss import WeightedBCE

    size = size or model_params.image_size
    torch.manual_seed(0)
    branch = build_branch(model_params.backbone, "none").to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        branch = branch.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(branch.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    criterion = WeightedBCE(torch.full((14,), 3.0), torch.ones(14)).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 14, device=device) < 0.1).float()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(branch(x).logits.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    branch.train()
    for _ in range(warmup):
        step()
    with Timer(device) as t:
        for _ in range(steps):
            loss = step()
    ok = bool(torch.isfinite(loss.detach()).item())
    return {"precision": precision, "channels_last": channels_last, "batch": batch, "size": size, "steps": steps,
            "seconds": round(t.seconds, 4), "images_per_s": round(batch * steps / t.seconds, 1), "finite_loss": ok}


def forward_rate(device, model_params, batch: int, steps: int, warmup: int, precision: str) -> dict:
    """images/s of one branch's forward (inference), for stage III's frozen local branch."""
    from models.branch import build_branch

    branch = build_branch(model_params.backbone, "none").to(device).eval()
    x = torch.randn(batch, 3, model_params.local_size, model_params.local_size, device=device)
    if device.type == "cuda":
        branch, x = branch.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
        for _ in range(warmup):
            branch(x)
        with Timer(device) as t:
            for _ in range(steps):
                branch(x)
    return {"precision": precision, "batch": batch, "images_per_s": round(batch * steps / t.seconds, 1)}


# --------------------------------------------------------------------------- image cache


def write_image_cache(root: Path, n: int, side: int, shard: int) -> float:
    """A published image cache of n random uint8 images (the real store's format); seconds."""
    from tasks.images import cache_store
    from tasks.images.cache_store import ArraySpec

    rng = np.random.default_rng(0)
    key = "gpucheck" + "0" * 56
    start = time.perf_counter()
    chunks = 0
    for i, lo in enumerate(range(0, n, shard)):
        ids = [f"img_{j:06d}.png" for j in range(lo, min(n, lo + shard))]
        pixels = rng.integers(0, 256, (len(ids), side, side), dtype=np.uint8)
        cache_store.write_chunk(root, key, i, {"item_id": ids}, {"pixels": pixels}, [None] * len(ids))
        chunks += 1
    cache_store.publish(root, key, chunks, {"kind": "images", "image_size": side}, {"pixels": ArraySpec("uint8", (side, side))})
    return time.perf_counter() - start


class CachedBatches(torch.utils.data.Dataset):
    """Whole training batches from the memory-mapped image cache: (pixels (B, S, S) uint8, draws (B, 4)).

    Each batch: its rows (sorted, as a shard read wants), a random image_size window per
    image of the load_size pixels, a horizontal flip for half of them, augmentation draws.
    """

    def __init__(self, root: Path, batches: list[np.ndarray], size: int, augment, seed: int = 0):
        from tasks.images.cache_store import CacheReader

        self.reader, self.batches, self.size, self.augment, self.seed = CacheReader(root), batches, size, augment, seed

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        from tasks.images.geometry import augment_draws

        rows = np.sort(self.batches[i])
        pixels = torch.from_numpy(self.reader.get("pixels", rows))
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        side = pixels.shape[-1]
        offsets = torch.randint(0, side - self.size + 1, (len(rows), 2), generator=g)
        span = torch.arange(self.size)
        r = (offsets[:, 0, None] + span)[:, :, None]
        c = (offsets[:, 1, None] + span)[:, None, :]
        out = pixels[torch.arange(len(rows))[:, None, None], r, c]
        flips = torch.rand(len(rows), generator=g) < 0.5
        out = torch.where(flips.view(-1, 1, 1), out.flip(-1), out)
        return out, augment_draws(len(rows), self.augment, g)


def loader_rate(device, root: Path, n: int, model_params, batch: int, batches: int, workers: int) -> dict:
    """images/s of image cache -> DataLoader workers -> pinned -> device -> to_input with augmentation."""
    from cxr.core.config import AugmentParams
    from tasks.images.geometry import to_input

    augment = AugmentParams(rotation=7.0, scale=0.1, brightness=0.1, contrast=0.1)
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    per_epoch = n // batch
    plan = [order[(k % per_epoch) * batch : (k % per_epoch + 1) * batch] for k in range(batches)]
    data = CachedBatches(root, plan, model_params.image_size, augment)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False,
                                         prefetch_factor=4 if workers else None)
    it = iter(loader)
    warm = min(3, batches - 1)
    for _ in range(warm):  # workers started, first maps faulted in
        pixels, draws = next(it)
        to_input(pixels, device, draws)
    count, checksum = 0, torch.zeros((), device=device)
    with Timer(device) as t:
        for pixels, draws in it:
            x = to_input(pixels, device, draws)
            checksum += x[:, 0, 0, 0].sum()
            count += len(pixels)
    return {"workers": workers, "batch": batch, "images": count, "seconds": round(t.seconds, 4),
            "images_per_s": round(count / t.seconds, 1), "augment": augment.model_dump(),
            "input_memory_format": "channels_last" if x.is_contiguous(memory_format=torch.channels_last) and device.type == "cuda" else "contiguous",
            "finite": bool(torch.isfinite(checksum).item())}


def crop_cache_rate(device, root: Path, out_root: Path, n: int, model_params, batch: int, precision: str) -> dict:
    """images/s of the crop-cache build's per-chunk work on one chunk's worth of images."""
    from models.branch import build_branch
    from tasks.images import cache_store
    from tasks.images.cache_store import CacheReader
    from tasks.images.geometry import center_crop
    from tasks.training.crop_cache import compute_crops

    branch = build_branch(model_params.backbone, "none").to(device).eval()
    if device.type == "cuda":
        branch = branch.to(memory_format=torch.channels_last)
    reader = CacheReader(root)
    m = model_params
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def chunk(rows, i):
        pixels = torch.from_numpy(np.ascontiguousarray(center_crop(reader.get("pixels", rows), m.image_size)))
        parts = []
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            for s in range(0, len(pixels), batch):
                parts.append(compute_crops(branch, pixels[s : s + batch], m.local_size, m.attention.threshold,
                                           m.attention.mode, device))
        arrays = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}
        ids = [f"img_{j:06d}.png" for j in rows]
        cache_store.write_chunk(out_root, "crops" + precision + "0" * 56, i, {"item_id": ids}, arrays, [None] * len(ids))
        return arrays

    chunk(np.arange(min(n, batch)), 999)  # warm-up: cudnn algorithm choice, first allocations
    with Timer(device) as t:
        arrays = chunk(np.arange(n), 0)
    boxes = arrays["boxes"].reshape(-1, 4)
    return {"precision": precision, "batch": batch, "images": n, "views_per_image": 2, "seconds": round(t.seconds, 4),
            "images_per_s": round(n / t.seconds, 1),
            "boxes_inside_input": bool((boxes[:, [0, 1]] >= 0).all() and (boxes[:, [2, 3]] < m.image_size).all())}


# --------------------------------------------------------------------------- attention


def attention_rate(device, model_params, batch: int, repeats: int) -> dict:
    """Batched models.attention_boxes over one call per image, on the global branch's real features."""
    from models import attention_boxes
    from models.branch import build_branch

    m = model_params
    branch = build_branch(m.backbone, "none").to(device).eval()
    x = torch.randn(batch, 3, m.image_size, m.image_size, device=device)
    with torch.inference_mode():
        features = branch(x).features.float()
        size, thr, mode = m.image_size, m.attention.threshold, m.attention.mode
        batched = attention_boxes(features, size, thr, mode)  # warm-up (and the per-shape exactness probe)
        single = torch.cat([attention_boxes(features[i : i + 1], size, thr, mode) for i in range(batch)])
        with Timer(device) as tb:
            for _ in range(repeats):
                batched = attention_boxes(features, size, thr, mode)
        with Timer(device) as tl:
            for _ in range(repeats):
                single = torch.cat([attention_boxes(features[i : i + 1], size, thr, mode) for i in range(batch)])
    return {"batch": batch, "feature_shape": list(features.shape[1:]), "repeats": repeats,
            "batched_ms_per_batch": round(tb.seconds / repeats * 1000, 3),
            "per_image_loop_ms_per_batch": round(tl.seconds / repeats * 1000, 3),
            "speedup": round(tl.seconds / tb.seconds, 2), "same_boxes": bool(torch.equal(batched, single))}


# --------------------------------------------------------------------------- scoring


def make_studies(folder: Path, n: int, side: int, threads: int) -> float:
    """n distinct synthetic chest renderings as grey PNGs of side x side (NIH's files are 1024 px); seconds."""
    from PIL import Image

    from tasks.metadata.synth import FINDING_STYLE, anatomy, render_image

    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(FINDING_STYLE)
    base = min(side, 256)

    def one(i):
        rng = np.random.default_rng(i)
        findings = list(rng.choice(names, size=int(rng.integers(0, 3)), replace=False))
        img = Image.fromarray(render_image(base, anatomy(base, rng), findings, rng)[0])
        if side != base:
            img = img.resize((side, side), Image.BICUBIC)
        img.save(folder / f"study_{i:05d}.png")

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - start


def scoring_rate(device, folder: Path, out: Path, model_params, score_params, batch: int, threads: int, precision: str) -> dict:
    """studies/s end to end over forward-only (both through tasks.scoring.scorer.batch_outputs)."""
    from models.agcnn import AGCNN
    from models.branch import build_branch
    from models.fusion import FusionHead
    from tasks.images.geometry import network_pixels_from_image
    from tasks.images.loader import LoaderLimits, load_image
    from tasks.scoring.overlay import display_shape, overlay_jpeg, resize_gray, save_png, thumbnail
    from tasks.scoring.precheck import precheck
    from tasks.scoring.scorer import batch_outputs

    m = model_params
    torch.manual_seed(0)
    g, l = build_branch(m.backbone, "none"), build_branch(m.backbone, "none")
    model = AGCNN(g, l, FusionHead(g.feature_dim, l.feature_dim), local_size=m.local_size,
                  threshold=m.attention.threshold, mode=m.attention.mode).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    limits = LoaderLimits(max_pixels=score_params.max_pixels, min_side=score_params.min_side)
    files = sorted(folder.glob("*.png"))
    out.mkdir(parents=True, exist_ok=True)

    dtypes = {}

    def outputs(pixels):
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            outs = batch_outputs(model, pixels, device)
        # Under autocast the CAMs come back bf16 (einsum runs in the autocast dtype), which
        # numpy cannot hold: the pictures need float32.
        dtypes.update({k: str(v.dtype).replace("torch.", "") for k, v in outs.items()})
        return {k: v.float() if v.is_floating_point() else v for k, v in outs.items()}

    def prepare(path):
        facts = {}
        image = load_image(path, limits, facts=facts)
        reason = precheck(image, facts) if score_params.ood != "off" else None
        display = resize_gray(image, display_shape(*image.shape, score_params.overlay_size))
        return network_pixels_from_image(image, m), display, reason

    def write(name, display, outs, i):
        box = tuple(int(v) for v in outs["boxes"][i])
        top = torch.argsort(-outs["fusion"][i])[:3].tolist()
        cams = outs["cams"][i][top].numpy()
        (out / f"{name}.overlay.jpg").write_bytes(overlay_jpeg(display, box, cams, [name] + [str(k) for k in top]))
        save_png(thumbnail(display, box), out / f"{name}.thumb.png")

    # forward-only: the same function on the studies' network inputs already in memory
    with cf.ThreadPoolExecutor(threads) as pool:
        pixels_all = torch.from_numpy(np.stack([p for p, _, _ in pool.map(prepare, files[: min(len(files), 4 * batch)])]))
    outputs(pixels_all[:batch])  # warm-up: cudnn algorithm choice, first allocations
    with Timer(device) as tf:
        reps = 0
        while reps < max(4, 2 * len(files) // len(pixels_all)) or tf_elapsed(tf) < 0.5:
            for s in range(0, len(pixels_all), batch):
                outputs(pixels_all[s : s + batch])
            reps += 1
    forward = reps * len(pixels_all) / tf.seconds

    refused = 0
    with cf.ThreadPoolExecutor(threads) as pool, Timer(device) as te:
        prepared = pool.map(prepare, files)  # lazily in order, decoding ahead of the forward
        writes = []
        for s in range(0, len(files), batch):
            chunk = [next(prepared) for _ in range(min(batch, len(files) - s))]
            refused += sum(r is not None for _, _, r in chunk)
            outs = outputs(torch.from_numpy(np.stack([p for p, _, _ in chunk])))
            writes += [pool.submit(write, files[s + i].stem, d, outs, i) for i, (_, d, _) in enumerate(chunk)]
        for w in writes:
            w.result()
    end_to_end = len(files) / te.seconds
    return {"precision": precision, "batch": batch, "threads": threads, "studies": len(files),
            "study_side": int(load_image(files[0]).shape[0]), "precheck_refused": refused,
            "forward_only_studies_per_s": round(forward, 1), "end_to_end_studies_per_s": round(end_to_end, 1),
            "ratio": round(end_to_end / forward, 3), "pictures_written": len([p for p in out.iterdir() if p.suffix in (".png", ".jpg")]),
            "batch_outputs_dtypes": dtypes}


def tf_elapsed(timer: Timer) -> float:
    return time.perf_counter() - timer.start


# --------------------------------------------------------------------------- main


def extrapolate(result: dict, s: dict, prec: str) -> dict:
    """Full-archive wall times from the measured rates (seconds; training per epoch and for the profile's epochs)."""
    p = s["params"]
    train = round(ARCHIVE_IMAGES * p.split.train)
    test = round(ARCHIVE_IMAGES * p.split.test)
    stage1 = result["stage_i"][prec]["images_per_s"]
    feed = min(stage1, result["loader"]["images_per_s"])
    local = result["stage_ii"]["images_per_s"]
    fusion = result["stage_iii_local_forward"]["images_per_s"]
    crops = max(v["images_per_s"] for v in result["crop_cache"].values())
    epochs = {"global": p.train.global_.epochs, "local": p.train.local.epochs, "fusion": p.train.fusion.epochs}
    out = {"train_images": train, "test_images": test,
           "stage_i_epoch_s": round(train / feed, 1),
           "stage_ii_epoch_s": round(train / local, 1),
           "stage_iii_epoch_s": round(train / fusion, 1),
           "crop_cache_build_s": round(ARCHIVE_IMAGES / crops, 1),
           "score_test_split_s": round(test / result["scoring"]["end_to_end_studies_per_s"], 1),
           "epochs": epochs,
           "note": "stage I at min(train step, loader) images/s; stage II from the crop cache at the local branch's "
                   "train step; stage III at the frozen local branch's forward (the fusion head is negligible); "
                   "validation passes and the image-cache build (PNG decode, CPU) not included"}
    out["three_stages_total_h"] = round(sum(out[f"stage_{k}_epoch_s"] * epochs[st] for k, st in
                                            (("i", "global"), ("ii", "local"), ("iii", "fusion"))) / 3600, 2)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small backbone and sizes: a CPU dry run in seconds")
    ap.add_argument("--out", default=None, help="folder for gpu.json (default $OUT, else .)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: --device cuda but torch sees no CUDA device; use --device cpu --tiny for the dry run")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: thread-pool barriers cost more than they save on a busy CPU
    s = setting(args)
    m = s["model"]
    threads = os.cpu_count() or 1
    result: dict = {
        "what": "benchmarks/gpu/gpu_check.py: the project's code on one device, profiles/paper.yaml sizes" +
                (" (TINY dry run: resnet18, 32 px; numbers mean nothing)" if args.tiny else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": threads,
        "backbone": m.backbone, "image_size": m.image_size, "load_size": m.load_size, "local_size": m.local_size,
        "weights": "random (a step's time does not depend on them)"}
    timings, errors = {}, {}
    out = Path(args.out or os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)

    def save():
        result.update(section_seconds=timings, errors=errors, total_seconds=round(time.perf_counter() - t0, 1))
        tmp_path = out / ".gpu.json.tmp"
        tmp_path.write_text(json.dumps(result, indent=2) + "\n")
        tmp_path.replace(out / "gpu.json")

    def section(name, fn):
        """One measurement; a failure is recorded and the rest still run (a lease is not repeated lightly)."""
        start = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON, and the exit status says so
            errors[name] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        timings[name] = round(time.perf_counter() - start, 2)
        print(f"gpu_check: {name} done in {timings[name]} s: {json.dumps(result.get(name, errors.get(name)))}", flush=True)
        save()

    # bf16 autocast + channels-last is the setting under test; fp16 + GradScaler is what
    # tasks/training/stages.py runs on CUDA today. A CPU dry run stays in fp32 (bf16 without
    # matrix units is slow and only the code path matters there).
    main_prec = "bf16" if device.type == "cuda" else "fp32"
    result["precision"] = main_prec
    section("stage_i", lambda: {prec: train_rate(device, m, s["global_batch"], s["steps"], s["warmup"], prec)
                                for prec in ((main_prec, "fp16") if device.type == "cuda" else (main_prec,))})
    # Stage II from the crop cache: the local branch's train step on local_size crops (augmented
    # on the device like stage I); stage III: the frozen local branch's forward dominates.
    section("stage_ii", lambda: train_rate(device, m, s["local_batch"], s["steps"], s["warmup"], main_prec, m.local_size))
    section("stage_iii_local_forward", lambda: forward_rate(device, m, s["fusion_batch"], s["steps"], s["warmup"], main_prec))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "images"
        section("image_cache_written", lambda: {"images": s["images"], "side": m.load_size, "shard_images": s["shard"],
                                                "seconds": round(write_image_cache(cache, s["images"], m.load_size, s["shard"]), 3)})
        section("loader", lambda: loader_rate(device, cache, s["images"], m, s["global_batch"], s["loader_batches"], s["workers"]))
        if "loader" in result and "stage_i" in result:
            result["loader"]["over_stage_i"] = round(result["loader"]["images_per_s"] / result["stage_i"][main_prec]["images_per_s"], 2)
            result["loader"]["target"] = 1.5
        n_crop = min(s["images"], s["shard"])
        section("crop_cache", lambda: {prec: crop_cache_rate(device, cache, tmp / f"crops-{prec}", n_crop, m, s["cache_batch"], prec)
                                       for prec in dict.fromkeys(("fp32", main_prec))})
        section("attention", lambda: attention_rate(device, m, s["attention_batch"], 1 if args.tiny else 10))
        studies = tmp / "studies"
        section("studies_written", lambda: {"studies": s["studies"], "side": s["study_side"],
                                            "seconds": round(make_studies(studies, s["studies"], s["study_side"], threads), 2)})
        section("scoring", lambda: scoring_rate(device, studies, tmp / "scored", m, s["params"].score, s["score_batch"],
                                                threads, "fp32"))
        if device.type == "cuda":
            section("scoring_bf16", lambda: scoring_rate(device, studies, tmp / "scored-bf16", m, s["params"].score,
                                                         s["score_batch"], threads, "bf16"))
    section("archive_extrapolated", lambda: extrapolate(result, s, main_prec))
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result["forbidden_imports"] = sorted({name.split(".")[0] for name in sys.modules} & set(FORBIDDEN))
    save()
    print(f"gpu_check: wrote {out / 'gpu.json'} in {result['total_seconds']} s"
          + (f"; {len(errors)} section(s) failed: {', '.join(errors)}" if errors else ""), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
