"""`cxr ingest` + `cxr split` on the full NIH metadata (112,120 rows) against a running local
Prefect server: wall time of the two commands together versus the issue's 30 s budget.

Run: .venv/bin/python benchmarks/bench_ingest_split.py   (starts and stops its own server)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import prefect_server, publish  # noqa: E402

BUDGET_S = 30.0


def main() -> None:
    from tasks.metadata.ingest import packaged_metadata_path

    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        with prefect_server(tmp):
            server_s = time.perf_counter() - t0
            # After the server is up: its URL is in os.environ for the `cxr` subprocesses.
            env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
            timings = {}
            for name, args in (
                ("ingest", ["ingest", "--metadata", str(packaged_metadata_path()), "--out", str(tmp / "interim")]),
                ("split", ["split", "--metadata", str(tmp / "interim/metadata.parquet"), "--out", str(tmp / "processed")]),
            ):
                t0 = time.perf_counter()
                done = subprocess.run([str(bin_dir / "cxr"), *args], cwd=ROOT, env=env, capture_output=True, text=True)
                timings[name] = round(time.perf_counter() - t0, 2)
                if done.returncode != 0:
                    raise SystemExit(f"cxr {name} failed:\n{done.stderr[-3000:]}")
            summary = json.loads(done.stdout)
    total = timings["ingest"] + timings["split"]
    result = {
        "benchmark": "cxr ingest + cxr split, full NIH metadata (112,120 rows), running local Prefect server",
        "ingest_s": timings["ingest"], "split_s": timings["split"], "total_s": round(total, 2),
        "budget_s": BUDGET_S, "budget_over_measured": round(BUDGET_S / total, 2),
        "server_start_s": round(server_s, 2), "split_images": summary["images"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_1min": os.getloadavg()[0]},
    }
    publish("ingest_split", result)
    print(f"ingest + split: {total:.1f} s against a {BUDGET_S:.0f} s budget ({BUDGET_S / total:.2f}x headroom)")


if __name__ == "__main__":
    main()
