"""Data flows: synth -> ingest (GE metadata gate) -> split (GE split gate) + class weights."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from cxr.core.config import Params
from tasks.prefect_tasks import ingest_task, split_task, synth_task


@flow(name="synth", log_prints=True)
def synth_flow(params: Params, metadata_csv: Path, out_dir: Path) -> dict:
    s = params.synth
    return synth_task(
        metadata_csv,
        out_dir,
        patients=s.patients,
        image_size=s.image_size,
        max_images_per_patient=s.max_images_per_patient,
        min_patients_per_class=s.min_patients_per_class,
        seed=params.seed,
    )


@flow(name="ingest", log_prints=True)
def ingest_flow(metadata_csv: Path, out_dir: Path) -> dict:
    return ingest_task(metadata_csv, out_dir)


@flow(name="split", log_prints=True)
def split_flow(params: Params, metadata_parquet: Path, out_dir: Path, assignments: Path | None = None) -> dict:
    return split_task(
        metadata_parquet,
        out_dir,
        ratios=params.split.ratios(),
        tolerance=params.split.tolerance,
        seed=params.seed,
        assignments=assignments,
    )


@flow(name="data-pipeline", log_prints=True)
def data_pipeline_flow(params: Params, metadata_csv: Path | None = None) -> dict:
    """The data layer in one flow run: synth (when there is no metadata CSV), ingest, split.

    metadata_csv defaults to params `data.metadata`; `data.split_assignments`, when set, is
    checked for leakage and used instead of a computed split.
    """
    paths = params.paths
    report: dict = {}
    metadata_csv = metadata_csv or params.data.metadata
    if metadata_csv is None:
        from tasks.metadata.ingest import packaged_metadata_path

        report["synth"] = synth_flow(params, packaged_metadata_path(), paths.raw)
        metadata_csv = paths.raw / "Data_Entry_synth.csv"
    report["ingest"] = ingest_task(metadata_csv, paths.interim)
    report["split"] = split_task(
        paths.interim / "metadata.parquet",
        paths.processed,
        ratios=params.split.ratios(),
        tolerance=params.split.tolerance,
        seed=params.seed,
        assignments=params.data.split_assignments,
    )
    return report
