"""How long a bad metadata file takes to be refused: the CLI's quick look against the paths it
replaces as the first answer.

    python benchmarks/bench_first_answer.py [--repeats 3]   # writes benchmarks/results/first_answer.json

Three ways to refuse the same file (the shared NIH sample's CSV with one age set to 4000), each
a fresh process, timed from start to exit, median of `--repeats`:
  * quick: `cxr ingest` with no Prefect server configured: the suite's quick look refuses it
    before Great Expectations or Prefect load;
  * gate: the Great Expectations gate alone (`run_ingest` in a plain Python process);
  * flow: the ingest flow under an ephemeral Prefect server (what `cxr ingest` did before).
Each must fail with the same message. The ratios (gate / quick, flow / quick) are the result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import ROOT, publish  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "nih-sample-64" / "Data_Entry_sample.csv"
MESSAGE = "age outside 0–120: 4000"


def _timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    took = time.perf_counter() - start
    if run.returncode == 0 or MESSAGE not in run.stdout + run.stderr:
        raise SystemExit(f"{cmd[:3]} did not refuse the file as expected:\n{run.stdout}\n{run.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        frame = pd.read_csv(SAMPLE)
        frame.loc[3, "Patient Age"] = 4000
        bad = tmp / "bad.csv"
        frame.to_csv(bad, index=False)
        env.update(PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        py = sys.executable
        ways = {
            "quick": [str(Path(py).parent / "cxr"), "ingest", "--metadata", str(bad), "--out", str(tmp / "q")],
            "gate": [py, "-c", f"from tasks.metadata.ingest import run_ingest; run_ingest({str(bad)!r}, {str(tmp / 'g')!r})"],
            "flow": [py, "-c", f"from flows.data import ingest_flow; ingest_flow({str(bad)!r}, {str(tmp / 'f')!r})"],
        }
        times = {name: [_timed(cmd, env) for _ in range(args.repeats)] for name, cmd in ways.items()}
    med = {name: round(statistics.median(t), 2) for name, t in times.items()}
    publish("first_answer", {
        "what": "seconds from process start to the refusal of a metadata CSV with one bad age (median)",
        "repeats": args.repeats, "seconds": med, "all_seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "gate_over_quick": round(med["gate"] / med["quick"], 2), "flow_over_quick": round(med["flow"] / med["quick"], 2),
        "load_average_at_end": os.getloadavg()[0], "cpus": os.cpu_count(),
    })


if __name__ == "__main__":
    main()
