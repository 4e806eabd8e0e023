"""The whole archive: every stage of the pipeline over the real NIH metadata, at a tenth and at all of it.

    .venv/bin/python benchmarks/bench_archive.py --fraction 0.1
    .venv/bin/python benchmarks/bench_archive.py --fraction 1      # merged with the 0.1 result

What is measured. The NIH ChestX-ray14 metadata shipped in the torchxrayvision wheel
(`packaged_metadata_path`: 112,120 rows, 30,805 patients) at F = 1, or a seeded patient-level
sample of F of its patients, rendered as synthetic 32-px chest radiographs by the project's own
`synthesize` (the `cxr synth` step; its time is recorded as the "synth" stage, the setup). Then
every stage runs through the project's real functions, the ones `cxr pipeline`
(flows/pipeline.py) calls, in-process without Prefect:

    ingest (run_ingest, GE gate) -> split (run_split, GE gate) -> image cache
    (build_image_cache) -> stage I (train_stage global) -> crop cache (build_crop_cache) ->
    stages II and III (train_stage local, fusion; one epoch each) -> register (the bundle
    scoring needs: OOD gate, calibration, thresholds) -> evaluation (evaluate) -> scoring of
    the test split's images (score_studies + write_report) -> the runs browser listing that
    run (app/runs.py: discover_runs, run_counts, the first page of run_page).

Each stage runs in a child process of its own, so the peak resident set (ru_maxrss of that
child alone, from os.wait4) is the stage's. Per stage: wall seconds (child start to exit,
imports included), peak RSS in MiB, rows and rows/s, and the 1-minute load average before and
after (the machine has 2 cores shared with other work).

Model: ResNet-18 (the smallest backbone) at image_size 32, local_size 32, CPU, one epoch per
stage at batch 64; image cache and crop cache at 32 px in 512-image shards. Reductions for
wall time on 2 cores, the same at both fractions: evaluation's bootstrap at 20 resamples
(params default 200), scoring overlays at 64 px (the smallest allowed; default 384).

Results: each fraction is a run of its own; `--fraction F` writes its stages under
"fractions"."F" of benchmarks/results/archive.json and keeps the other fractions already there,
then recomputes the ratios between neighbouring fractions ("ratios"."1_over_0.1", and
"0.1_over_0.01" when F = 0.01 was run too: the same 10x in rows, smaller). `--until STAGE`
runs the pipeline up to that stage only; such a fraction is marked "partial". `--only STAGE`
reruns one stage in the fraction's working folder left by its run (after a change to that
stage) and replaces that stage's record ("rerun_at" says when). Targets (issue 20): every stage's
time ratio <= 11; peak RSS ratio <= 1.5 for the streaming stages (image cache, crop cache,
scoring); training (stages I-III) reads its batches from the image cache's shards, its RSS not
growing with the rows (held here to the same <= 1.5; the MiB difference is given beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import RESULTS, publish  # noqa: E402

IMAGE_SIZE = 32
BOOTSTRAP = 20
OVERLAY = 64
BATCH = 64
SEED = 42

# (stage, what its rows are); the order the pipeline runs them in.
STAGES = [
    ("synth", "images rendered (setup)"), ("ingest", "metadata rows"), ("split", "metadata rows"),
    ("image_cache", "images cached"), ("stage_1", "train images (one epoch) + valid"), ("crop_cache", "images, 2 views each"),
    ("stage_2", "train images (one epoch) + valid"), ("stage_3", "train images (one epoch) + valid"),
    ("register", "train + valid images"), ("evaluate", "test + valid images"), ("score", "test studies scored"),
    ("runs_browser", "studies in the listed run"),
]
STREAMING = ("image_cache", "crop_cache", "score")
TRAINING = ("stage_1", "stage_2", "stage_3")
TIME_RATIO_MAX, RSS_RATIO_MAX = 11.0, 1.5


def archive_params(work: Path):
    from cxr.core.config import Params

    stage = {"epochs": 1, "batch_size": BATCH}
    return Params.model_validate({
        "seed": SEED,
        "paths": {name: str(work / name) for name in ("raw", "interim", "processed", "cache", "models", "metrics", "reports", "incoming")}
        | {"images": str(work / "raw" / "images"), "roots": [str(work)]},
        "model": {"backbone": "resnet18", "pretrained": "none", "image_size": IMAGE_SIZE, "local_size": IMAGE_SIZE},
        "train": {"device": "cpu", "workers": 0, "global": stage, "local": stage, "fusion": stage},
        "evaluate": {"bootstrap": BOOTSTRAP},
        "cache": {"image_size": IMAGE_SIZE, "shard_images": 512, "batch_size": 256},
        "score": {"overlay_size": OVERLAY},
    })


def _split_sizes(params) -> dict[str, int]:
    from tasks.metadata.split import read_splits

    return {k: int(v) for k, v in read_splits(Path(params.paths.processed) / "splits.parquet")["split"].value_counts().items()}


def _scoring_dirs(work: Path) -> tuple[Path, Path]:
    return work / "test_studies", work / "reports" / "scoring" / "archive"


# --------------------------------------------------------------------------- stages (child side)


def stage_synth(params, work: Path, fraction: float) -> dict:
    import pandas as pd

    from tasks.metadata.ingest import packaged_metadata_path
    from tasks.metadata.synth import synthesize

    patients = pd.read_csv(packaged_metadata_path(), usecols=["Patient ID"])["Patient ID"].nunique()
    chosen = patients if fraction >= 1 else max(1, round(fraction * patients))
    out = synthesize(packaged_metadata_path(), params.paths.raw, patients=chosen, image_size=IMAGE_SIZE,
                     max_images_per_patient=10**6, min_patients_per_class=0, seed=SEED)
    return {"rows": out["images"], "patients": out["patients"], "patients_in_metadata": int(patients)}


def stage_ingest(params, work: Path, fraction: float) -> dict:
    from tasks.metadata.ingest import run_ingest

    out = run_ingest(Path(params.paths.raw) / "Data_Entry_synth.csv", params.paths.interim)
    return {"rows": out["images"], "patients": out["patients"]}


def stage_split(params, work: Path, fraction: float) -> dict:
    from tasks.metadata.split import run_split

    run_split(Path(params.paths.interim) / "metadata.parquet", params.paths.processed, ratios=params.split.ratios(),
              tolerance=params.split.tolerance, seed=params.seed)
    sizes = _split_sizes(params)
    return {"rows": sum(sizes.values()), "split": sizes}


def stage_image_cache(params, work: Path, fraction: float) -> dict:
    from tasks.images.image_cache import build_image_cache
    from tasks.metadata.split import read_splits

    ids = read_splits(Path(params.paths.processed) / "splits.parquet")["image_id"].tolist()
    meta = build_image_cache(params.paths.images, ids, Path(params.paths.cache) / "images", params.cache.image_size,
                             params.cache.shard_images)
    return {"rows": meta["items"], "rejected": meta["rejected"]}


def _train(params, stage: str) -> dict:
    from tasks.training.stages import train_stage

    summary = train_stage(params, stage, progress=False)
    sizes = _split_sizes(params)
    epoch = summary["history"][-1]
    return {"rows": sizes["train"] + sizes["valid"], "train_images": sizes["train"], "valid_images": sizes["valid"],
            "train_seconds": epoch.get("train_seconds"), "epoch_seconds_with_validation": epoch.get("seconds"),
            "best_valid_mean_auroc": summary["best_valid_mean_auroc"]}


def stage_stage_1(params, work, fraction):
    return _train(params, "global")


def stage_crop_cache(params, work: Path, fraction: float) -> dict:
    from tasks.training.crop_cache import build_crop_cache

    meta = build_crop_cache(params)
    return {"rows": meta["items"], "rejected": meta["rejected"]}


def stage_stage_2(params, work, fraction):
    return _train(params, "local")


def stage_stage_3(params, work, fraction):
    return _train(params, "fusion")


def stage_register(params, work: Path, fraction: float) -> dict:
    from tasks.training.registration import register

    manifest = register(params)
    sizes = _split_sizes(params)
    return {"rows": sizes["train"] + sizes["valid"], "digest": manifest["digest"]}


def stage_evaluate(params, work: Path, fraction: float) -> dict:
    from tasks.evaluation.evaluate import evaluate

    report = evaluate(params, truth_boxes=[Path(params.paths.raw) / "boxes.csv"])
    return {"rows": report["test_images"] + report["validation"]["images"], "test_images": report["test_images"],
            "fusion_mean_auroc": report["branches"]["fusion"]["mean_auroc"]}


def stage_score(params, work: Path, fraction: float) -> dict:
    from tasks.scoring.report import write_report
    from tasks.scoring.run import score_studies

    inputs, out = _scoring_dirs(work)
    summary = score_studies(params, inputs, out)
    report = write_report(out, summary)
    return {"rows": int(summary.get("scored", 0)) + int(summary.get("rejected", 0)),
            "scored": summary.get("scored"), "rejected": summary.get("rejected"), "report": str(report)}


def stage_runs_browser(params, work: Path, fraction: float) -> dict:
    from app.runs import PAGE_SIZE, discover_runs, run_counts, run_page

    _, out = _scoring_dirs(work)
    t0 = time.perf_counter()
    runs = discover_runs((Path(params.paths.reports),), Path(params.paths.reports) / "app")
    listed = {name: run_counts(run) for name, run in runs.items()}
    mine = [name for name, run in runs.items() if Path(run.folder).resolve() == out.resolve()]
    if not mine:
        raise RuntimeError(f"the runs browser does not list the scoring run in {out} (found {sorted(runs)})")
    listing_s = time.perf_counter() - t0
    total, page = run_page(runs[mine[0]], offset=0, limit=PAGE_SIZE)
    return {"rows": int(total), "run": mine[0], "studies": listed[mine[0]]["studies"], "first_page_rows": len(page),
            "listing_s": round(listing_s, 3), "listing_and_first_page_s": round(time.perf_counter() - t0, 3)}


def run_child(stage: str, work: Path, fraction: float) -> None:
    params = archive_params(work)
    out = globals()[f"stage_{stage}"](params, work, fraction)
    (work / "stages").mkdir(exist_ok=True)
    (work / "stages" / f"{stage}.json").write_text(json.dumps(out, default=str))


# --------------------------------------------------------------------------- parent side


def link_test_studies(params, work: Path) -> int:
    """The test split's images hard-linked into a folder of their own (scoring's input); setup, not timed."""
    from tasks.metadata.split import read_splits

    inputs, _ = _scoring_dirs(work)
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    splits = read_splits(Path(params.paths.processed) / "splits.parquet")
    ids = splits.loc[splits["split"] == "test", "image_id"].tolist()
    for image_id in ids:
        os.link(Path(params.paths.images) / image_id, inputs / image_id)
    return len(ids)


def measure(stage: str, work: Path, fraction: float) -> dict:
    """Run one stage in a child process; its wall time and its own peak RSS (os.wait4)."""
    load_before = os.getloadavg()[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", stage, "--work", str(work),
                              "--fraction", str(fraction)], cwd=ROOT, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"stage {stage} failed (exit {child.returncode}); see its output above")
    out = json.loads((work / "stages" / f"{stage}.json").read_text())
    rows = int(out.pop("rows"))
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "rows": rows,
            "rows_per_s": round(rows / wall, 1), "load_1min_before": round(load_before, 2),
            "load_1min_after": round(os.getloadavg()[0], 2), **out}


def run_fraction(fraction: float, work: Path, until: str | None = None) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = archive_params(work)
    stages, t_all = {}, time.perf_counter()
    names = [name for name, _ in STAGES]
    for stage in names[: names.index(until) + 1 if until else len(names)]:
        if stage == "score":
            link_test_studies(params, work)
        print(f"[bench_archive F={fraction}] {stage} ...", file=sys.stderr, flush=True)
        stages[stage] = measure(stage, work, fraction)
        print(f"[bench_archive F={fraction}] {stage}: {json.dumps(stages[stage])}", file=sys.stderr, flush=True)
    return {"fraction": fraction, "rows": stages["ingest"]["rows"], "patients": stages["ingest"]["patients"],
            "split": stages["split"]["split"], "total_wall_s": round(time.perf_counter() - t_all, 1),
            "partial": f"stages up to {until} only" if until and until != names[-1] else False, "stages": stages}


def ratios(small: dict, large: dict) -> dict:
    out = {}
    for stage, _ in STAGES:
        a, b = small["stages"].get(stage), large["stages"].get(stage)
        if a is None or b is None:
            continue
        entry = {"rows_ratio": round(b["rows"] / max(a["rows"], 1), 2), "time_ratio": round(b["wall_s"] / a["wall_s"], 2),
                 "rss_ratio": round(b["peak_rss_mib"] / a["peak_rss_mib"], 2),
                 "rss_growth_mib": round(b["peak_rss_mib"] - a["peak_rss_mib"], 1)}
        entry["time_met"] = entry["time_ratio"] <= TIME_RATIO_MAX
        if stage in STREAMING or stage in TRAINING:
            entry["rss_met"] = entry["rss_ratio"] <= RSS_RATIO_MAX
        out[stage] = entry
    return out


def markdown(result: dict) -> str:
    """The table of docs/scaling.md's "The whole archive" section, from archive.json."""
    fractions = sorted(result["fractions"], key=float)
    head = ["stage"] + [f"F={f} s / MiB / rows/s" for f in fractions] + [f"{k.replace('_over_', ' / ')} time, RSS" for k in result.get("ratios", {})]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for stage, _ in STAGES:
        cells = [stage.replace("_", " ")]
        for f in fractions:
            s = result["fractions"][f]["stages"].get(stage)
            cells.append(f"{s['wall_s']:,.1f} / {s['peak_rss_mib']:,.0f} / {s['rows_per_s']:,.1f}" if s else "not run")
        for r in result.get("ratios", {}).values():
            e = r.get(stage)
            if e is None:
                cells.append("–")
                continue
            # ✗: a target missed (time <= 11x; RSS <= 1.5x where it applies, else the RSS is for information)
            rss = f"{e['rss_ratio']:.2f}×" + ("" if e.get("rss_met", True) else " ✗") + ("" if "rss_met" in e else " (no target)")
            cells.append(f"{e['time_ratio']:.2f}×{'' if e['time_met'] else ' ✗'}, {rss}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.1, help="share of the metadata's patients (1 = all 112,120 rows)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: /tmp/cxr-bench-archive-F, removed first)")
    ap.add_argument("--until", default=None, choices=[name for name, _ in STAGES],
                    help="run the stages up to this one only (the result says it is partial)")
    ap.add_argument("--only", default=None, choices=[name for name, _ in STAGES],
                    help="rerun this one stage in the fraction's existing working folder (after a change to it) and "
                         "replace its record in archive.json; the other stages' records are kept")
    ap.add_argument("--markdown", action="store_true", help="print the docs/scaling.md table of archive.json; run nothing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads((RESULTS / "archive.json").read_text())))
        return
    work = args.work or Path(f"/tmp/cxr-bench-archive-{args.fraction:g}")
    if args.child:
        run_child(args.child, work, args.fraction)
        return
    result_path = RESULTS / "archive.json"
    previous = json.loads(result_path.read_text()) if result_path.exists() else {}
    fractions = dict(previous.get("fractions", {}))
    key = f"{args.fraction:g}"
    if args.only:
        if key not in fractions or not (work / "stages").is_dir():
            raise SystemExit(f"--only needs a finished run of F={key} in {work} (run --fraction {key} first)")
        fractions[key]["stages"][args.only] = {**measure(args.only, work, args.fraction),
                                               "rerun_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    else:
        fractions[key] = {**run_fraction(args.fraction, work, args.until),
                          "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result = {
        "what": "every pipeline stage over the real NIH metadata (F = 1: all 112,120 rows; F = 0.1: a seeded tenth of "
                "its patients) with synthetic 32-px renderings, each stage in a child process of its own (wall time, "
                "own peak RSS, rows/s); see the docstring of benchmarks/bench_archive.py",
        "command": "benchmarks/bench_archive.py --fraction F [--until STAGE]: one run per fraction, each merged into this file",
        "runs_merged": {f: v.get("partial") or "all stages" for f, v in sorted(fractions.items(), key=lambda kv: float(kv[0]))},
        "config": {"backbone": "resnet18", "image_size": IMAGE_SIZE, "local_size": IMAGE_SIZE, "epochs_per_stage": 1,
                   "batch_size": BATCH, "shard_images": 512, "evaluate_bootstrap": BOOTSTRAP, "score_overlay_size": OVERLAY,
                   "device": "cpu", "in_process": "the stages' own functions, without Prefect"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "rows_means": dict(STAGES),
        "targets": {"time_ratio_max": TIME_RATIO_MAX, "rss_ratio_max": RSS_RATIO_MAX,
                    "rss_ratio_applies_to": list(STREAMING + TRAINING)},
        "fractions": fractions,
    }
    # 10x the rows between neighbouring fractions (0.01 -> 0.1 -> 1), over the stages both ran.
    keys = sorted(fractions, key=float)
    result["ratios"] = {f"{b}_over_{a}": ratios(fractions[a], fractions[b]) for a, b in zip(keys, keys[1:])}
    publish("archive", result)


if __name__ == "__main__":
    main()
