"""Scoring throughput (batched vs one study at a time) and peak memory (500 vs 5,000 studies).

    .venv/bin/python benchmarks/bench_score.py [--size 128] [--small 500] [--large 5000]

Randomly initialised ResNet-18 AG-CNN weights and synthetic PNG studies in a temp folder;
both throughput runs go through the same `score_studies` code (JSON, overlays, parts and
all), only `score.batch_size` differs. Peak memory is the max RSS of a child process that
scores N studies. Writes benchmarks/results/score.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import publish  # noqa: E402
from cxr.atomic import atomic_write_json  # noqa: E402
from cxr.config import Params  # noqa: E402
from cxr.labels import PATHOLOGIES  # noqa: E402


def make_models(models_dir: Path, params: Params) -> None:
    """Random AG-CNN weights, registered (scoring refuses unregistered ones), plus flat 0.5 thresholds."""
    import torch

    from models.branch import build_branch
    from models.fusion import FusionHead
    from tasks.registry import register
    from tasks.thresholds import rule_key
    from tasks.weights import model_digest, save_weights

    torch.manual_seed(0)
    meta = {"backbone": "resnet18", "image_size": params.model.image_size, "local_size": params.model.local_size}
    save_weights(build_branch("resnet18"), models_dir / "global.safetensors", {**meta, "stage": "global"})
    save_weights(build_branch("resnet18"), models_dir / "local.safetensors", {**meta, "stage": "local"})
    save_weights(FusionHead(512, 512), models_dir / "fusion.safetensors", {**meta, "stage": "fusion"})
    register(params)
    entry = {"rule": rule_key(params), "data_version": "benchmark", "valid_images": 0,
             "classes": {p: {"threshold": 0.5, "source": "benchmark"} for p in PATHOLOGIES}}
    atomic_write_json(models_dir / "thresholds.json", {model_digest(models_dir): {rule_key(params): entry}})


def make_studies(folder: Path, n: int, side: int = 128) -> Path:
    """n distinct grey PNG 'radiographs' (a smooth blob plus seeded noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) * 6) * 180
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = np.clip(base + rng.normal(0, 20, (side, side)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"study_{i:05d}.png", compress_level=1)
    return folder


def bench_params(models_dir: Path, image_size: int, batch_size: int) -> Params:
    return Params.model_validate({"paths": {"models": str(models_dir), "roots": ["data", str(models_dir)]},
                                  "model": {"backbone": "resnet18", "image_size": image_size, "local_size": image_size},
                                  "train": {"device": "cpu"}, "score": {"batch_size": batch_size, "overlay_size": 128}})


def timed_run(params: Params, inputs: Path, out: Path) -> float:
    from tasks.report import write_report
    from tasks.score import score_studies

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = score_studies(params, inputs, out)
    write_report(out, summary)
    elapsed = time.perf_counter() - t0
    assert summary["scored"] == summary["files_found"], summary
    return summary["scored"] / elapsed


def child(args) -> None:
    """Score args.child studies in this process; print throughput and peak RSS (MiB)."""
    work = Path(args.work)
    params = bench_params(work / "models", args.size, args.batch)
    rate = timed_run(params, work / f"studies_{args.child}", work / f"out_{args.child}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"studies": args.child, "studies_per_s": rate, "peak_rss_mib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64, help="network input size (px)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--throughput-studies", type=int, default=128)
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--large", type=int, default=5000)
    ap.add_argument("--child", type=int)
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        work = Path(tmp)
        (work / "models").mkdir()
        make_models(work / "models", bench_params(work / "models", args.size, args.batch))
        inputs = make_studies(work / "throughput", args.throughput_studies)

        batched = bench_params(work / "models", args.size, args.batch)
        single = bench_params(work / "models", args.size, 1)
        timed_run(batched, make_studies(work / "warmup", 8), work / "out_warm")  # first-call costs
        rate_single = timed_run(single, inputs, work / "out_single")
        rate_batched = timed_run(batched, inputs, work / "out_batched")
        print(f"throughput: batched (batch {args.batch}) {rate_batched:.1f} studies/s, one at a time "
              f"{rate_single:.1f} studies/s, ratio {rate_batched / rate_single:.2f}x")

        memory = {}
        for n in (args.small, args.large):
            make_studies(work / f"studies_{n}", n)
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--work", str(work), "--size", str(args.size),
                                   "--batch", str(args.batch)], capture_output=True, text=True, check=True)
            memory[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{n} studies: peak RSS {memory[n]['peak_rss_mib']:.0f} MiB, {memory[n]['studies_per_s']:.1f} studies/s")
        growth = memory[args.large]["peak_rss_mib"] / memory[args.small]["peak_rss_mib"] - 1
        print(f"peak memory growth from {args.small} to {args.large} studies: {growth * 100:+.1f}%")

    result = {
        "device": "cpu", "network_input_px": args.size, "study_px": 128, "batch_size": args.batch,
        "throughput_studies": args.throughput_studies,
        "batched_studies_per_s": round(rate_batched, 2), "single_studies_per_s": round(rate_single, 2),
        "batched_over_single": round(rate_batched / rate_single, 2), "target_batched_over_single": 3.0,
        "peak_rss_mib": {str(n): round(m["peak_rss_mib"], 1) for n, m in memory.items()},
        "peak_rss_growth": round(growth, 4), "target_peak_rss_growth": 0.10,
    }
    publish("score", result)


if __name__ == "__main__":
    main()
