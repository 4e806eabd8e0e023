"""Benchmark: scoring throughput through Prefect with 1 vs 2 Dask worker processes.

Run from the repository root:  .venv/bin/python benchmarks/bench_dask_score.py
Writes benchmarks/results/dask_score.json. Starts its own Prefect server and two local Dask
clusters (1 worker and 2 workers, one thread each), then runs `cxr score`'s flow
(`flows.score.score`, params dask.address) on each in alternating rounds into a fresh output
folder; the best round of each counts. Studies are 512 px PNGs, scored by a randomly
initialised, registered ResNet-18 AG-CNN at 128 px, in shards of one batch; everything a
real run writes (parts, JSON, overlays, thumbnails, report) is written. Both runs must
publish the same rows.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N, SIDE, SIZE, BATCH, ROUNDS = 128, 512, 128, 16, 2  # 8 shards of 16


def main() -> None:
    from benchmarks.bench_score import make_models, make_studies
    from benchmarks.harness import prefect_server, publish

    with tempfile.TemporaryDirectory(prefix="bench-dask-score-") as tmp:
        tmp = Path(tmp)
        (tmp / "models").mkdir()
        make_models(tmp / "models", _params(tmp, ""))
        t0 = time.perf_counter()
        make_studies(tmp / "studies", N, SIDE)
        render_s = time.perf_counter() - t0
        load_before = os.getloadavg()[0]
        with prefect_server(tmp):
            result = _measure(tmp)
    result["load_average_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    result["render_s"] = round(render_s, 1)
    publish("dask_score", result)
    print(f"scoring: {result['ratio']}x the studies per second with 2 Dask workers as with 1 "
          f"({result['workers_2_studies_per_s']} vs {result['workers_1_studies_per_s']}); "
          f"shard phase alone {result['shard_phase_ratio']}x")


def _params(tmp: Path, address: str):
    from cxr.core.config import Params

    return Params.model_validate({
        "paths": {"models": str(tmp / "models"), "reports": str(tmp / "reports"), "roots": [str(tmp), "data"]},
        "model": {"backbone": "resnet18", "image_size": SIZE, "local_size": SIZE},
        "train": {"device": "cpu"}, "score": {"batch_size": BATCH, "overlay_size": 128},
        "dask": {"enabled": bool(address), "address": address},
    })


def _measure(tmp: Path) -> dict:
    import pandas as pd

    from benchmarks.dask_harness import alternating_rounds, local_clusters, throughput
    from flows.score import score

    with local_clusters("import prefect.task_engine, tasks.prefect_tasks, tasks.scoring.run") as (clusters, clients):
        for n in (1, 2):  # each worker loads the weights once per process: paid before timing
            score(_params(tmp, clusters[n].scheduler_address), tmp / "studies", tmp / f"warm-{n}")

        def run(n: int, r: int):
            out = tmp / f"out-{n}-{r}"
            summary = score(_params(tmp, clusters[n].scheduler_address), tmp / "studies", out)
            assert summary["scored"] == N, summary
            rows = pd.read_parquet(out / "scores.parquet").sort_values("study_id").reset_index(drop=True)
            return rows.drop(columns=["scored_at", "run_id"])

        rounds = alternating_rounds(clients, ROUNDS, run)
    a, b = rounds["results"][1][-1], rounds["results"][2][-1]
    pd.testing.assert_frame_equal(a, b)  # same rows, bit for bit, with 1 or 2 workers
    return {
        "benchmark": "dask_score", "studies": N, "study_px": SIDE, "network_input_px": SIZE, "backbone": "resnet18",
        "shards": -(-N // BATCH), **throughput(rounds, N, "studies", "shard"),
        "note": "wall = the whole flow run (plan hashes the studies, finish folds the parts and the report is "
                "written in the flow process, serially); shard phase = first shard start to last shard end",
        "python": platform.python_version(), "machine": platform.machine(),
    }


if __name__ == "__main__":
    main()
