"""Scoring at the compute limit: end-to-end studies/s over the model's forward-only studies/s.

    .venv/bin/python benchmarks/bench_score.py [--studies 1000] [--size 128] [--batch 16]
    .venv/bin/python benchmarks/bench_score.py --profile 300     # cProfile of one in-process run

The demo profile (ResNet-18 AG-CNN, 128 px network input, score.batch_size, overlay_size 384)
with random weights, registered as a real model bundle (tasks.training.registration) with an
out-of-distribution gate fitted on synthetic renderings and flat 0.5 thresholds (there is no
training split to fit either on), over `--studies` distinct synthetic 128 px chest renderings
(tasks/metadata/synth.py) in a temp folder. In one run, on the same model, input size and
batch:
  * forward-only: the AG-CNN forward over the studies' network inputs already in memory
    (uint8 tensors; no decode, no gate, no output) - what the hardware can do;
  * end to end, in-process: `score_studies` + `write_report` (decode, precheck, forward,
    gate, rows, overlays, thumbnails, JSON, Parquet parts, both GE gates, report);
  * end to end, the `score` flow against a real Prefect server (the `cxr score` path, with the
    Prefect task runs and artifacts), timed inside the process;
  * one study at a time (score.batch_size 1) on a subset, for the batched-over-single ratio.
Peak memory: max RSS of child processes scoring --small and --large studies.
Writes benchmarks/results/score.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import prefect_server, publish  # noqa: E402
from cxr.core.config import Params  # noqa: E402
from cxr.core.labels import PATHOLOGIES  # noqa: E402


def bench_params(models_dir: Path, image_size: int, batch_size: int, overlay_size: int = 384) -> Params:
    return Params.model_validate({"paths": {"models": str(models_dir), "roots": ["data", str(models_dir.parent)]},
                                  "model": {"backbone": "resnet18", "image_size": image_size, "local_size": image_size},
                                  "train": {"device": "cpu"},
                                  "score": {"batch_size": batch_size, "overlay_size": overlay_size}})


def render_studies(n: int, side: int = 128, seed: int = 0) -> list[np.ndarray]:
    """n distinct synthetic chest renderings (uint8 (side, side)), 0-2 findings each, as the demo draws them."""
    from tasks.metadata.synth import FINDING_STYLE, anatomy, render_image

    rng = np.random.default_rng(seed)
    names = sorted(FINDING_STYLE)
    out = []
    for _ in range(n):
        findings = list(rng.choice(names, size=int(rng.integers(0, 3)), replace=False))
        out.append(render_image(side, anatomy(side, rng), findings, rng)[0])
    return out


def make_studies(folder: Path, n: int, side: int = 128, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(render_studies(n, side, seed)):
        Image.fromarray(pixels).save(folder / f"study_{i:05d}.png")
    return folder


def make_models(models_dir: Path, params: Params) -> dict:
    """Random AG-CNN weights registered as a bundle (scoring reads only bundles): the real
    `register`, with the two fits that need a training split replaced (there is none here):
    the OOD gate is fitted on the model's pooled features of synthetic renderings, and the
    thresholds are a flat 0.5. Returns the bundle's manifest."""
    import torch

    import tasks.training.registration as registration
    from models.branch import build_branch
    from models.fusion import FusionHead
    from tasks.bundle.weights import save_weights

    torch.manual_seed(0)
    models_dir.mkdir(parents=True, exist_ok=True)
    meta = {"backbone": "resnet18", "image_size": params.model.image_size, "local_size": params.model.local_size}
    save_weights(build_branch("resnet18"), models_dir / "global.safetensors", {**meta, "stage": "global"})
    save_weights(build_branch("resnet18"), models_dir / "local.safetensors", {**meta, "stage": "local"})
    save_weights(FusionHead(512, 512), models_dir / "fusion.safetensors", {**meta, "stage": "fusion"})
    real = registration.fit_model_gate, registration.fit_thresholds
    registration.fit_model_gate, registration.fit_thresholds = _synthetic_gate, _flat_thresholds
    try:
        return registration.register(params)
    finally:
        registration.fit_model_gate, registration.fit_thresholds = real


def _flat_thresholds(params: Params, model, device) -> dict:
    from tasks.bundle.thresholds import rule_key

    return {"rule": rule_key(params.score), "data_version": "benchmark", "valid_images": 0,
            "classes": {p: {"threshold": 0.5, "source": "benchmark"} for p in PATHOLOGIES}}


def _synthetic_gate(params: Params, digest: str):
    import torch

    from tasks.bundle.ood_gate import fit_gate
    from tasks.bundle.weights import load_agcnn
    from tasks.images.geometry import to_input

    model = load_agcnn(params.paths.models, params.model)
    with torch.inference_mode():
        pixels = torch.from_numpy(np.stack(render_studies(192, params.model.image_size, seed=1)))
        pooled = model.global_branch(to_input(pixels)).pooled.numpy()
    return fit_gate(pooled[:128], pooled[128:], digest, params.score.ood_false_rejection)


def forward_only(params: Params, inputs: Path, batch: int, limit: int | None = None) -> tuple[float, float]:
    """(studies per wall second, per CPU second) of the AG-CNN forward alone on the first
    `limit` studies' network inputs, already in memory: a steady per-batch rate, so a few
    hundred studies measure it as well as thousands."""
    import torch

    from tasks.bundle.registry import load_bundle
    from tasks.images.geometry import network_pixels_from_image as network_pixels
    from tasks.images.geometry import to_input
    from tasks.images.loader import load_image

    bundle = load_bundle(params.paths.models)  # the weights scoring uses, at their geometry
    model = bundle.agcnn()
    files = sorted(inputs.iterdir())[:limit]
    pixels = torch.from_numpy(np.stack([network_pixels(load_image(p), bundle.model) for p in files]))
    with torch.inference_mode():
        model(to_input(pixels[:batch]))  # first-call costs
        with timer() as t:
            for i in range(0, len(pixels), batch):
                model(to_input(pixels[i : i + batch]))
    return len(pixels) / t["wall"], len(pixels) / t["cpu"]


@contextmanager
def timer():
    """Wall seconds and this process's CPU seconds (all its threads) of the block."""
    out = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield out
    out.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)


def in_process(params: Params, inputs: Path, out: Path) -> float:
    from tasks.scoring.report import write_report
    from tasks.scoring.run import score_studies

    shutil.rmtree(out, ignore_errors=True)
    with timer() as t:
        summary = score_studies(params, inputs, out)
        write_report(out, summary)
    assert summary["scored"] + summary["rejected"] == summary["files_found"], summary
    _check_outputs(out, summary)
    return summary["files_found"] / t["wall"], summary["files_found"] / t["cpu"]


def via_flow(params: Params, inputs: Path, out: Path) -> float:
    from flows.score import score_flow

    shutil.rmtree(out, ignore_errors=True)
    with timer() as t:
        summary = score_flow(params, inputs, out)
    _check_outputs(out, summary)
    return summary["files_found"] / t["wall"], summary["files_found"] / t["cpu"]


def _check_outputs(out: Path, summary: dict) -> None:
    """Every study's outputs were written: the benchmark must not win by skipping work."""
    import pandas as pd

    df = pd.read_parquet(out / "scores.parquet")
    scored = df[df["status"] == "scored"]
    assert len(df) == summary["files_found"] and (out / "report.html").exists(), "missing rows or report"
    assert all((out / r).is_file() for c in ("json", "overlay", "thumbnail") for r in scored[c]), "missing outputs"


def child(args) -> None:
    """Score args.child studies in this process; print throughput and peak RSS (MiB)."""
    work = Path(args.work)
    params = bench_params(work / "models", args.size, args.batch)
    rate = in_process(params, work / f"studies_{args.child}", work / f"out_{args.child}")[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"studies": args.child, "studies_per_s": rate, "peak_rss_mib": peak}))


def profile(args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        work = Path(tmp)
        params = bench_params(work / "models", args.size, args.batch)
        make_models(work / "models", params)
        inputs = make_studies(work / "studies", args.profile)
        in_process(params, make_studies(work / "warm", 16, seed=2), work / "out_warm")
        prof = cProfile.Profile()
        prof.enable()
        rate = in_process(params, inputs, work / "out")[0]
        prof.disable()
        print(f"{args.profile} studies: {rate:.1f} studies/s; forward only {forward_only(params, inputs, args.batch)[0]:.1f}")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128, help="network input size (px), the demo's 128")
    ap.add_argument("--batch", type=int, default=16, help="score.batch_size, the demo's 16")
    ap.add_argument("--studies", type=int, default=1000, help="studies in the end-to-end runs")
    ap.add_argument("--single-studies", type=int, default=32, help="studies scored one at a time")
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--large", type=int, default=800)
    ap.add_argument("--forward-studies", type=int, default=256, help="studies in each forward-only measurement")
    ap.add_argument("--skip-flow", action="store_true", help="leave out the run through the Prefect flow")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the peak-memory children")
    ap.add_argument("--profile", type=int)
    ap.add_argument("--child", type=int)
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.profile:
        return profile(args)

    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp, prefect_server(Path(tmp)):
        work = Path(tmp)
        params = bench_params(work / "models", args.size, args.batch)
        make_models(work / "models", params)
        inputs = make_studies(work / "studies", args.studies)
        in_process(params, make_studies(work / "warm", 16, seed=2), work / "out_warm")  # first-call costs

        load = os.getloadavg()[0]
        # Forward-only before and after the end-to-end runs: their mean is the baseline, so a
        # change in the machine's load during the run weighs on both sides alike.
        fwd = [forward_only(params, inputs, args.batch, args.forward_studies)]
        rate_flow, cpu_flow = (float("nan"),) * 2 if args.skip_flow else via_flow(params, inputs, work / "out_flow")
        rate_e2e, cpu_e2e = in_process(params, inputs, work / "out")
        fwd.append(forward_only(params, inputs, args.batch, args.forward_studies))
        rate_forward, cpu_forward = (float(np.mean([f[k] for f in fwd])) for k in (0, 1))
        print(f"{args.studies} studies, batch {args.batch}, {args.size} px: forward only {rate_forward:.1f} studies/s "
              f"({fwd[0][0]:.1f} before, {fwd[1][0]:.1f} after); end to end in-process {rate_e2e:.1f} "
              f"({rate_e2e / rate_forward:.2f}), through the Prefect flow {rate_flow:.1f} ({rate_flow / rate_forward:.2f}); "
              f"per CPU second: {cpu_e2e / cpu_forward:.2f} and {cpu_flow / cpu_forward:.2f}")

        subset = work / "subset"
        subset.mkdir()
        for p in sorted(inputs.iterdir())[: args.single_studies]:
            shutil.copyfile(p, subset / p.name)
        rate_single = in_process(bench_params(work / "models", args.size, 1), subset, work / "out_single")[0]
        rate_batched = in_process(params, subset, work / "out_batched")[0]
        print(f"{args.single_studies} studies: batched {rate_batched:.1f} studies/s, one at a time {rate_single:.1f}")

        memory = {}
        for n in () if args.skip_memory else (args.small, args.large):
            shutil.copytree(inputs, work / f"studies_{n}", ignore=lambda d, names: sorted(names)[n:])
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--work", str(work), "--size", str(args.size),
                                   "--batch", str(args.batch)], capture_output=True, text=True, check=True)
            memory[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{n} studies: peak RSS {memory[n]['peak_rss_mib']:.0f} MiB, {memory[n]['studies_per_s']:.1f} studies/s")
        growth = memory[args.large]["peak_rss_mib"] / memory[args.small]["peak_rss_mib"] - 1 if memory else None

    result = {
        "device": "cpu", "network_input_px": args.size, "study_px": 128, "batch_size": args.batch, "overlay_size": 384,
        "studies": args.studies,
        "forward_only_studies_per_s": round(rate_forward, 2),
        "end_to_end_studies_per_s": round(rate_e2e, 2),
        "end_to_end_over_forward": round(rate_e2e / rate_forward, 3),
        "forward_only_studies": args.forward_studies,
        **({} if args.skip_flow else {"flow_studies_per_s": round(rate_flow, 2),
                                       "flow_over_forward": round(rate_flow / rate_forward, 3),
                                       "cpu_flow_over_forward": round(cpu_flow / cpu_forward, 3)}),
        "forward_only_runs_studies_per_s": [round(f[0], 2) for f in fwd],
        # Studies per CPU second (all threads): less sensitive to other processes on the machine.
        "cpu_end_to_end_over_forward": round(cpu_e2e / cpu_forward, 3),
        "load_average_at_start": round(load, 2), "cpu_cores": os.cpu_count(),
        "target_end_to_end_over_forward": 0.5,
        "throughput_studies": args.single_studies,
        "batched_studies_per_s": round(rate_batched, 2), "single_studies_per_s": round(rate_single, 2),
        "batched_over_single": round(rate_batched / rate_single, 2), "target_batched_over_single": 3.0,
        **({"peak_rss_mib": {str(n): round(m["peak_rss_mib"], 1) for n, m in memory.items()},
            "peak_rss_growth": round(growth, 4), "target_peak_rss_growth": 0.10} if memory else {}),
        "notes": "forward only: the AG-CNN forward on in-memory uint8 inputs; end to end: decode, precheck, forward, "
                 "OOD gate, rows, overlays, thumbnails, JSON, Parquet, both GE gates and the HTML report "
                 "(in-process score_studies + write_report); flow: the same through the Prefect `score` flow "
                 "against a local Prefect server, with its task runs and artifacts. Timed inside one process "
                 "(interpreter start-up and imports excluded).",
    }
    publish("score", result)


if __name__ == "__main__":
    main()
