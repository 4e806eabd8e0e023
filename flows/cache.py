"""Cache flows: the image cache (decode once) and the crop cache (global branch once, after stage I).

Each build is plan -> one mapped task per chunk -> publish. A killed run leaves finished
chunks behind and the next run skips them; readers keep seeing the last published cache.
`cache_images` / `cache_crops` run the flows on the task runner params ask for (`dask:`):
the chunks fan out to Dask worker processes with the same result as in-process threads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prefect import flow, unmapped
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from cxr.core.config import Params
from cxr.core.progress import report
from flows.runner import task_runner
from tasks.prefect_tasks import (
    build_crop_chunk_task,
    build_image_chunk_task,
    plan_crop_cache_task,
    plan_image_cache_task,
    publish_crop_cache_task,
    publish_image_cache_task,
)


log = logging.getLogger("cxr.cache")


def _build_chunks(task, plan, what: str) -> None:
    """Map `task` over the plan's chunks; say done/total as each chunk finishes (in any order,
    on threads or Dask workers): a line in the flow run's log and its progress artifact."""
    futures = task.map(unmapped(plan), plan.chunks)
    total, t0 = len(plan.chunks), time.perf_counter()
    log.info("%s cache %s: building %d chunks", what, plan.key[:12], total)
    for done, future in enumerate(as_completed(futures), start=1):
        state = "failed" if future.state.is_failed() else "done"
        log.info("%s cache: %d/%d chunks finished (chunk %s %s), %.1f s", what, done, total,
                 _chunk_of(future), state, time.perf_counter() - t0)
        report(f"{what}-cache", done, total, unit="chunks")
    futures.result()  # the first failed chunk's error, as before


def _chunk_of(future) -> str:
    try:
        return str(future.result(raise_on_failure=False)["chunk"] + 1)
    except Exception:  # a failed chunk has no result to name it by
        return "?"


def _summary(meta: dict, up_to_date: bool) -> dict:
    return {k: meta[k] for k in ("kind", "key", "version", "items", "rejected")} | {"up_to_date": up_to_date}


# Decoding is I/O and Pillow (which releases the GIL): two threads keep two cores busy.
@flow(name="cache-images", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def cache_images_flow(params: Params) -> dict:
    from tasks.metadata.split import read_splits

    ids = read_splits(Path(params.paths.processed) / "splits.parquet")["image_id"].tolist()
    root = Path(params.paths.cache) / "images"
    plan = plan_image_cache_task(params.paths.images, ids, root, params.cache.image_size, params.cache.shard_images)
    if plan.up_to_date:
        from tasks.images.cache_store import published_meta

        log.info("image cache %s is up to date (%d images)", plan.key[:12], len(plan.ids))
        return _summary(published_meta(root), True)
    _build_chunks(build_image_chunk_task, plan, "image")
    return _summary(publish_image_cache_task(plan), False)


# One chunk at a time: each already uses every core (torch intra-op threads) or the GPU.
@flow(name="cache-crops", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def cache_crops_flow(params: Params) -> dict:
    plan = plan_crop_cache_task(params)
    if plan.up_to_date:
        from tasks.images.cache_store import published_meta

        log.info("crop cache %s is up to date (%d images)", plan.key[:12], len(plan.ids))
        return _summary(published_meta(plan.root), True)
    _build_chunks(build_crop_chunk_task, plan, "crop")
    return _summary(publish_crop_cache_task(plan), False)


def cache_images(params: Params) -> dict:
    """`cache_images_flow` on the params' task runner (Dask workers when dask.enabled)."""
    return cache_images_flow.with_options(task_runner=task_runner(params))(params)


def cache_crops(params: Params) -> dict:
    """`cache_crops_flow` on the params' task runner (Dask workers when dask.enabled)."""
    return cache_crops_flow.with_options(task_runner=task_runner(params))(params)
