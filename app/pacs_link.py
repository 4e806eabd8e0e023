"""What a study page shows of a study scored from a PACS: its DICOM UIDs (from the run store's
`dicom_index.parquet`) and a link into the PACS viewer built from `app.viewer_url`."""

from __future__ import annotations

from urllib.parse import quote

from tasks.scoring.dicom_index import study_row


def pacs_facts(run, row: dict, viewer_url: str) -> dict | None:
    """{study_uid, series_uid, sop_uid, source_url, viewer_link, written_back} of a PACS-sourced row, else None."""
    entry = study_row(run.folder, row.get("sha256"), row.get("model_digest"))
    if entry is None or not entry.get("study_instance_uid"):
        return None
    study_uid = str(entry["study_instance_uid"])
    link = None
    if viewer_url and ("{orthanc_study_id}" not in viewer_url or entry.get("orthanc_study_id")):
        link = viewer_url.replace("{study_uid}", quote(study_uid, safe=".")).replace(
            "{orthanc_study_id}", quote(str(entry.get("orthanc_study_id") or ""), safe="-"))
    return {"study_uid": study_uid, "series_uid": entry.get("series_instance_uid"),
            "sop_uid": entry.get("sop_instance_uid"), "source_url": entry.get("source_url"), "viewer_link": link,
            "written_back": bool(entry.get("written_back"))}
