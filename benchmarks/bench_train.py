"""Training fed at the limit: stage I samples/s of the real training loop over the model's own
forward+backward+step samples/s on tensors already in memory, one run.

Numerator: `tasks.training.stages.train_stage` (stage I, 2 epochs) on the real 800-image NIH sample;
the second (warm) epoch's `train_seconds` from its history: the whole per-epoch loop (seeded
order, flips and augmentation draws, whole-batch fetch, uint8 -> float on the device, forward,
loss, backward, step), validation excluded. Denominator: the same model (a fresh branch of the
same backbone), loss, optimizer and batch sizes over one epoch of already normalised float
input in memory: nothing but forward + backward + step. Measured before and after the
training run; their mean is the limit (the machine is shared: both sides see the same load).

Run: .venv/bin/python benchmarks/bench_train.py [--backbone resnet18] [--size 64] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import publish  # noqa: E402


def model_only_seconds(params, pixels, labels, cw, batch: int) -> float:
    """Seconds for one epoch of forward + backward + step on in-memory float input."""
    import torch

    from models.branch import build_branch
    from models.loss import WeightedBCE
    from tasks.images.geometry import to_input
    from tasks.training.stages import param_groups

    sp = params.train.global_
    branch = build_branch(params.model.backbone, params.model.pretrained).train()
    optimizer = torch.optim.SGD(param_groups(branch, sp, params.model.pretrained), lr=sp.lr, momentum=sp.momentum,
                                weight_decay=sp.weight_decay)
    criterion = WeightedBCE(torch.tensor(cw["pos_weight"]), torch.tensor(cw["neg_weight"]))
    x = to_input(pixels)  # (N, 3, S, S) float, made once: the baseline pays no input work
    batches = [(x[i : i + batch], labels[i : i + batch]) for i in range(0, len(x), batch)]
    t0 = time.perf_counter()
    for xb, yb in batches:
        loss = criterion(branch(xb).logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    float(loss)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--augment", action="store_true", help="train with the radiograph augmentation on")
    args = parser.parse_args()

    import torch

    from cxr.core.config import AugmentParams, ModelParams
    from tasks.training.dataset import load_split
    from tasks.metadata.ingest import read_metadata, run_ingest
    from tasks.metadata.split import read_splits, run_split
    from tasks.training.stages import train_stage
    from tests.conftest import make_params

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = make_params(root, epochs=2, batch_size=args.batch)
        augment = AugmentParams(rotation=7, scale=0.1, brightness=0.1, contrast=0.1) if args.augment else AugmentParams()
        params = params.model_copy(update={
            "model": ModelParams(backbone=args.backbone, pretrained=args.pretrained, image_size=args.size, local_size=args.size),
            "train": params.train.model_copy(update={"augment": augment})})
        run_ingest(ROOT.parent / "shared/data/nih-sample-64/Data_Entry_sample.csv", params.paths.interim)
        run_split(params.paths.interim / "metadata.parquet", params.paths.processed, ratios=params.split.ratios(),
                  tolerance=params.split.tolerance, seed=params.seed)
        meta, splits = read_metadata(params.paths.interim / "metadata.parquet"), read_splits(params.paths.processed / "splits.parquet")
        train = load_split(meta, splits, "train", params.paths.images, params.model)
        cw = json.loads((params.paths.processed / "class_weights.json").read_text())

        model_only_seconds(params, train.pixels, train.labels, cw, args.batch)  # warm-up
        before = model_only_seconds(params, train.pixels, train.labels, cw, args.batch)
        summary = train_stage(params, "global", progress=False)
        after = model_only_seconds(params, train.pixels, train.labels, cw, args.batch)
    n = len(train.ids)
    loop_s = summary["history"][-1]["train_seconds"]  # the warm epoch
    limit_s = (before + after) / 2
    out = {
        "benchmark": f"stage I training loop vs forward+backward+step on in-memory tensors, {args.backbone} "
                     f"({args.pretrained}) {args.size} px, batch {args.batch}, 800-image NIH sample, CPU",
        "train_images": n,
        "augment": args.augment,
        "loop_samples_per_s": round(n / loop_s, 1),
        "model_only_samples_per_s": round(n / limit_s, 1),
        "efficiency": round(limit_s / loop_s, 3),
        "seconds": {"loop_epoch": round(loop_s, 3), "model_only_before": round(before, 3), "model_only_after": round(after, 3),
                    "loop_first_epoch": summary["history"][0]["train_seconds"]},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0],
                    "note": "shared 2-core machine: both sides see the same load; absolute samples/s are pessimistic"},
    }
    publish("train_throughput", out)
    print(f"training loop efficiency: {out['efficiency']} of forward+backward+step")


if __name__ == "__main__":
    main()
