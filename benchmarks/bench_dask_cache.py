"""Benchmark: image-cache build throughput through Prefect with 1 vs 2 Dask worker processes.

Run from the repository root:  .venv/bin/python benchmarks/bench_dask_cache.py
Writes benchmarks/results/dask_cache.json. Starts its own Prefect server and two local Dask
clusters (1 worker and 2 workers, one thread each), then runs `cxr cache images`' flow
(`flows.cache.cache_images`, params dask.address) on each in alternating rounds, into a
fresh cache each time; the best round of each counts. Sources are NIH-sized 1024 px PNGs,
so decoding (the per-chunk work) dominates the per-task orchestration cost. Both builds
must publish the same index as each other.
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

from benchmarks.harness import prefect_server, publish  # noqa: E402

import numpy as np  # noqa: E402

N, DISTINCT, SOURCE, SIZE, SHARD, ROUNDS = 800, 16, 1024, 224, 100, 3  # 8 chunks of 100


def make_sources(folder: Path) -> list[str]:
    """N NIH-sized PNGs: a few distinct chest-like renders (background plus per-image noise, so
    PNG cannot compress them to nothing) copied under N names; decoding costs the same."""
    import shutil

    from PIL import Image

    from tasks.metadata.synth import anatomy

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bases = [anatomy(SOURCE, rng) for _ in range(2)]
    ids = []
    for i in range(N):
        name = f"{i:08d}_000.png"
        if i < DISTINCT:
            image = bases[i % 2] + rng.normal(0, 0.03, (SOURCE, SOURCE))
            Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / name)
        else:
            shutil.copyfile(folder / ids[i % DISTINCT], folder / name)
        ids.append(name)
    return ids


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq


    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ids = make_sources(tmp / "images")
        render_s = time.perf_counter() - t0
        (tmp / "processed").mkdir()
        pq.write_table(pa.table({"image_id": ids, "patient_id": list(range(N)), "split": ["train"] * N}),
                       tmp / "processed" / "splits.parquet")
        load_before = os.getloadavg()[0]
        with prefect_server(tmp):
            result = _measure(tmp, ids)
    # Anything else running on the cores (load above the workers' own) shrinks the 2-worker gain.
    result["load_average_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    result["render_s"] = round(render_s, 1)
    publish("dask_cache", result)
    print(f"image cache build: {result['ratio']}x the images per second with 2 Dask workers as with 1 "
          f"({result['workers_2_images_per_s']} vs {result['workers_1_images_per_s']}); "
          f"chunk phase alone {result['chunk_phase_ratio']}x")


def _measure(tmp: Path, ids: list[str]) -> dict:
    import pyarrow.parquet as pq
    from cxr.core.config import Params
    from flows.cache import cache_images

    def params(address: str, cache: Path) -> Params:
        return Params.model_validate({
            "paths": {"raw": str(tmp), "images": str(tmp / "images"), "interim": str(tmp / "interim"),
                      "processed": str(tmp / "processed"), "cache": str(cache), "models": str(tmp / "models"),
                      "metrics": str(tmp / "metrics"), "reports": str(tmp / "reports"), "incoming": str(tmp / "incoming"),
                      "roots": [str(tmp)]},
            "cache": {"image_size": SIZE, "shard_images": SHARD},
            "dask": {"enabled": True, "address": address},
        })

    from benchmarks.dask_harness import alternating_rounds, local_clusters, throughput

    with local_clusters("import prefect.task_engine, tasks.prefect_tasks, tasks.images.image_cache, tasks.images") as (
            clusters, clients):
        cache_images(params(clusters[1].scheduler_address, tmp / "warm"))  # the flow process's imports

        def build(n: int, r: int):
            cache = tmp / f"cache-{n}-{r}"
            summary = cache_images(params(clusters[n].scheduler_address, cache))
            assert summary["items"] == N and not summary["up_to_date"], summary
            return pq.read_table(cache / "images" / "index.parquet")

        rounds = alternating_rounds(clients, ROUNDS, build)
    assert rounds["results"][1][-1].equals(rounds["results"][2][-1]), "1 and 2 workers published different indexes"
    return {
        "benchmark": "dask_cache", "images": N, "source": f"{SOURCE}x{SOURCE} 8-bit PNG", "cache_size": SIZE,
        "chunks": -(-N // SHARD), **throughput(rounds, N, "images", "chunk"),
        "note": "wall = the whole flow run (plan hashes the sources and publish joins the index in the flow "
                "process, serially); chunk phase = first chunk start to last chunk end on the workers",
        "python": platform.python_version(), "machine": platform.machine(),
    }


if __name__ == "__main__":
    main()
