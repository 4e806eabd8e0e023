"""What every benchmark shares: where its result goes, and a Prefect server of its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

from cxr.core.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def publish(name: str, result: dict) -> Path:
    """Write `benchmarks/results/<name>.json` atomically (a stopped run leaves the previous
    result whole) and echo it."""
    out = RESULTS / f"{name}.json"
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def prefect_server(tmp: Path):
    """A Prefect server of the project's own script under `tmp`; flows, `cxr` subprocesses and
    Dask workers started from this process report to it."""
    env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"), CXR_PREFECT_PORT=str(_free_port()))
    url = subprocess.run([str(ROOT / "scripts/prefect-server.sh"), "start"], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    # Set before Prefect is imported, here and in the Dask workers (spawned from this process).
    os.environ.update(PREFECT_API_URL=url, PREFECT_HOME=env["PREFECT_HOME"], PREFECT_LOGGING_LEVEL="WARNING")
    try:
        yield url
    finally:
        subprocess.run([str(ROOT / "scripts/prefect-server.sh"), "stop"], env=env, check=False, capture_output=True)
