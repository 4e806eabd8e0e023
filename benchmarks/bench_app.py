"""One study, fast: the web app's upload-to-JSON latency, and 8 concurrent clients against 1.

    .venv/bin/python benchmarks/bench_app.py [--latency 100] [--concurrent 240] [--clients 8]

The demo profile (ResNet-18 AG-CNN, 128 px network input, overlay_size 384, score.batch_size
16) with random weights registered as a model bundle like bench_score.py's (the time of a
forward pass does not depend on the weights' values; the bundle's OOD gate is fitted on
synthetic renderings, its thresholds are a flat 0.5), served by the real `cxr app` command on
a loopback port. The
uploads are distinct synthetic 128 px chest renderings, so every request is scored (no record
hit) unless said otherwise. In one run:
  * latency: one client, one upload at a time: p50/p95 of POST /api/v1/studies until the JSON
    has arrived (stream, hash, decode, precheck, forward, gate, row, overlay, thumbnail, the
    app's pictures, JSON and the Parquet part all inside);
  * throughput: studies/s of 1 client uploading one at a time, and of 8 clients at once (their
    uploads share forward passes: app.batch_window_ms), and the ratio;
  * a repeated upload (answered from the record), p50.
Writes benchmarks/results/app.json (with the machine's load average: it is shared).

    .venv/bin/python benchmarks/bench_app.py --paging 100000

Runs of any size instead: a synthetic run of that many studies (schema-correct rows written
straight into Parquet, no model: as one finished scores.parquet, and as parts of 1,000 rows),
its run index written as a run's finish writes it, served by the real `cxr app`. Times the run
page and the API's first page (target <= 1 s each), a deep page, a sort by study id, the runs
list, a study page; cold (first request after the app started) and warm. Writes
benchmarks/results/app_paging.json.
"""

from __future__ import annotations

import argparse
import contextlib
import concurrent.futures as cf
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_score import bench_params, make_models, make_studies  # noqa: E402
from benchmarks.harness import publish  # noqa: E402


def write_synthetic_run(folder: Path, n: int, *, part_rows: int | None = None, seed: int = 0,
                        run_id: str = "synthetic") -> Path:
    """A scoring store of n made-up but schema-correct studies: scores.parquet, or parts of
    `part_rows` rows (parts/part-<run_id>-<i>.parquet, as a run writes them). About 10% rejected,
    a third of the scored flagged; distinct sha256 per study."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxr.core.labels import LABEL_COLUMNS, PATHOLOGIES
    from tasks.scoring.rows import BOX_COLUMNS, FLAG_COLUMNS, SCHEMA

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    ids = np.array([f"{run_id}_{i:07d}.png" for i in range(n)], dtype=object)
    rejected = rng.random(n) < 0.1
    probs = rng.beta(0.6, 4.0, (n, len(LABEL_COLUMNS))).astype(np.float32)
    flags = (probs >= 0.45) & ~rejected[:, None]
    names = np.array(PATHOLOGIES, dtype=object)
    flagged = np.array([", ".join(names[f]) for f in flags], dtype=object)
    masked = np.where(flags, probs, -1.0).max(axis=1)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    start = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    cols = {
        "study_id": ids, "source_path": ids, "sha256": np.array([f"{seed:08x}{i:056x}" for i in range(n)], dtype=object),
        "model_digest": np.full(n, "0" * 64, dtype=object),
        "status": np.where(rejected, "rejected", "scored").astype(object),
        "reason": np.where(rejected, "not a chest radiograph (synthetic)", None).astype(object),
        "scored_at": [start + dt.timedelta(seconds=int(i)) for i in range(n)],
        "run_id": np.full(n, run_id, dtype=object),
        "image_height": np.full(n, 1024, np.int32), "image_width": np.full(n, 1024, np.int32),
        **{c: rng.integers(0, 1024, n).astype(np.int32) for c in BOX_COLUMNS},
        **{c: probs[:, k] for k, c in enumerate(LABEL_COLUMNS)},
        **{c: flags[:, k] for k, c in enumerate(FLAG_COLUMNS)},
        "flagged": flagged, "max_flagged_probability": np.where(masked >= 0, masked, np.nan).astype(np.float32),
        "top_findings": np.array([", ".join(names[t]) for t in top], dtype=object),
        "ood_score": rng.gamma(2.0, 2.0, n).astype(np.float32), "ood_flag": rng.random(n) < 0.02,
        "ood_statement": np.full(n, None, dtype=object),
        "overlay": np.array([f"overlays/{i}.png" for i in ids], dtype=object),
        "thumbnail": np.array([f"thumbs/{i}.png" for i in ids], dtype=object),
        "json": np.array([f"studies/{i}.json" for i in ids], dtype=object)}
    arrays = []
    for field in SCHEMA:
        values = cols[field.name]
        mask = None
        if field.name in ("max_flagged_probability",):
            mask = np.isnan(values)
        elif field.name in ("box_y0", "box_x0", "box_y1", "box_x1", "image_height", "image_width"):
            mask = rejected
        elif field.name in LABEL_COLUMNS or field.name in FLAG_COLUMNS or field.name in ("ood_score", "ood_flag"):
            mask = rejected
        arrays.append(pa.array(values, field.type, mask=mask))
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)
    if part_rows is None:
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / "scores.parquet")
    else:
        (folder / "parts").mkdir(parents=True, exist_ok=True)
        for i, lo in enumerate(range(0, n, part_rows)):
            pq.write_table(table.slice(lo, part_rows), folder / "parts" / f"part-{run_id}-{i:05d}.parquet")
    return folder


def _timed_get(client: httpx.Client, path: str) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = client.get(path)
    return time.perf_counter() - start, response


def paging(n: int, repeats: int = 7) -> None:
    """The paging benchmark (see the module's docstring)."""
    from tasks.scoring.run_index import update_index

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-app-paging-") as tmp:
        tmp = Path(tmp)
        params = bench_params(tmp / "models", 128, 16, overlay_size=384)  # as app.json was measured
        runs = tmp / "runs"
        params = params.model_copy(update={
            "paths": params.paths.model_copy(update={"roots": (*params.paths.roots, tmp)}),
            "app": params.app.model_copy(update={"store": tmp / "store", "runs": (runs,)})})
        make_models(tmp / "models", params)
        start = time.perf_counter()
        write_synthetic_run(runs / "big", n, run_id="big")
        write_synthetic_run(runs / "inparts", n, part_rows=1000, seed=1, run_id="inparts")
        written = time.perf_counter() - start
        index_s = {}
        for name in ("big", "inparts"):  # what a run's finish does once: write the run index
            start = time.perf_counter()
            update_index(runs / name)
            index_s[name] = round(time.perf_counter() - start, 3)
        params_file = tmp / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
        result = {}
        with served_app(params_file) as url:
            with httpx.Client(base_url=url, timeout=120) as client:
                for run in ("big", "inparts"):
                    paths = {"run_page": f"/runs/{run}", "api_first_page": f"/api/v1/runs/{run}/studies?limit=100",
                             "api_deep_page": f"/api/v1/runs/{run}/studies?offset={n - 100}&limit=100",
                             "run_page_sorted_by_study_id": f"/runs/{run}?sort=study_id&order=asc&offset=5000",
                             "runs_list": "/api/v1/runs"}
                    timings = {}
                    for key, path in paths.items():
                        cold, response = _timed_get(client, path)
                        assert response.status_code == 200, (path, response.status_code, response.text[:300])
                        warm = sorted(_timed_get(client, path)[0] for _ in range(repeats))
                        timings[key] = {"first_s": round(cold, 3), "warm_p50_s": round(warm[len(warm) // 2], 3),
                                        "bytes": len(response.content)}
                    body = client.get(paths["api_first_page"]).json()
                    page = client.get(paths["run_page"]).text
                    rows_shown = page.count('<tr class="scored"') + page.count('<tr class="rejected"')
                    study = body["studies"][0]["page"]
                    cold, response = _timed_get(client, study)
                    timings["study_page"] = {"first_s": round(cold, 3), "status": response.status_code}
                    result[run] = {"total": body["total"], "run_page_rows_shown": rows_shown, "timings": timings,
                                   "has_next_link": 'rel="next"' in page}
    worst = max(result[r]["timings"][k]["first_s"] for r in result for k in ("run_page", "api_first_page"))
    publish("app_paging", {
        "what": f"a synthetic run of {n:,} studies served by the real `cxr app` (2-core shared machine); 'big' is "
                "one finished scores.parquet, 'inparts' the same count as parts of 1,000 rows; times are the client's "
                "wall seconds per request, first = the first request after the app started (index read from disk)",
        "cpu_cores": os.cpu_count(),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "studies": n, "write_run_s": round(written, 2), "run_index_write_s": index_s, "runs": result,
        "target_first_page_s": 1.0, "worst_first_page_s": worst, "meets_target": worst <= 1.0})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served_app(params_file: Path):
    """The real `cxr --params FILE app` on a free loopback port, once /healthz answers; yields its
    base URL and stops it with SIGINT (a clean shutdown) on the way out."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("CXR_APP_TOKEN", None)
    server = subprocess.Popen([str(Path(sys.executable).parent / "cxr"), "--params", str(params_file), "app",
                               "--port", str(port)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"cxr app exited with {server.returncode}")
            time.sleep(0.2)
        yield url
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def _post(client: httpx.Client, path: Path) -> tuple[float, int]:
    data = path.read_bytes()
    start = time.perf_counter()
    response = client.post("/api/v1/studies", files={"file": (path.name, data, "image/png")})
    response.json()
    return time.perf_counter() - start, response.status_code


def _clients(url: str, groups: list[list[Path]]) -> tuple[float, list[int]]:
    """Each group uploaded one at a time by its own client, all clients at once: (wall s, codes)."""
    def run(paths):
        with httpx.Client(base_url=url, timeout=300) as client:
            return [_post(client, p)[1] for p in paths]

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(len(groups)) as pool:
        codes = [c for chunk in pool.map(run, groups) for c in chunk]
    return time.perf_counter() - start, codes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=int, default=100, help="sequential uploads timed one by one")
    parser.add_argument("--concurrent", type=int, default=240, help="uploads spread over 8 clients")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--paging", type=int, default=None, metavar="N",
                        help="instead: page a synthetic run of N studies (benchmarks/results/app_paging.json)")
    args = parser.parse_args()
    if args.paging:
        paging(args.paging)
        return

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        tmp = Path(tmp)
        params = bench_params(tmp / "models", 128, 16, overlay_size=384)  # as app.json was measured
        params = params.model_copy(update={
            "paths": params.paths.model_copy(update={"roots": (*params.paths.roots, tmp)}),
            "app": params.app.model_copy(update={"store": tmp / "store", "runs": (tmp / "runs",)})})
        make_models(tmp / "models", params)
        n = 10 + args.latency + args.concurrent + 1
        inputs = sorted(make_studies(tmp / "inputs", n, 128).glob("*.png"))
        params_file = tmp / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))

        with served_app(params_file) as url:
            warm, timed = inputs[:10], inputs[10 : 10 + args.latency]
            rest = inputs[10 + args.latency : 10 + args.latency + args.concurrent]
            with httpx.Client(base_url=url, timeout=300) as client:
                for path in warm:
                    _post(client, path)
                health0 = client.get("/healthz").json()
                start = time.perf_counter()
                results = [_post(client, p) for p in timed]
                single_wall = time.perf_counter() - start
                health1 = client.get("/healthz").json()
                repeats = [_post(client, p) for p in timed[:30]]
            latencies = np.array([t for t, _ in results]) * 1000
            codes = [c for _, c in results] + [c for _, c in repeats]
            groups = [rest[i :: args.clients] for i in range(args.clients)]
            concurrent_wall, more = _clients(url, groups)
            health2 = httpx.get(f"{url}/healthz").json()
        codes += more
        assert not [c for c in codes if c != 200], sorted(set(codes))
        single = len(timed) / single_wall
        concurrent = len(rest) / concurrent_wall
        passes = health2["forward_passes"] - health1["forward_passes"]
        publish("app", {
            "profile": "demo: resnet18 AG-CNN, 128 px input, overlay_size 384, score.batch_size 16, random registered weights",
            "cpu_cores": os.cpu_count(),
            # The machine is shared: a 1-minute load average over the core count means other work
            # took cores during the run, which inflates latency and flattens the client ratio.
            "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
            "uploads": "distinct synthetic 128 px chest renderings (PNG), POST /api/v1/studies to the real `cxr app`",
            "batch_window_ms": params.app.batch_window_ms, "store_pixels": params.app.store_pixels,
            "latency_ms": {"n": len(timed), "p50": round(float(np.percentile(latencies, 50)), 1),
                           "p95": round(float(np.percentile(latencies, 95)), 1),
                           "mean": round(float(latencies.mean()), 1), "min": round(float(latencies.min()), 1)},
            "target_p50_ms": 250, "meets_target": bool(np.percentile(latencies, 50) <= 250),
            "repeated_upload_p50_ms": round(statistics.median(t for t, _ in repeats) * 1000, 1),
            "throughput": {"one_client_studies_per_s": round(single, 2),
                           f"{args.clients}_clients_studies_per_s": round(concurrent, 2),
                           "ratio": round(concurrent / single, 2),
                           f"{args.clients}_clients_uploads": len(rest),
                           f"{args.clients}_clients_forward_passes": passes,
                           "mean_uploads_per_forward": round(len(rest) / max(1, passes), 2),
                           "one_client_forward_passes": health1["forward_passes"] - health0["forward_passes"]},
            "status_codes": sorted(set(codes)),
        })


if __name__ == "__main__":
    main()
