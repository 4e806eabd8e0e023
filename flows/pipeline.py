"""The whole DAG as one Prefect flow run: data -> image cache -> stage I -> crop cache ->
stages II and III -> evaluation (`cxr pipeline`).

The same commands `dvc.yaml` runs stage by stage, here as subflows of one run, so a user
without DVC (or pointing params `data:` at real NIH files) gets the whole workflow, each
step visible in the Prefect UI. Every step keeps its own resume: a rerun after a kill skips
finished cache chunks and training epochs.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from cxr.core.config import Params
from cxr.core.labels import STAGES


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params: Params) -> dict:
    """Run everything from ingest to evaluation; return a short summary of each step."""
    from flows.cache import cache_crops, cache_images
    from flows.data import data_pipeline_flow
    from flows.train import evaluate_flow, train_flow

    data = data_pipeline_flow(params)
    summary: dict = {"images": data["ingest"]["images"], "patients": data["ingest"]["patients"],
                     "split_images": data["split"]["images"]}
    summary["cache_images"] = {k: cache_images(params)[k] for k in ("items", "rejected")}
    for stage in STAGES:
        if stage == "local" and params.cache.enabled:
            summary["cache_crops"] = {k: cache_crops(params)[k] for k in ("items", "rejected")}
        trained = train_flow(params, stage)
        summary[f"train_{stage}"] = {"best_epoch": trained["best_epoch"],
                                     "best_valid_mean_auroc": round(trained["best_valid_mean_auroc"], 4)}
    report = evaluate_flow(params)
    summary["evaluate"] = {
        "test_images": report["test_images"],
        **{f"{b}_mean_auroc": v["mean_auroc"] for b, v in report["branches"].items()},
        **{f"{b}_any_finding_auroc": v["any_finding"]["auroc"] if isinstance(v["any_finding"], dict) else None
           for b, v in report["branches"].items()},
        "report": str(Path(params.paths.reports) / "evaluation.md"),
    }
    print(f"pipeline done: fusion mean AUROC {summary['evaluate']['fusion_mean_auroc']}, "
          f"No Finding vs any finding {summary['evaluate']['fusion_any_finding_auroc']}")
    return summary
