"""The fan-out stages on Dask worker processes (params `dask:`): the cache builds give the same
index and shard bytes as the single-process build (image and crop caches), scoring gives the
same scores as the in-process run, a worker killed mid-run loses and duplicates nothing, and
`cxr cache images` with dask.enabled works end to end."""

from __future__ import annotations

import json

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cxr.core.config import DaskParams
from tasks.images import cache_store
from tasks.images.image_cache import build_image_cache
from tasks.metadata.split import read_splits
from tests.conftest import NIH_SAMPLE, make_params, registered_copy, run_cxr
from tests.test_cache import small  # noqa: F401  (the trained 240-image crop-cache workspace)

SIZE, SHARD = 64, 100  # 800 sample images: 8 chunks

# Run on the workers (exec'd there): each call of `module.name` lingers after writing its
# files, so a SIGKILL lands while tasks are in flight. A restarted worker runs at full speed.
_SLOW = """
import time
import {module} as m
if not getattr(m.{name}, "slowed", False):
    real = m.{name}
    def slow(*args, **kwargs):
        out = real(*args, **kwargs)
        time.sleep(0.6)
        return out
    slow.slowed = True
    m.{name} = slow
"""


@contextmanager
def killing_a_busy_worker(client, written, timeout: float):
    """Slow tasks must already be in place. Once `written()` is non-empty (a first chunk or
    part is on disk), SIGKILL a worker that has a task in flight; yields the list of
    (worker, its tasks) killed, filled when the block ends."""
    pids = client.run(os.getpid)
    killed: list[tuple[str, list]] = []

    def kill():
        deadline = time.time() + timeout
        while not written() and time.time() < deadline:
            time.sleep(0.02)
        # A worker with a task in flight: its task must be rescheduled, not lost.
        busy = {addr: keys for addr, keys in client.processing().items() if keys}
        addr = sorted(busy or pids)[0]
        os.kill(pids[addr], signal.SIGKILL)
        killed.append((addr, busy.get(addr, [])))

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        yield killed
    finally:
        killer.join()


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
    assert a.equals(b)
    # The metadata names the source folder relative to the cache's own folder (never an
    # absolute path: the index is a DVC output), so two caches at different places record it
    # differently: it must lead to the same folder; everything else must be equal.
    meta_a, meta_b = (json.loads(t.schema.metadata[b"cxr_cache"]) for t in (a, b))
    if "source_dir" in meta_a or "source_dir" in meta_b:  # image caches; the crop cache keys by digests only
        assert (reference / meta_a.pop("source_dir")).resolve() == (built / meta_b.pop("source_dir")).resolve()
    assert meta_a == meta_b
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
    client.run(exec, _SLOW.format(module="tasks.images.image_cache", name="build_image_chunk"), {})  # its own globals
    params = _params(workspace, tmp_path, cluster)
    key = cache_store.published_meta(straight)["key"]
    vdir = cache_store.version_dir(tmp_path / "cache" / "images", key)
    with killing_a_busy_worker(client, lambda: list(vdir.glob("chunk-*.parquet")), timeout=60) as killed:
        summary = cache_images(params)
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


# ---- scoring mapped over shards ------------------------------------------------------------

SCORE_COLUMNS_EXACT = ["study_id", "sha256", "model_digest", "status", "reason", "image_height", "image_width",
                       "box_y0", "box_x0", "box_y1", "box_x1", "top_findings", "overlay", "thumbnail", "json"]


@pytest.fixture(scope="module")
def scoring(trained, tmp_path_factory):
    """Registered models, 40 real studies (a corrupt one among them: a rejected row) in shards
    of 4, and the in-process run's scores: what every Dask run must equal."""
    import shutil

    import pandas as pd

    from tasks.scoring.run import score_studies

    params = registered_copy(trained, "dask-score-models", batch_size=4, overlay_size=96)
    inputs = tmp_path_factory.mktemp("dask-inputs")
    for src in sorted((NIH_SAMPLE / "images").glob("*.png"))[:39]:
        shutil.copy(src, inputs / src.name)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path_factory.mktemp("dask-straight")
    score_studies(params, inputs, out)
    return params, inputs, pd.read_parquet(out / "scores.parquet")


def _assert_same_scores(out: Path, reference) -> None:
    """Same rows as the in-process run: every id once, same statuses, boxes and flags; the
    probabilities equal to float32 rounding (workers run torch on one thread)."""
    import numpy as np
    import pandas as pd

    from cxr.core.labels import LABEL_COLUMNS
    from tasks.scoring.rows import FLAG_COLUMNS

    got = pd.read_parquet(out / "scores.parquet")
    assert got["study_id"].is_unique and len(got) == len(reference)
    got, ref = got.set_index("study_id").sort_index(), reference.set_index("study_id").sort_index()
    exact = [c for c in SCORE_COLUMNS_EXACT if c != "study_id"] + list(FLAG_COLUMNS) + ["flagged"]
    pd.testing.assert_frame_equal(got[exact], ref[exact])
    np.testing.assert_allclose(got[list(LABEL_COLUMNS)].to_numpy(), ref[list(LABEL_COLUMNS)].to_numpy(),
                               rtol=0, atol=1e-5)
    assert (got.loc["broken.png", "status"] == "rejected") and "PNG" in got.loc["broken.png", "reason"]
    assert not list((out / "parts").glob("*")), "parts left behind"
    for row in got.itertuples():
        assert (out / row.json).is_file()


def _score_params(params, out_root: Path, cluster):
    dask = DaskParams(enabled=True, address=cluster[0].scheduler_address)
    return params.model_copy(update={"dask": dask, "paths": params.paths.model_copy(
        update={"roots": (*params.paths.roots, out_root)})})


def test_dask_scoring_equals_the_in_process_run(scoring, cluster, tmp_path):
    from distributed import get_task_stream

    from flows.score import score

    params, inputs, reference = scoring
    with get_task_stream(cluster[1]) as stream:
        summary = score(_score_params(params, tmp_path, cluster), inputs, tmp_path / "out")
    assert summary["scored"] == 39 and summary["rejected"] == 1 and summary["batches"] == 10
    _assert_same_scores(tmp_path / "out", reference)
    # The shards really ran in both worker processes.
    assert len({t["worker"] for t in stream.data}) == 2
    again = score(_score_params(params, tmp_path, cluster), inputs, tmp_path / "out")
    assert again["new_studies"] == 0 and again["already_scored"] == 40


def test_a_worker_killed_mid_scoring_loses_and_duplicates_nothing(scoring, cluster, tmp_path):
    from flows.score import score

    params, inputs, reference = scoring
    lc, client = cluster
    client.run(exec, _SLOW.format(module="tasks.scoring.run", name="score_shard"), {})
    out = tmp_path / "out"
    with killing_a_busy_worker(client, lambda: list((out / "parts").glob("part-*.parquet")), timeout=90) as killed:
        summary = score(_score_params(params, tmp_path, cluster), inputs, out)
    assert killed and killed[0][1], "no worker was killed with a shard in flight"
    assert summary["scored"] == 39 and summary["rejected"] == 1 and summary["batches"] == 10
    _assert_same_scores(out, reference)
    client.wait_for_workers(2, timeout=30)
