"""Results back into the PACS as DICOM: per scored instance a TID 1500 Comprehensive SR and a
Secondary Capture of the overlay, and the attention box as a grayscale softcopy presentation
state over the source image, all in the source study; a rejected instance gets only an SR saying
it was not assessed and why.

The SR holds, per finding, the fusion probability (numeric, the same value as scores.parquet),
the operating threshold and whether it is flagged; the out-of-distribution verdict; and the
algorithm identification (name "cxr AG-CNN", version = the model digest). UIDs derive from
the source SOPInstanceUID and the model digest, so a rerun stores nothing twice.
"""

from __future__ import annotations

import logging
import struct
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
from tasks.scoring.rows import BOX_COLUMNS, FLAG_COLUMNS, read_scores

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


def _tracking_uid(sop_uid: str, digest: str, key: str) -> str:
    return generate_uid(entropy_srcs=[sop_uid, digest, "sr", key])


def _report_root(source: pydicom.Dataset, row: dict, thresholds: np.ndarray, digest: str) -> pydicom.Dataset:
    """The TID 1500 content tree (root container) of one instance's row (scored or rejected)."""
    sop_uid = str(source.SOPInstanceUID)
    algo = _algorithm(digest)
    scored = row["status"] == "scored"
    groups = []
    source_ref = [SourceImageForMeasurementGroup.from_source_image(source)]
    if scored:
        for k, column in enumerate(LABEL_COLUMNS):
            groups.append(MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=_tracking_uid(sop_uid, digest, column),
                                                       identifier=PATHOLOGIES[k]),
                finding_type=finding_code(k), algorithm_id=algo, source_images=source_ref,
                measurements=[Measurement(PROBABILITY, float(row[column]), UNIT, algorithm_id=algo),
                              Measurement(THRESHOLD, float(thresholds[k]), UNIT, algorithm_id=algo)],
                qualitative_evaluations=[QualitativeEvaluation(FLAGGED, YES if row[FLAG_COLUMNS[k]] else NO)]))
    ood_measurements = [] if _num(row.get("ood_score")) is None else [
        Measurement(OOD_SCORE, _num(row["ood_score"]), UNIT, algorithm_id=algo)]
    ood_eval = [QualitativeEvaluation(ASSESSED, YES if scored else NO)]
    if _has_flag(row):
        ood_eval.append(QualitativeEvaluation(OOD_FLAG, YES if row["ood_flag"] else NO))
    groups.append(MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=_tracking_uid(sop_uid, digest, "verdict"),
                                               identifier="Out-of-distribution verdict"),
        finding_type=CodedConcept("VERDICT", SCHEME, "Out-of-distribution verdict"), algorithm_id=algo,
        source_images=source_ref, measurements=ood_measurements or None, qualitative_evaluations=ood_eval))
    report = MeasurementReport(observation_context=_observation_context(digest), procedure_reported=PROCEDURE,
                               imaging_measurements=groups)
    report[0].ContentSequence.append(TextContentItem(name=COMMENT, value=_comment(row), relationship_type="CONTAINS"))
    return report[0]


def _has_flag(row: dict) -> bool:
    return row.get("ood_flag") is not None and not pd.isna(row.get("ood_flag"))


def _comment(row: dict) -> str:
    reason = row.get("reason")
    text = (f"Not assessed: {reason}" if row["status"] != "scored" else
            f"Out-of-distribution verdict: {reason}" if reason else "Out-of-distribution verdict: in distribution")
    # The plain-words mark comes first, as on the study page: it says whether the numbers mean anything.
    statement = row.get("ood_statement")
    if isinstance(statement, str) and statement and row["status"] == "scored":
        text = f"{statement.rstrip('.')}. {text}"
    return f"{text}. {NOT_FOR_DIAGNOSIS}"[:1024]


def _sr(source: pydicom.Dataset, content: pydicom.Dataset, digest: str) -> ComprehensiveSR:
    series_uid, instance_uid = result_uids(str(source.SOPInstanceUID), digest, "sr")
    return ComprehensiveSR(evidence=[source], content=content, series_instance_uid=series_uid, series_number=9901,
                           sop_instance_uid=instance_uid, instance_number=1, manufacturer=MANUFACTURER,
                           is_complete=True, series_description=f"{ALGORITHM} results (not for diagnosis)")


def structured_report(source: pydicom.Dataset, row: dict, thresholds: np.ndarray, digest: str) -> ComprehensiveSR:
    """The TID 1500 report of one instance's row (scored or rejected), built by highdicom."""
    return _sr(source, _report_root(source, row, thresholds, digest), digest)


# ---------------------------------------------------------------------- the same report, fast
#
# highdicom builds and checks a 15-group report in a few hundred milliseconds and pydicom takes
# a hundred more to encode it: more than scoring the image. The content tree's shape depends on
# the model (digest, thresholds) and on three facts of the row (scored or not, an OOD score, an
# OOD flag); its values on the instance. So highdicom builds each shape once, with marker
# values, and it is encoded once with undefined lengths (every item and sequence delimited);
# an instance's report is that encoding with each marker's value and length replaced, under the
# top level that highdicom builds from the instance's header over a one-item tree. The test
# suite checks the two ways give the same dataset.

_CONTENT_SEQUENCE = 0x0040A730
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_MARK_SOURCE = ("1.999.999.1", "1.999.999.2")  # the marker source's SOP class and instance UIDs


def _marker_source() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = _MARK_SOURCE
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.999.999.3", "1.999.999.4"
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", 2, 2, 1
    return ds


def _delimit(ds: pydicom.Dataset) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                _delimit(item)


def _walk(seq):
    for item in seq:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def _concept(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue


class _ReportTemplate:
    """One report shape: its encoded content with the places each value goes."""

    def __init__(self, thresholds: np.ndarray, digest: str, scored: bool, has_score: bool, has_flag: bool):
        row = {"status": "scored" if scored else "rejected", "reason": None,
               "ood_score": 0.5 if has_score else None, "ood_flag": False if has_flag else None}
        row.update({c: 0.5 for c in LABEL_COLUMNS})
        row.update({f: False for f in FLAG_COLUMNS})
        import copy

        # A private copy: the tree shares code objects (YES, NO, units) with every other report.
        root = copy.deepcopy(_report_root(_marker_source(), row, thresholds, digest))
        self.root_attrs = pydicom.Dataset()
        for elem in root:
            if elem.tag != _CONTENT_SEQUENCE:
                self.root_attrs.add(elem)
        # Markers: unique text at every place an instance's value goes.
        self.sites: dict[str, str] = {}  # marker -> site name
        self.floats: dict[bytes, str] = {}  # FloatingPointValue marker (8 bytes) -> site name
        groups = [i for i in root.ContentSequence if _concept(i) == "126010"][0].ContentSequence
        for group in groups:
            finding = [i for i in group.ContentSequence if _concept(i) == "121071"][0]
            key = finding.ConceptCodeSequence[0].CodeValue  # F00..F13 or VERDICT
            for item in _walk(group.ContentSequence):
                concept = _concept(item)
                if item.ValueType == "UIDREF" and concept == "112040":
                    item.UID = self._mark(f"uid:{key}", f"1.999.998.{len(self.sites)}")
                elif item.ValueType == "NUM" and concept in ("PROB", "OODS"):
                    n = len(self.sites)
                    item.MeasuredValueSequence[0].NumericValue = self._mark(f"num:{key}", f"-99{n:03d}.5")
                    item.MeasuredValueSequence[0].FloatingPointValue = -88000.0 - n - 0.25
                    self.floats[struct.pack("<d", -88000.0 - n - 0.25)] = f"fd:{key}"
                elif item.ValueType == "CODE" and concept in ("FLAG", "OODF", "ASSESSED"):
                    n = len(self.sites)
                    code = pydicom.Dataset()
                    code.CodeValue = self._mark(f"code:{key}:{concept}", f"XCXRV{n:03d}")
                    code.CodingSchemeDesignator = "SCT"
                    code.CodeMeaning = self._mark(f"meaning:{key}:{concept}", f"XCXRM{n:03d}")
                    item.ConceptCodeSequence = [code]
        comment = [i for i in root.ContentSequence if _concept(i) == "121106"][0]
        comment.TextValue = self._mark("comment", "XCXRCOMMENT")
        _delimit(root)  # every item and sequence delimited: no length field above a value
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_data_element

        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_data_element(buf, root[_CONTENT_SEQUENCE])
        data = buf.getvalue()
        assert data[4:6] == b"SQ" and data[8:12] == b"\xff\xff\xff\xff" and data[-8:-4] == b"\xfe\xff\xdd\xe0"
        self.body = data[12:-8]  # the items (pydicom writes the sequence delimiter of a raw element itself)
        self.places = self._locate(list(_MARK_SOURCE))

    def _mark(self, site: str, marker: str) -> str:
        self.sites[marker] = site
        return marker

    def _locate(self, uid_markers: list[str]) -> list[tuple[int, int, int, str, bool]]:
        """(length field offset, its size, value offset, site, is a UID) of every marker, sorted."""
        places = []
        markers = {**self.sites, **{m: f"source:{m}" for m in uid_markers}}
        for marker, site in markers.items():
            raw = marker.encode("ascii")
            uid = marker.startswith("1.999.")
            padded = raw + ((b"\x00" if uid else b" ") if len(raw) % 2 else b"")
            start, found = 0, 0
            while (at := self.body.find(padded, start)) >= 0:
                start = at + 1
                if self.body[at - 2:at] == len(padded).to_bytes(2, "little") and self.body[at - 4:at - 2] not in _LONG_VRS:
                    places.append((at - 2, 2, at, site, uid))
                    found += 1
                elif self.body[at - 4:at] == len(padded).to_bytes(4, "little") and self.body[at - 8:at - 6] in _LONG_VRS:
                    places.append((at - 4, 4, at, site, uid))
                    found += 1
            if not found:
                raise ValueError(f"SR template: marker {marker} not found")
        for raw, site in self.floats.items():
            at = self.body.find(b"FD\x08\x00" + raw)
            if at < 0 or self.body.find(raw, at + 5) >= 0:
                raise ValueError(f"SR template: float marker of {site} not found once")
            places.append((at + 2, 2, at + 4, site, False))
        return sorted(places)

    def render(self, values: dict[str, str]) -> bytes:
        out, pos = [], 0
        for len_at, size, value_at, site, uid in self.places:
            old_len = int.from_bytes(self.body[len_at:len_at + size], "little")
            value = values[site]
            raw = (struct.pack("<d", value) if site.startswith("fd:") else value if isinstance(value, bytes)
                   else value.encode("ascii"))
            if len(raw) % 2:
                raw += b"\x00" if uid else b" "
            out += [self.body[pos:len_at], len(raw).to_bytes(size, "little"), self.body[len_at + size:value_at], raw]
            pos = value_at + old_len
        out.append(self.body[pos:])
        body = b"".join(out)
        if b"XCXR" in body or b"1.999.99" in body:
            raise ValueError("SR template: a marker was left in the report")
        return body


_TEMPLATES: dict[tuple, _ReportTemplate] = {}
_TEMPLATES_LOCK = __import__("threading").Lock()


def _template(thresholds: np.ndarray, digest: str, row: dict) -> _ReportTemplate:
    key = (digest, tuple(np.round(np.asarray(thresholds, dtype=np.float64), 12)), row["status"] == "scored",
           _num(row.get("ood_score")) is not None, _has_flag(row))
    with _TEMPLATES_LOCK:
        if key not in _TEMPLATES:
            _TEMPLATES[key] = _ReportTemplate(thresholds, digest, *key[2:])
        return _TEMPLATES[key]


def fast_structured_report(source: pydicom.Dataset, row: dict, thresholds: np.ndarray, digest: str) -> ComprehensiveSR:
    """`structured_report`, equal dataset, from the shape's template (milliseconds, not hundreds)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag
    from pydicom.charset import convert_encodings, default_encoding, encode_string
    from pydicom.valuerep import format_number_as_ds

    from highdicom.sr import ImageContentItem

    template = _template(thresholds, digest, row)
    sop_uid = str(source.SOPInstanceUID)
    # The text in the report's character set (the source's, as highdicom sets it).
    charset = source.get("SpecificCharacterSet")
    encodings = convert_encodings(charset) if charset else [default_encoding]
    values = {f"source:{_MARK_SOURCE[0]}": str(source.SOPClassUID), f"source:{_MARK_SOURCE[1]}": sop_uid,
              "comment": encode_string(_comment(row), encodings)}
    keys = [(f"F{k:02d}", column) for k, column in enumerate(LABEL_COLUMNS)] if row["status"] == "scored" else []
    for key, column in keys:
        values[f"uid:{key}"] = _tracking_uid(sop_uid, digest, column)
        values[f"num:{key}"] = format_number_as_ds(float(row[column]))
        values[f"fd:{key}"] = float(row[column])
        flag = YES if row[FLAG_COLUMNS[int(key[1:])]] else NO
        values[f"code:{key}:FLAG"], values[f"meaning:{key}:FLAG"] = flag.value, flag.meaning
    values["uid:VERDICT"] = _tracking_uid(sop_uid, digest, "verdict")
    if _num(row.get("ood_score")) is not None:
        values["num:VERDICT"] = format_number_as_ds(_num(row["ood_score"]))
        values["fd:VERDICT"] = _num(row["ood_score"])
    assessed = YES if row["status"] == "scored" else NO
    values["code:VERDICT:ASSESSED"], values["meaning:VERDICT:ASSESSED"] = assessed.value, assessed.meaning
    if _has_flag(row):
        ood = YES if row["ood_flag"] else NO
        values["code:VERDICT:OODF"], values["meaning:VERDICT:OODF"] = ood.value, ood.meaning
    body = template.render(values)
    # The top level from highdicom over a one-item tree that references the source (the evidence).
    small = pydicom.Dataset()
    for elem in template.root_attrs:
        small.add(elem)
    small.ContentSequence = [ImageContentItem(
        name=CodedConcept("260753009", "SCT", "Source"), referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type="CONTAINS")]
    sr = _sr(source, small, digest)
    sr[_CONTENT_SEQUENCE] = RawDataElement(Tag(_CONTENT_SEQUENCE), "SQ", 0xFFFFFFFF, body, 0, False, True)
    # Written in the encoding it was made for: pydicom then copies the raw content as it is
    # instead of parsing it to re-encode (the top level has no ambiguous VR to correct).
    charset = convert_encodings(sr.SpecificCharacterSet) if "SpecificCharacterSet" in sr else default_encoding
    sr.set_original_encoding(False, True, charset)
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


def presentation_state(source: pydicom.Dataset, row: dict, digest: str) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The attention box as a grayscale softcopy presentation state over the source image: a
    viewer draws it on the original radiograph (its own window and zoom), not on a picture."""
    series_uid, instance_uid = result_uids(str(source.SOPInstanceUID), digest, "pr")
    y0, x0, y1, x1 = (float(row[c]) for c in BOX_COLUMNS)
    # PIXEL units: (0, 0) is the top left corner of the first pixel; the box is inclusive.
    corners = np.array([[x0, y0], [x1 + 1, y0], [x1 + 1, y1 + 1], [x0, y1 + 1], [x0, y0]], dtype=np.float64)
    layer = hd.pr.GraphicLayer(layer_name="CXR_ATTENTION", order=1, description=f"{ALGORITHM} attention box")
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[source], graphic_layer=layer,
        graphic_objects=[hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=corners,
                                             units=hd.pr.AnnotationUnitsValues.PIXEL)],
        text_objects=[hd.pr.TextObject(text_value="cxr attention box (not for diagnosis)",
                                       units=hd.pr.AnnotationUnitsValues.PIXEL,
                                       anchor_point=(float(x0), float(y0)), anchor_point_visible=False)])
    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source], series_instance_uid=series_uid, series_number=9903,
        sop_instance_uid=instance_uid, instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM, software_versions=digest[:64], device_serial_number="0",
        content_label="CXR_ATTENTION", content_description=f"{ALGORITHM} attention box (not for diagnosis)",
        graphic_annotations=[annotation], graphic_layers=[layer])


def result_datasets(header: pydicom.Dataset, row: dict, out_dir: Path, thresholds, digest: str) -> list:
    """What one instance gets back: SR always; for a scored one, the SC of its overlay and the GSPS."""
    try:
        report = fast_structured_report(header, row, thresholds, digest)
    except ValueError as exc:  # a template that cannot be made: highdicom builds the whole report
        log.warning("SR template not usable (%s); building the report in full", exc)
        report = structured_report(header, row, thresholds, digest)
    datasets = [report]
    if row["status"] == "scored":
        if row.get("overlay") and (out_dir / row["overlay"]).exists():
            datasets.append(secondary_capture(header, out_dir / row["overlay"], digest))
        if "Rows" in header and all(_num(row.get(c)) is not None for c in BOX_COLUMNS):
            datasets.append(presentation_state(header, row, digest))
    return datasets


# After this many instances stored, their marks are written to the index (a kill re-stores at
# most these, under the same UIDs: the PACS keeps one copy).
MARK_EVERY = 16


def write_back_index(source, out_dir: Path, scorer, threads: int = 4) -> int:
    """Store SR (+ SC and GSPS for scored) of every indexed instance not yet written back; return
    how many objects were stored.

    Instances are built and stored by a few threads (one STOW-RS request each, over the source's
    one HTTP session); `written_back` is set in the index as they complete.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tasks.scoring.dicom_index import read_index, write_index

    out_dir = Path(out_dir)
    index = read_index(out_dir)
    digest = scorer.digest
    scores = read_scores(out_dir)
    scores = scores[scores["model_digest"] == digest].drop_duplicates(["sha256", "model_digest"])
    rows = {s: r for s, r in zip(scores["sha256"], scores.to_dict("records"))}
    todo = []
    for i, entry in index.iterrows():
        if entry["model_digest"] != digest or entry["written_back"] is True or entry["sha256"] is None:
            continue
        row = rows.get(entry["sha256"])
        if row is not None:
            todo.append((i, entry, row))

    def one(i, entry, row) -> int:
        path = Path(row["source_path"])
        if not path.exists():  # refused by its header: kept beside the run folder
            path = path.parent.parent / f"{path.parent.name}-rejected-{path.name}"
        header = pydicom.dcmread(path, stop_before_pixels=True) if path.exists() else _stub(entry)
        datasets = result_datasets(header, row, out_dir, scorer.thresholds, digest)
        source.store(datasets, entry["study_instance_uid"])
        return len(datasets)

    stored, unmarked = 0, 0
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="stow") as pool:
        futures = {pool.submit(one, *item): item[0] for item in todo}
        try:
            for future in as_completed(futures):
                stored += future.result()
                index.at[futures[future], "written_back"] = True
                unmarked += 1
                if unmarked >= MARK_EVERY:
                    write_index(out_dir, index)
                    unmarked = 0
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        finally:
            if unmarked:
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
    ds.SamplesPerPixel = 1  # a radiograph's; the SR's source image reference asks for an image attribute
    return ds
