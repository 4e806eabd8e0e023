"""The demo's figures with their spread: the whole demo pipeline run for 3 seeds.

Measured: for each seed (params `seed`: the demo's own from params.yaml, then two others), the
demo pipeline (`cxr pipeline`, the same commands `make demo` / `dvc repro` runs stage by stage)
in a temporary workspace of its own, with params.yaml copied and only `seed` and the paths
changed. The synthetic data are generated from the seed too: a seed is the whole run. From each
run's `evaluate.json`: the test mean AUROC of the global, local and fusion branches, the fusion
expected calibration error before and after calibration, and the out-of-distribution marks (the
share of the held-out real NIH radiographs marked unlike the training data, the share of the
model's own test images marked). Then mean and sample standard deviation (ddof=1) over the seeds,
and a markdown table of them for the README.

The figures differ by host (CPU kernels are chosen per machine, so the bits do), not only by seed;
this gives the spread a reader should expect. One seed takes about 7-8 minutes on 2 cores.

Run: .venv/bin/python benchmarks/bench_demo_seeds.py            (3 seeds, the demo's settings)
     .venv/bin/python benchmarks/bench_demo_seeds.py --quick    (a smoke run: 1 seed, 1 epoch a stage,
                                                                 printed only, never published)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import prefect_server, publish  # noqa: E402

# Two seeds besides the demo's own (the first is params.yaml's).
OTHER_SEEDS = (1, 2)

# (evaluate.json key, the README row's name); every one is a fraction or an AUROC in [0, 1].
FIGURES = (
    ("global_mean_auroc", "Test mean AUROC, global branch"),
    ("local_mean_auroc", "Test mean AUROC, local branch"),
    ("fusion_mean_auroc", "Test mean AUROC, fusion branch"),
    ("fusion_ece_uncalibrated", "Fusion ECE before calibration"),
    ("fusion_ece_calibrated", "Fusion ECE after calibration"),
    ("ood_real_sample_marked", "Real NIH radiographs marked unlike training data"),
    ("ood_test_marked", "Own test images marked unlike training data"),
)


def workspace_params(demo: dict, seed: int, workspace: Path, quick: bool) -> dict:
    """The demo's params with `seed` and every path moved into `workspace` (and its data root)."""
    params = json.loads(json.dumps(demo))  # a deep copy of plain YAML data
    params["seed"] = seed
    paths = params["paths"]
    for key, value in paths.items():
        if key != "roots":
            paths[key] = str(workspace / value)
    paths["roots"] = [str(workspace / "data")]
    if quick:
        for stage in ("global", "local", "fusion"):
            params["train"][stage]["epochs"] = 1
    return params


def run_seed(demo: dict, seed: int, quick: bool) -> dict:
    """One whole demo pipeline for `seed` in a fresh workspace; its evaluate.json figures."""
    with tempfile.TemporaryDirectory(prefix=f"cxr-seed{seed}-") as tmp:
        workspace = Path(tmp)
        params = workspace_params(demo, seed, workspace, quick)
        params_file = workspace / "params.yaml"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        log = workspace / "pipeline.log"
        start = time.monotonic()
        with log.open("w") as out:
            # The `cxr` of this interpreter's environment (the project's .venv).
            done = subprocess.run([str(Path(sys.executable).parent / "cxr"), "--params", str(params_file), "pipeline"],
                                  cwd=workspace, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - start
        if done.returncode != 0:
            sys.exit(f"seed {seed}: `cxr pipeline` exited {done.returncode}; its last output:\n"
                     + "\n".join(log.read_text().splitlines()[-30:]))
        metrics = json.loads((Path(params["paths"]["metrics"]) / "evaluate.json").read_text())
    missing = [key for key, _ in FIGURES if key not in metrics]
    if missing:
        sys.exit(f"seed {seed}: evaluate.json lacks {', '.join(missing)}")
    return {"seed": seed, "pipeline_s": round(seconds, 1), "model_digest": metrics["model_digest"],
            "test_images": metrics["test_images"], **{key: metrics[key] for key, _ in FIGURES}}


def spread(runs: list[dict]) -> dict:
    """Mean and sample sd (ddof=1) over the seeds of each figure; None where a run has none."""
    out = {}
    for key, _ in FIGURES:
        values = [r[key] for r in runs if r[key] is not None and not math.isnan(r[key])]
        out[key] = {"mean": round(statistics.mean(values), 4) if values else None,
                    "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
                    "n": len(values)}
    return out


def markdown(runs: list[dict], summary: dict) -> str:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [f"Mean ± sd over {len(runs)} seeds ({seeds}; sample sd), `benchmarks/bench_demo_seeds.py`:", "",
             "| Figure (test split) | mean ± sd | " + " | ".join(f"seed {r['seed']}" for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for key, name in FIGURES:
        s = summary[key]
        cell = "n/a" if s["mean"] is None else f"{s['mean']:.3f}" + ("" if s["sd"] is None else f" ± {s['sd']:.3f}")
        lines.append(f"| {name} | {cell} | " + " | ".join("n/a" if r[key] is None else f"{r[key]:.3f}" for r in runs) + " |")
    return "\n".join(lines)


def code_revision() -> str:
    """The commit the code under ROOT is at, and whether files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return head + (f" with changes in {', '.join(changed)}" if changed else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch a stage, not published")
    parser.add_argument("--code", default=None, help="what code ran (default: the git commit of this checkout)")
    args = parser.parse_args()
    import torch

    demo = yaml.safe_load((ROOT / "params.yaml").read_text())
    seeds = [demo["seed"]] if args.quick else [demo["seed"], *OTHER_SEEDS]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cxr-seeds-prefect-") as tmp, prefect_server(Path(tmp)):
        runs = []
        for seed in seeds:
            runs.append(run_seed(demo, seed, args.quick))
            print(f"seed {seed}: " + ", ".join(f"{k} {runs[-1][k]}" for k, _ in FIGURES), flush=True)
    summary = spread(runs)
    table = markdown(runs, summary)
    result = {
        "benchmark": "demo pipeline (cxr pipeline, params.yaml) per seed in its own workspace; evaluate.json figures",
        "settings": "params.yaml as committed, seed and paths changed" + (" (quick: 1 epoch a stage)" if args.quick else ""),
        "code": args.code or code_revision(),
        "seeds": seeds,
        "runs": runs,
        "mean_sd": summary,
        "markdown": table,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(),
                    "loadavg_1min_before": round(load_before[0], 2), "loadavg_1min_after": round(os.getloadavg()[0], 2)},
    }
    if args.quick:
        print(json.dumps(result, indent=2))
    else:
        publish("demo_seeds", result)
    print("\n" + table)


if __name__ == "__main__":
    main()
