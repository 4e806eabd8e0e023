"""Three-stage AG-CNN training: global branch, local branch on attention crops, fusion head.

Each stage freezes what came before, trains with the class-weighted BCE, SGD with momentum
(a pretrained body at a lower rate than the new head) and a step learning-rate schedule, and
keeps the epoch with the best mean validation AUROC, stopping early after `patience` epochs
without improvement. Stage III starts at the ensemble of the two trained branch heads, and that
starting point (epoch -1) competes with every trained epoch, so fusion never ends up worse on
validation than the average of its branches.
Every epoch ends with an atomic checkpoint (weights, optimizer, scheduler, RNG, history), so
a killed run resumes from its last finished epoch and ends with the same weights: each
epoch's shuffling, flips, (stage I) random crops and augmentation come from a generator seeded
by (seed, stage, epoch), not from whatever state the process had when it died.

The loop is fed whole batches read from the image cache's shards when they are asked for
(stages II/III: from the crop cache; for a folder the image cache does not serve, by tensor
indexing of the split decoded into memory), uint8 made float on the device: no split is held
whole. The loss is read back once per epoch (and for the progress bar every few steps), not
after every step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cxr.core.atomic import atomic_path, atomic_write_json
from cxr.core.config import Params
from cxr.core.errors import DataError
from cxr.core.progress import report
from models.branch import build_branch
from models.fusion import FusionHead
from models.agcnn import attention_crops
from models.loss import WeightedBCE
from models.device import pick_device  # noqa: F401  (re-exported: tasks.training.stages.pick_device)
from tasks.training.dataset import SplitData, TrainBatches, load_split
from tasks.images.geometry import augment_draws, random_crop_offsets, to_input
from tasks.metadata.ingest import read_metadata
from tasks.training.metrics import auroc_per_class, mean_auroc
from models.branch import Branch
from tasks.metadata.split import read_splits
from cxr.core.labels import STAGES
from cxr.core.digest import file_sha256
from tasks.bundle.weights import load_branch, save_weights

log = logging.getLogger("cxr.train")


class StageModel(torch.nn.Module):
    """What one stage trains, with the frozen stages before it.

    forward(x) -> (logits of this stage's output, ...). Frozen parts stay in eval mode so
    their BatchNorm statistics do not drift while the new part learns.
    """

    def __init__(self, stage: str, params: Params, models_dir: Path):
        super().__init__()
        m = params.model
        self.stage = stage
        self.frozen = torch.nn.ModuleDict()
        if stage == "global":
            self.trainable = build_branch(m.backbone, m.pretrained)
        else:
            self.frozen["global"] = load_branch(models_dir / "global.safetensors", m.backbone)
            if stage == "local":
                self.trainable = build_branch(m.backbone, m.pretrained)
            else:
                self.frozen["local"] = load_branch(models_dir / "local.safetensors", m.backbone)
                g, l = self.frozen["global"], self.frozen["local"]
                # Start at the branches' ensemble: fusion's first logits are the mean of theirs.
                self.trainable = FusionHead.from_branches(g.classifier, l.classifier)
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.local_size = m.local_size
        self.threshold = m.attention.threshold
        self.mode = m.attention.mode

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x: torch.Tensor, augment: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, 3, S, S) normalised input; `augment` (B, 4) draws for the trainable branch's
        input (stage I: x; stage II: its attention crops)."""
        if self.stage == "global":
            return self.trainable(x).logits
        with torch.no_grad():
            g = self.frozen["global"](x)
            crops, _ = attention_crops(x, g.features, self.local_size, self.threshold, self.mode)
        if self.stage == "local":
            return self.trainable(_augment_normalised(crops, augment)).logits
        with torch.no_grad():
            local = self.frozen["local"](crops)
        return self.trainable(g.pooled, local.pooled)

    def forward_cached(self, crops: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Stages II/III from the crop cache: crops (B, 3, L, L) normalised local input,
        pooled (B, C) the frozen global branch's pooled features of the same view."""
        if self.stage == "local":
            return self.trainable(crops).logits
        with torch.no_grad():
            local = self.frozen["local"](crops)
        return self.trainable(pooled, local.pooled)

    def forward_batch(self, inputs, device: torch.device, augment: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a loader batch without its labels: (pixels,) or, from the crop cache,
        (crops, pooled); `augment` (B, 4) draws for the trainable branch's input."""
        if len(inputs) == 1:
            if self.stage == "global":
                return self(to_input(inputs[0], device, augment))
            return self(to_input(inputs[0], device), augment)
        crops, pooled = inputs
        crops = to_input(crops, device, augment if self.stage == "local" else None)
        return self.forward_cached(crops, pooled.to(device, non_blocking=True))


def _augment_normalised(x: torch.Tensor, augment: torch.Tensor | None) -> torch.Tensor:
    """Augment an already normalised (B, 3, L, L) batch of grey images (stage II without the
    crop cache): back to [0, 1], augment, normalise again."""
    if augment is None:
        return x
    from tasks.images.geometry import IMAGENET_MEAN, IMAGENET_STD, augment_batch

    grey = x[:, 0] * IMAGENET_STD[0, 0].item() + IMAGENET_MEAN[0, 0].item()
    out = augment_batch(grey, augment).unsqueeze(1).expand(-1, 3, -1, -1)
    return (out - IMAGENET_MEAN.to(x.device)) / IMAGENET_STD.to(x.device)


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (torchrun or `cxr train --nproc`), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def random_crops(params: Params, stage: str) -> bool:
    """Whether this stage trains on random crops: stage I only, and only when there is room.

    Stages II/III read crops from the crop cache (or, without it, cut them on the fly from
    the centre crop): the attention crops are computed once from the frozen global branch's
    centre-crop input, so a random global crop has nothing to act on there.
    """
    m = params.model
    return stage == "global" and params.train.random_crop and m.load_size > m.image_size


def epoch_generator(params: Params, stage: str, epoch: int) -> torch.Generator:
    """The one generator of an epoch's random draws, seeded by (seed, stage, epoch) alone."""
    return torch.Generator().manual_seed(params.seed * 1_000_003 + STAGES.index(stage) * 10_007 + epoch)


def augments(params: Params, stage: str) -> bool:
    """Whether this stage augments: stages I and II (a branch learns), never the fusion head,
    which learns on the frozen branches' features of the unaugmented views."""
    return stage != "fusion" and params.train.augment.enabled


def epoch_draws(params: Params, stage: str, epoch: int, n: int, generator: torch.Generator | None = None):
    """(order (n,), flips (n,) bool or None, crop offsets (n, 2) or None) of one epoch.

    All from one generator seeded by (seed, stage, epoch) alone (`epoch_generator`), drawn
    before loading starts: the same whatever the DataLoader workers, and the same again when a
    run resumes. The training loop then draws the augmentation from the same generator.
    """
    generator = generator if generator is not None else epoch_generator(params, stage, epoch)
    order = torch.randperm(n, generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if params.train.flip else None
    # Drawn last, so without random crops the order and flips are what they always were.
    offsets = random_crop_offsets(n, params.model, generator) if random_crops(params, stage) else None
    return order, flips, offsets


def patience_spent(epoch: int, best_epoch: int, patience: int | None) -> bool:
    """Early stopping: `patience` epochs have passed since the best one (the fusion start
    counts as epoch -1)."""
    return patience is not None and epoch - best_epoch >= patience


def param_groups(trainable: torch.nn.Module, sp, pretrained: str) -> list[dict]:
    """SGD parameter groups: a pretrained branch body at lr * body_lr_scale, the new head (and
    everything else) at lr. The head is the last group (its lr is the one logged)."""
    if isinstance(trainable, Branch) and pretrained != "none" and sp.body_lr_scale != 1.0:
        return [{"params": list(trainable.body.parameters()), "lr": sp.lr * sp.body_lr_scale},
                {"params": list(trainable.classifier.parameters()), "lr": sp.lr}]
    return [{"params": list(trainable.parameters()), "lr": sp.lr}]


def epoch_loader(params: Params, stage: str, epoch: int, train, batch_size: int, device: torch.device,
                 rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """One epoch's batches: the seeded order cut into batches, each fetched whole by
    `TrainBatches` (workers, when params ask, prefetch whole batches)."""
    generator = epoch_generator(params, stage, epoch)
    order, flips, offsets = epoch_draws(params, stage, epoch, len(train.ids), generator)
    # Drawn after the others from the same generator: without augmentation nothing changes.
    augment = augment_draws(len(train.ids), params.train.augment, generator) if augments(params, stage) else None
    if world > 1:
        # DistributedSampler's scheme on our seeded order: pad to a multiple of the world
        # size, then rank r takes every world-th index, so ranks step in lockstep.
        order = torch.cat([order, order[: (-len(order)) % world]])[rank::world]
    order = order.tolist()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return torch.utils.data.DataLoader(
        TrainBatches(train, batches, flips, offsets, augment), batch_size=None, shuffle=False,
        num_workers=params.train.workers, pin_memory=device.type == "cuda",
    )


def _fingerprint(stage: str, params: Params, inputs: list[Path], extra: str = "") -> str:
    """What a checkpoint is valid for: the stage's params and the digests of its inputs
    (`extra`: the crop cache key when the stage reads it)."""
    h = hashlib.sha256()
    # Unset keys (model.resize) and a random_crop without effect are left out, so checkpoints
    # made before those keys existed keep their fingerprint.
    crops = {"random_crop": True} if random_crops(params, stage) else {}
    if augments(params, stage):
        crops["augment"] = params.train.augment.model_dump(mode="json")
    h.update(json.dumps({"stage": stage, "seed": params.seed, "model": params.model.model_dump(mode="json", exclude_none=True),
                         "train": params.train.stage(stage).fingerprint_dump(), "flip": params.train.flip, **crops},
                        sort_keys=True).encode())
    for path in inputs:
        h.update(file_sha256(path).encode())
    if extra:
        h.update(f"crop-cache:{extra}".encode())
    return h.hexdigest()


def predict(model: torch.nn.Module, data, device: torch.device, batch_size: int) -> np.ndarray:
    """(N, K) probabilities of a stage model over a split, in order, without flips."""
    model.eval()
    out = []
    cached = None
    if not isinstance(data, SplitData):  # a CropSplit: read crops and pooled features, unflipped
        from tasks.training.crop_cache import CropDataset

        cached = CropDataset(data)
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for start in range(0, len(data.ids), batch_size):
            if cached is not None:
                logits = model.forward_batch(cached.batch(start, start + batch_size), device)
            else:
                logits = model(to_input(data.inputs(start, start + batch_size), device))
            out.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(out).numpy()


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        # weights_only: a checkpoint is data; loading it must never run pickled code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: start the stage over, say so
        log.warning("checkpoint %s is unreadable (%s); starting the stage from scratch", path, exc)
        return None


def train_stage(params: Params, stage: str, *, progress: bool = True, stop_after_epoch: int | None = None) -> dict:
    """Train one stage; return its summary. `stop_after_epoch` ends the process's work early
    (used to test resume)."""
    if stage not in STAGES:
        raise DataError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}", where="--stage")
    paths, sp = params.paths, params.train.stage(stage)
    models_dir = Path(paths.models)
    torch.manual_seed(params.seed)
    rank, world = distributed_rank_world()
    device = pick_device(params.train.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    lead = rank == 0  # only rank 0 writes checkpoints, weights and metrics
    splits_path = Path(paths.processed) / "splits.parquet"
    weights_path = Path(paths.processed) / "class_weights.json"
    meta = read_metadata(Path(paths.interim) / "metadata.parquet")
    splits = read_splits(splits_path)
    if not weights_path.exists():
        raise DataError("class_weights.json not found; run `cxr split` first", where=str(weights_path))
    cw = json.loads(weights_path.read_text())
    image_dir = Path(paths.images)
    # Stages II/III read the frozen global branch's crops from the crop cache (rebuilt here
    # when missing or made for other weights/params) instead of recomputing them every epoch.
    crop_key = ""
    if stage != "global" and params.cache.enabled:
        from tasks.training.crop_cache import crop_split, ensure_crop_cache

        crops = ensure_crop_cache(params)
        crop_key = crops.key
        train, valid = crop_split(crops, meta, splits, "train"), crop_split(crops, meta, splits, "valid")
    else:
        image_cache = Path(paths.cache) / "images"
        train = load_split(meta, splits, "train", image_dir, params.model, image_cache)
        valid = load_split(meta, splits, "valid", image_dir, params.model, image_cache)

    upstream = [models_dir / f"{s}.safetensors" for s in STAGES[: STAGES.index(stage)]]
    model = StageModel(stage, params, models_dir).to(device)
    if device.type == "cuda" and params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fingerprint = _fingerprint(stage, params, [splits_path, weights_path, *upstream], crop_key)
    criterion = WeightedBCE(torch.tensor(cw["pos_weight"]), torch.tensor(cw["neg_weight"])).to(device)
    optimizer = torch.optim.SGD(param_groups(model.trainable, sp, params.model.pretrained), lr=sp.lr, momentum=sp.momentum,
                                weight_decay=sp.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=sp.lr_step, gamma=sp.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    ckpt_path = models_dir / "checkpoints" / f"{stage}.pt"
    start, best_auroc, best_epoch, history, best_state = 0, -1.0, -1, [], None
    ckpt = _load_checkpoint(ckpt_path)
    if ckpt is not None and ckpt.get("fingerprint") == fingerprint:
        model.trainable.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start, best_auroc, best_epoch = ckpt["epoch"] + 1, ckpt["best_auroc"], ckpt["best_epoch"]
        history, best_state = json.loads(ckpt["history"]), ckpt["best_model"]
        log.info("resuming stage %s after epoch %d/%d", stage, ckpt["epoch"] + 1, sp.epochs)
    elif ckpt is not None:
        log.info("checkpoint %s was made for other params or inputs; starting over", ckpt_path)
    if stage == "fusion" and start == 0:
        # The ensemble start competes as "epoch -1": training keeps it unless an epoch beats it.
        best_auroc = mean_auroc(valid.labels.numpy(), predict(model, valid, device, sp.batch_size))
        best_epoch, best_state = -1, copy.deepcopy({k: v.cpu() for k, v in model.trainable.state_dict().items()})
        history = [{"epoch": -1, "start": "ensemble of the global and local heads", "valid_mean_auroc": best_auroc}]
        best_auroc = best_auroc if np.isfinite(best_auroc) else -1.0
        log.info("stage fusion start (ensemble of the global and local heads): valid mean AUROC %.4f", history[0]["valid_mean_auroc"])
    core = model.trainable  # the unwrapped module: what is saved and restored
    if world > 1:
        # DDP averages gradients across ranks in backward; wrapping after the resume keeps
        # checkpoints free of DDP's "module." prefix.
        model.trainable = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank_batch = max(1, sp.batch_size // world)

    stopped_early = start > 0 and patience_spent(start - 1, best_epoch, sp.patience)
    for epoch in range(start, sp.epochs):
        if stopped_early:
            break
        t0 = time.perf_counter()
        loader = epoch_loader(params, stage, epoch, train, per_rank_batch, device, rank, world)
        model.train()
        loss_sum, steps = torch.zeros((), device=device), 0
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{sp.epochs}", disable=not (progress and lead), leave=False)
        for step, (*inputs, labels) in enumerate(bar):
            augment = inputs.pop() if augments(params, stage) else None
            y = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                logits = model.forward_batch(inputs, device, augment)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            steps += 1
            if progress and lead and (step % 5 == 0 or step == len(loader) - 1):
                bar.set_postfix(loss=f"{loss.item():.4f}")  # the one per-step read-back, for a person watching
        scheduler.step()
        loss = float(loss_sum) / max(steps, 1)  # the epoch's one loss read-back (waits for the device)
        train_seconds = time.perf_counter() - t0
        valid_auroc = mean_auroc(valid.labels.numpy(), predict(model, valid, device, sp.batch_size))
        # train_seconds: the batches alone (what benchmarks/bench_train.py rates); seconds: with validation.
        record = {"epoch": epoch, "loss": loss, "valid_mean_auroc": valid_auroc, "lr": optimizer.param_groups[-1]["lr"],
                  "train_seconds": round(train_seconds, 3), "seconds": round(time.perf_counter() - t0, 2)}
        history.append(record)
        if np.isfinite(valid_auroc) and valid_auroc > best_auroc or best_state is None:
            best_auroc, best_epoch = (valid_auroc if np.isfinite(valid_auroc) else best_auroc), epoch
            best_state = copy.deepcopy({k: v.cpu() for k, v in core.state_dict().items()})
        # The line the Prefect UI shows per epoch (1-based, as the progress bar counts).
        log.info("stage %s epoch %d/%d: loss %.4f, valid mean AUROC %.4f, %.1f s", stage, epoch + 1, sp.epochs,
                 record["loss"], valid_auroc, record["seconds"])
        report(f"train-{stage}", epoch + 1, sp.epochs, unit="epochs",
               note=f"loss {record['loss']:.4f}, valid mean AUROC {valid_auroc:.4f}")
        if lead:
            _save_checkpoint(ckpt_path, {
                "fingerprint": fingerprint, "epoch": epoch, "model": core.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                "best_auroc": float(best_auroc), "best_epoch": best_epoch, "best_model": best_state, "history": json.dumps(history),
            })
        if world > 1:
            torch.distributed.barrier()  # no rank runs ahead of a checkpoint it may resume from
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            return {"stage": stage, "stopped_after_epoch": epoch}
        if patience_spent(epoch, best_epoch, sp.patience):
            log.info("stage %s: no better validation AUROC for %d epochs; stopping after epoch %d", stage, sp.patience, epoch + 1)
            stopped_early = True

    core.load_state_dict(best_state)
    model.trainable = core
    if not lead:
        return {"stage": stage, "rank": rank}
    m = params.model
    metadata = {"stage": stage, "backbone": m.backbone, "labels": cw["labels"], "image_size": m.image_size,
                **({"resize": m.resize} if m.resize is not None else {}),
                "local_size": params.model.local_size, "best_epoch": best_epoch, "best_valid_mean_auroc": best_auroc,
                "fingerprint": fingerprint, "upstream": {p.stem: file_sha256(p) for p in upstream},
                **({"crop_cache": crop_key} if crop_key else {})}
    digest = save_weights(core, models_dir / f"{stage}.safetensors", metadata)
    log.info("stage %s done: kept %s, valid mean AUROC %.4f; weights %s", stage,
             "the ensemble start" if best_epoch < 0 else f"epoch {best_epoch + 1}", best_auroc, models_dir / f"{stage}.safetensors")
    per_class = auroc_per_class(valid.labels.numpy(), predict(model, valid, device, sp.batch_size))
    summary = {
        "stage": stage, "device": device.type, "processes": world, "epochs": sp.epochs, "best_epoch": best_epoch,
        "epochs_run": sum(1 for h in history if h["epoch"] >= 0), "stopped_early": stopped_early,
        "best_valid_mean_auroc": best_auroc, "weights": str(models_dir / f"{stage}.safetensors"), "digest": digest,
        "valid_auroc": {l: (None if np.isnan(v) else round(float(v), 4)) for l, v in zip(cw["labels"], per_class)},
        "history": history,
    }
    # The metrics file is a DVC output: wall times would change its hash on every run and in
    # every clone, so they stay in the returned summary (and the log), out of the file.
    timings = ("seconds", "train_seconds")
    atomic_write_json(Path(paths.metrics) / f"train_{stage}.json",
                      {**summary, "history": [{k: v for k, v in h.items() if k not in timings} for h in history]})
    return summary
