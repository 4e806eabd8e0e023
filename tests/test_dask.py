"""The cache builds fanned out to Dask worker processes (params `dask:`): the same index and
shard bytes as the single-process build (image and crop caches), a worker killed mid-build
loses and duplicates nothing, and `cxr cache images` with dask.enabled works end to end."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cxr.config import DaskParams
from tasks import cache_store
from tasks.image_cache import build_image_cache
from tasks.split import read_splits
from tests.conftest import NIH_SAMPLE, make_params, run_cxr
from tests.test_cache import small  # noqa: F401  (the trained 240-image crop-cache workspace)

SIZE, SHARD = 64, 100  # 800 sample images: 8 chunks

# Run on the workers (exec'd there): each chunk lingers after writing its files, so a
# SIGKILL lands while chunks are in flight. A restarted worker process runs at full speed.
_SLOW_CHUNKS = """
import time
import tasks.image_cache as ic
if not getattr(ic.build_image_chunk, "slowed", False):
    real = ic.build_image_chunk
    def slow(plan, i):
        out = real(plan, i)
        time.sleep(0.6)
        return out
    slow.slowed = True
    ic.build_image_chunk = slow
"""


@pytest.fixture(scope="module")
def cluster(prefect_server):
    """One local cluster of two worker processes for the module (a start costs seconds);
    flows reach it through dask.address. Started after the Prefect server so the workers
    report their task runs to it."""
    from distributed import Client, LocalCluster

    from flows.runner import use_default_malloc_in_local_workers

    use_default_malloc_in_local_workers()  # as the flows' own local clusters do
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            Client(lc, set_as_default=False) as client:  # a default client would override dask.address
        yield lc, client


def _params(workspace: Path, root: Path, cluster=None, **dask):
    """The sample workspace's params with the cache under `root`, on `cluster` when given."""
    params = make_params(workspace)
    params = params.model_copy(update={
        "paths": params.paths.model_copy(update={"cache": root / "cache", "roots": (*params.paths.roots, root)}),
        "cache": params.cache.model_copy(update={"image_size": SIZE, "shard_images": SHARD}),
    })
    if cluster is not None:
        dask = {"enabled": True, "address": cluster[0].scheduler_address, **dask}
    return params.model_copy(update={"dask": DaskParams(**dask)}) if dask else params


@pytest.fixture(scope="module")
def straight(workspace, tmp_path_factory) -> Path:
    """The single-process build, the reference every Dask build must equal."""
    root = tmp_path_factory.mktemp("straight")
    ids = read_splits(workspace / "processed" / "splits.parquet")["image_id"].tolist()
    build_image_cache(NIH_SAMPLE / "images", ids, root / "images", SIZE, SHARD)
    return root / "images"


def _assert_same_cache(built: Path, reference: Path) -> None:
    """Same published index (rows and metadata), no id twice, byte-equal shards, no temp files."""
    a, b = pq.read_table(reference / "index.parquet"), pq.read_table(built / "index.parquet")
    assert a.equals(b) and a.schema.metadata == b.schema.metadata
    ids = b["item_id"].to_pylist()
    assert len(ids) == len(set(ids)), "an image is in the index twice"
    version = cache_store.published_meta(built)["version"]
    shards = sorted(p.name for p in (reference / version).glob("shard-*"))
    assert shards and shards == sorted(p.name for p in (built / version).glob("shard-*"))
    for name in shards:
        assert (built / version / name).read_bytes() == (reference / version / name).read_bytes(), name
    leftovers = [p.name for p in (built / version).iterdir() if p.name.startswith(".") or ".tmp" in p.name]
    assert not leftovers, leftovers


def test_dask_image_cache_equals_the_single_process_build(workspace, straight, cluster, tmp_path):
    from flows.cache import cache_images

    from distributed import get_task_stream

    params = _params(workspace, tmp_path, cluster)
    with get_task_stream(cluster[1]) as stream:
        summary = cache_images(params)
    assert not summary["up_to_date"] and summary["items"] == pq.read_metadata(straight / "index.parquet").num_rows
    _assert_same_cache(tmp_path / "cache" / "images", straight)
    # The chunks really ran in both worker processes.
    assert len({t["worker"] for t in stream.data}) == 2
    assert cache_images(params)["up_to_date"]


def test_a_worker_killed_mid_build_loses_and_duplicates_nothing(workspace, straight, cluster, tmp_path):
    from flows.cache import cache_images

    lc, client = cluster
    client.run(exec, _SLOW_CHUNKS, {})  # its own globals: the patch's closure needs them
    pids = client.run(os.getpid)
    params = _params(workspace, tmp_path, cluster)
    key = cache_store.published_meta(straight)["key"]
    vdir = cache_store.version_dir(tmp_path / "cache" / "images", key)
    killed: list[tuple[str, list]] = []

    def kill_one_worker_after_the_first_chunk():
        deadline = time.time() + 60
        while not list(vdir.glob("chunk-*.parquet")) and time.time() < deadline:
            time.sleep(0.02)
        # A worker with a chunk in flight: its task must be rescheduled, not lost.
        busy = {addr: keys for addr, keys in client.processing().items() if keys}
        addr = sorted(busy or pids)[0]
        os.kill(pids[addr], signal.SIGKILL)
        killed.append((addr, busy.get(addr, [])))

    killer = threading.Thread(target=kill_one_worker_after_the_first_chunk)
    killer.start()
    try:
        summary = cache_images(params)
    finally:
        killer.join()
    assert killed and killed[0][1], "no worker was killed with a chunk in flight"
    # The flow finished on its first run: Dask rescheduled the dead worker's chunk.
    assert not summary["up_to_date"] and summary["items"] == pq.read_metadata(straight / "index.parquet").num_rows
    _assert_same_cache(tmp_path / "cache" / "images", straight)
    # The nanny restarted the killed worker: the cluster is whole again for the next test.
    client.wait_for_workers(2, timeout=30)


def test_cli_cache_images_with_dask_enabled(workspace, straight, prefect_server, tmp_path):
    params = make_params(workspace)
    raw = params.model_dump(mode="json", by_alias=True)
    raw["paths"]["cache"] = str(tmp_path / "cache")
    raw["paths"]["roots"] = [str(workspace), str(NIH_SAMPLE), str(tmp_path)]
    raw["cache"].update(image_size=SIZE, shard_images=SHARD)
    raw["dask"] = {"enabled": True, "address": "", "workers": 2, "threads_per_worker": 1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = run_cxr("--params", str(tmp_path / "params.yaml"), "cache", "images", cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"up_to_date": false' in done.stdout
    _assert_same_cache(tmp_path / "cache" / "images", straight)


@pytest.mark.slow  # needs the session's trained global weights (shared with test_cache)
def test_dask_crop_cache_equals_the_in_process_build(small, cluster, tmp_path):
    import shutil

    from flows.cache import cache_crops, cache_crops_flow

    images = read_splits(small.paths.processed / "splits.parquet")["image_id"]
    build_image_cache(small.paths.images, images, tmp_path / "images", 64, 64)
    built = {}
    for name, dask in (("threads", DaskParams()), ("dask", DaskParams(enabled=True, address=cluster[0].scheduler_address))):
        shutil.copytree(tmp_path / "images", tmp_path / name / "images")
        params = small.model_copy(update={"paths": small.paths.model_copy(update={"cache": tmp_path / name}), "dask": dask})
        built[name] = (cache_crops if dask.enabled else cache_crops_flow)(params)
    assert built["dask"] == built["threads"] and not built["dask"]["up_to_date"]
    # Pooled features are float32 from torch on 1 thread (worker) vs the flow's threads: still byte-equal.
    _assert_same_cache(tmp_path / "dask" / "crops", tmp_path / "threads" / "crops")
