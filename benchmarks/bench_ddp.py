"""DDP on the CPU: training samples per second with 2 processes (gloo) versus 1, one run.

Stage I (global branch, ResNet-18, 64 px) on the real 800-image NIH sample, one epoch each,
timed from the epoch records (process start-up excluded). One process uses both cores'
threads; each of the 2 DDP processes gets one thread.

Run: .venv/bin/python benchmarks/bench_ddp.py
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import publish  # noqa: E402


def main() -> None:
    import torch

    from tasks.training.distributed import train_distributed
    from tasks.metadata.ingest import run_ingest
    from tasks.metadata.split import run_split
    from tasks.training.stages import train_stage
    from tests.conftest import make_params

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = make_params(root, epochs=2)
        run_ingest(ROOT.parent / "shared/data/nih-sample-64/Data_Entry_sample.csv", params.paths.interim)
        run_split(params.paths.interim / "metadata.parquet", params.paths.processed, ratios=params.split.ratios(),
                  tolerance=params.split.tolerance, seed=params.seed)
        results = {}
        for name, nproc in (("1 process", 1), ("2 processes", 2)):
            run = params.model_copy(update={"paths": params.paths.model_copy(update={"models": root / f"m{nproc}", "metrics": root / f"x{nproc}"})})
            summary = train_stage(run, "global", progress=False) if nproc == 1 else train_distributed(run, "global", 2, progress=False)
            # The second epoch: the first pays one-off costs (allocator warm-up, page faults).
            results[name] = summary["history"][-1]["seconds"]
        import pandas as pd

        splits = pd.read_parquet(params.paths.processed / "splits.parquet")
        n_train = int((splits["split"] == "train").sum())
    one, two = results["1 process"], results["2 processes"]
    out = {
        "benchmark": "DDP stage I epoch, ResNet-18 64 px, 800-image NIH sample, CPU gloo",
        "train_images": n_train,
        "samples_per_s_1_process": round(n_train / one, 1),
        "samples_per_s_2_processes": round(n_train / two, 1),
        "ratio_2_over_1": round(one / two, 2),
        "epoch_s": {"1 process": one, "2 processes": two},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "loadavg_1min": os.getloadavg()[0]},
    }
    publish("ddp", out)
    print(f"DDP 2 processes vs 1: {out['ratio_2_over_1']}x samples/s")


if __name__ == "__main__":
    main()
