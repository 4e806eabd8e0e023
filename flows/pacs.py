"""PACS scoring flow: new chest CR/DX instances from a DICOMweb server -> the one Scorer ->
scores.parquet, the HTML report, and the results stored back as DICOM (SR + Secondary Capture).

The flow's parameters hold the URL without credentials (`tasks.scoring.dicomweb.scrub_url`);
the source reads them from CXR_DICOMWEB_USER/PASSWORD or CXR_DICOMWEB_TOKEN.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect import flow, task

from cxr.core.config import Params
from tasks.scoring.dicomweb import score_dicomweb, scrub_url


@task(name="score-dicomweb")
def score_dicomweb_task(params: Params, url: str, out_dir: Path, since: dt.date | None) -> dict:
    return score_dicomweb(params, url, Path(out_dir), since=since)


@flow(name="pacs-scoring", log_prints=True)
def pacs_scoring_flow(params: Params, url: str, out_dir: Path, since: dt.date | None = None) -> dict:
    """Score what is new on the DICOMweb server `url` into `out_dir`; return the run summary."""
    url = scrub_url(url)
    summary = score_dicomweb_task(params, url, Path(out_dir), since)
    if summary.get("studies") is not None:  # a folder run was scored: its report, as `cxr score --input`
        from tasks.prefect_tasks import report_task

        summary["report"] = str(report_task(Path(out_dir), summary))
    print(summary["message"])
    return {k: v for k, v in summary.items() if k != "studies"}
