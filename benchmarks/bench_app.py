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
"""

from __future__ import annotations

import argparse
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        tmp = Path(tmp)
        params = bench_params(tmp / "models", 128, 16)
        params = params.model_copy(update={
            "paths": params.paths.model_copy(update={"roots": (*params.paths.roots, tmp)}),
            "app": params.app.model_copy(update={"store": tmp / "store", "runs": (tmp / "runs",)})})
        make_models(tmp / "models", params)
        n = 10 + args.latency + args.concurrent + 1
        inputs = sorted(make_studies(tmp / "inputs", n, 128).glob("*.png"))
        params_file = tmp / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))

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
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
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
