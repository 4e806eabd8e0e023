"""Training flows: the three AG-CNN stages, each freezing the ones before it, and evaluation."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from cxr.core.config import Params
from cxr.core.labels import STAGES
from tasks.metadata.ingest import packaged_metadata_path
from tasks.prefect_tasks import evaluate_task, register_task, train_task


@flow(name="train", log_prints=True, flow_run_name="train-{stage}")
def train_flow(params: Params, stage: str, nproc: int = 1) -> dict:
    summary = train_task(params, stage, nproc=nproc)
    if stage == "fusion":
        # The three stages now form one model: record it so scoring can verify its weights.
        summary["registered"] = register_task(params)["digest"]
    return summary


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: Params) -> dict:
    # NIH's radiologist boxes ship with torchxrayvision; they count only for real NIH images
    # in paths.images (params data.metadata set, or 1024-px files) that are in the test split.
    nih_boxes = packaged_metadata_path().parent / "BBox_List_2017.csv.gz"
    return evaluate_task(params, truth_boxes=[Path(params.paths.raw) / "boxes.csv", nih_boxes])


@flow(name="train-all", log_prints=True)
def train_all_flow(params: Params) -> dict:
    return {stage: train_flow(params, stage) for stage in STAGES}
