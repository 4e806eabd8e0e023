"""Results back into the PACS as DICOM: per scored instance a TID 1500 Comprehensive SR and a
Secondary Capture of the overlay, both in the source study; a rejected instance gets only an SR
saying it was not assessed and why.

The SR holds, per finding, the fusion probability (numeric, the same value as scores.parquet),
the operating threshold and whether it is flagged; the out-of-distribution verdict; and the
algorithm identification (name "cxr AG-CNN", version = the model digest). UIDs derive from
the source SOPInstanceUID and the model digest, so a rerun stores nothing twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
from highdicom.sr import (AlgorithmIdentification, CodedConcept, ComprehensiveSR, Measurement, MeasurementReport,
                          MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
                          QualitativeEvaluation, SourceImageForMeasurementGroup, TextContentItem, TrackingIdentifier)
from highdicom.sr.templates import DeviceObserverIdentifyingAttributes
from PIL import Image
from pydicom.uid import generate_uid

from cxr.core.labels import LABEL_COLUMNS, PATHOLOGIES
from tasks.scoring.rows import FLAG_COLUMNS, read_scores

log = logging.getLogger("cxr.pacs")

ALGORITHM = "cxr AG-CNN"
MANUFACTURER = "cxr"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS - research model output (cxr AG-CNN)"
SCHEME = "99CXR"
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
UNIT = CodedConcept("1", "UCUM", "no units")
PROBABILITY = CodedConcept("PROB", SCHEME, "Fusion probability")
THRESHOLD = CodedConcept("THR", SCHEME, "Operating threshold")
FLAGGED = CodedConcept("FLAG", SCHEME, "Flagged at the operating threshold")
OOD_SCORE = CodedConcept("OODS", SCHEME, "Out-of-distribution score")
OOD_FLAG = CodedConcept("OODF", SCHEME, "Out of distribution")
ASSESSED = CodedConcept("ASSESSED", SCHEME, "Image assessed by the algorithm")
COMMENT = CodedConcept("121106", "DCM", "Comment")
PROCEDURE = CodedConcept("43468-8", "LN", "Chest X-ray")  # LOINC: XR Chest


def finding_code(k: int) -> CodedConcept:
    return CodedConcept(f"F{k:02d}", SCHEME, PATHOLOGIES[k])


def result_uids(sop_uid: str, digest: str, kind: str) -> tuple[str, str]:
    """(series UID, instance UID) of one result object, deterministic in (source, model, kind)."""
    return (generate_uid(entropy_srcs=[sop_uid, digest, kind, "series"]),
            generate_uid(entropy_srcs=[sop_uid, digest, kind]))


def _algorithm(digest: str) -> AlgorithmIdentification:
    return AlgorithmIdentification(name=ALGORITHM, version=digest[:64], manufacturer=MANUFACTURER)


def _observation_context(digest: str) -> ObservationContext:
    device = DeviceObserverIdentifyingAttributes(uid=generate_uid(entropy_srcs=[digest, "device"]), name=ALGORITHM,
                                                 manufacturer_name=MANUFACTURER, model_name=digest[:64])
    return ObservationContext(observer_device_context=ObserverContext(
        observer_type=CodedConcept("121007", "DCM", "Device"), observer_identifying_attributes=device))


def _num(value) -> float | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)


def structured_report(source: pydicom.Dataset, row: dict, thresholds: np.ndarray, digest: str) -> ComprehensiveSR:
    """The TID 1500 report of one instance's row (scored or rejected)."""
    sop_uid = str(source.SOPInstanceUID)
    series_uid, instance_uid = result_uids(sop_uid, digest, "sr")
    algo = _algorithm(digest)
    scored = row["status"] == "scored"
    groups = []
    source_ref = [SourceImageForMeasurementGroup.from_source_image(source)]
    if scored:
        for k, column in enumerate(LABEL_COLUMNS):
            groups.append(MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=generate_uid(entropy_srcs=[sop_uid, digest, "sr", column]),
                                                       identifier=PATHOLOGIES[k]),
                finding_type=finding_code(k), algorithm_id=algo, source_images=source_ref,
                measurements=[Measurement(PROBABILITY, float(row[column]), UNIT, algorithm_id=algo),
                              Measurement(THRESHOLD, float(thresholds[k]), UNIT, algorithm_id=algo)],
                qualitative_evaluations=[QualitativeEvaluation(FLAGGED, YES if row[FLAG_COLUMNS[k]] else NO)]))
    ood_measurements = [] if _num(row.get("ood_score")) is None else [
        Measurement(OOD_SCORE, _num(row["ood_score"]), UNIT, algorithm_id=algo)]
    ood_eval = [QualitativeEvaluation(ASSESSED, YES if scored else NO)]
    if row.get("ood_flag") is not None and not pd.isna(row.get("ood_flag")):
        ood_eval.append(QualitativeEvaluation(OOD_FLAG, YES if row["ood_flag"] else NO))
    groups.append(MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(entropy_srcs=[sop_uid, digest, "sr", "verdict"]),
                                               identifier="Out-of-distribution verdict"),
        finding_type=CodedConcept("VERDICT", SCHEME, "Out-of-distribution verdict"), algorithm_id=algo,
        source_images=source_ref, measurements=ood_measurements or None, qualitative_evaluations=ood_eval))
    report = MeasurementReport(observation_context=_observation_context(digest), procedure_reported=PROCEDURE,
                               imaging_measurements=groups)
    reason = row.get("reason")
    text = (f"Not assessed: {reason}" if not scored else
            f"Out-of-distribution verdict: {reason}" if reason else "Out-of-distribution verdict: in distribution")
    report[0].ContentSequence.append(TextContentItem(name=COMMENT, value=f"{text}. {NOT_FOR_DIAGNOSIS}"[:1024],
                                                     relationship_type="CONTAINS"))
    sr = ComprehensiveSR(evidence=[source], content=report[0], series_instance_uid=series_uid, series_number=9901,
                         sop_instance_uid=instance_uid, instance_number=1, manufacturer=MANUFACTURER,
                         is_complete=True, series_description=f"{ALGORITHM} results (not for diagnosis)")
    return sr


def secondary_capture(source: pydicom.Dataset, overlay_png: Path, digest: str) -> hd.sc.SCImage:
    """The overlay picture (radiograph, attention box, activation maps) as an RGB Secondary Capture."""
    series_uid, instance_uid = result_uids(str(source.SOPInstanceUID), digest, "sc")
    pixels = np.asarray(Image.open(overlay_png).convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=9902,
        sop_instance_uid=instance_uid, instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"), transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = f"{ALGORITHM} overlay (not for diagnosis)"
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    sc.DerivationDescription = f"{ALGORITHM} {digest[:16]}: attention box and class activation maps"
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def write_back_index(source, out_dir: Path, scorer) -> int:
    """Store SR (+ SC for scored) of every indexed instance not yet written back; return the count.

    `written_back` is set in the index after each instance's objects are stored.
    """
    from tasks.scoring.dicom_index import read_index, write_index

    out_dir = Path(out_dir)
    index = read_index(out_dir)
    digest = scorer.digest
    scores = read_scores(out_dir)
    scores = scores[scores["model_digest"] == digest].drop_duplicates(["sha256", "model_digest"])
    rows = {s: r for s, r in zip(scores["sha256"], scores.to_dict("records"))}
    stored = 0
    for i, entry in index.iterrows():
        if entry["model_digest"] != digest or entry["written_back"] is True or entry["sha256"] is None:
            continue
        row = rows.get(entry["sha256"])
        if row is None:
            continue
        path = Path(row["source_path"])
        if not path.exists():  # refused by its header: kept beside the run folder
            path = path.parent.parent / f"{path.parent.name}-rejected-{path.name}"
        header = pydicom.dcmread(path, stop_before_pixels=True) if path.exists() else _stub(entry)
        datasets = [structured_report(header, row, scorer.thresholds, digest)]
        if row["status"] == "scored" and row["overlay"] and (out_dir / row["overlay"]).exists():
            datasets.append(secondary_capture(header, out_dir / row["overlay"], digest))
        source.store(datasets, entry["study_instance_uid"])
        stored += len(datasets)
        index.at[i, "written_back"] = True
        write_index(out_dir, index)
    return stored


def _stub(entry) -> pydicom.Dataset:
    """The source's identity when its file was never downloaded."""
    ds = pydicom.Dataset()
    ds.StudyInstanceUID = entry["study_instance_uid"]
    ds.SeriesInstanceUID = entry["series_instance_uid"]
    ds.SOPInstanceUID = entry["sop_instance_uid"]
    ds.SOPClassUID = entry["sop_class_uid"] or "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality = "CR"
    return ds
