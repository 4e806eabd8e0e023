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
from pydicom.charset import convert_encodings, default_encoding
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from cxr.core.labels import LABEL_COLUMNS, PATHOLOGIES
from tasks.images.loader import jpeg_start_of_frame
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
    """The TID 1500 content tree (root container) of one instance's row (scored or rejected).

    The algorithm identification (TID 4019) is stated once per measurement group, which holds
    the measurements: repeated in each measurement as well (TID 300 allows it), it made up 40%
    of the report's content items, and the PACS's time to store a report grows with them."""
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
                measurements=[Measurement(PROBABILITY, float(row[column]), UNIT),
                              Measurement(THRESHOLD, float(thresholds[k]), UNIT)],
                qualitative_evaluations=[QualitativeEvaluation(FLAGGED, YES if row[FLAG_COLUMNS[k]] else NO)]))
    ood_measurements = [] if _num(row.get("ood_score")) is None else [
        Measurement(OOD_SCORE, _num(row["ood_score"]), UNIT)]
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
    source = _patient_study_filled(source)  # highdicom reads these from the evidence
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


def _report_values(source: pydicom.Dataset, row: dict, digest: str, sop_uid: str, encodings) -> dict:
    """The content template's values for one instance; text in the report's character set."""
    from pydicom.charset import encode_string
    from pydicom.valuerep import format_number_as_ds

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
    return values


def fast_structured_report(source: pydicom.Dataset, row: dict, thresholds: np.ndarray, digest: str) -> pydicom.Dataset:
    """`structured_report`, equal dataset, as the write-back makes it (`_fast_sr`: the shape's
    templates, milliseconds, not hundreds), read back."""
    from io import BytesIO

    return pydicom.dcmread(BytesIO(_fast_sr(source, row, thresholds, digest)))


# The overlay goes back as one JPEG baseline frame (quality and chroma as highdicom encodes it,
# YBR_FULL_422), not as uncompressed RGB: a Secondary Capture labelled not for diagnosis, at
# about a twelfth of the bytes for the PACS to take in, store and serve (65 kB against 835 kB
# for a 1,024 x 272 overlay; Orthanc spent a third of the CPU storing it). The scorer writes
# the overlay as such a JPEG (`tasks.scoring.overlay.overlay_jpeg`): its bytes are the frame,
# neither decoded nor compressed a second time. An overlay of another kind (a lossless PNG of
# an earlier run) is decoded and encoded as highdicom does.
SC_TRANSFER_SYNTAX = pydicom.uid.JPEGBaseline8Bit
SC_PHOTOMETRIC = "YBR_FULL_422"


def secondary_capture(source: pydicom.Dataset, overlay: Path, digest: str) -> hd.sc.SCImage:
    """The overlay picture (radiograph, attention box, activation maps) as a colour Secondary
    Capture (JPEG baseline: `SC_TRANSFER_SYNTAX`), built by highdicom."""
    frame, shape = overlay_frame(overlay)
    sc = _secondary_capture(source, np.zeros(shape, dtype=np.uint8), digest)
    sc.PixelData = encapsulate([frame])  # the overlay's own JPEG, in place of highdicom's of the zeros
    return sc


def overlay_frame(overlay: Path) -> tuple[bytes, tuple[int, int, int]]:
    """(JPEG baseline frame, (rows, columns, 3)) of an overlay file: a baseline 8-bit colour
    JPEG (what the scorer writes) as it is on disk; any other picture decoded
    (`overlay_pixels`) and encoded as highdicom encodes a JPEG baseline frame."""
    data = Path(overlay).read_bytes()
    if data[:2] == b"\xff\xd8":
        from io import BytesIO

        with Image.open(BytesIO(data)) as image:
            frame = jpeg_start_of_frame(data)  # 0xC0, baseline: neither progressive nor lossless
            if image.format == "JPEG" and image.mode == "RGB" and frame is not None and frame[0] == 0xC0:
                return data, (image.height, image.width, 3)
    pixels = overlay_pixels(overlay)
    frame = hd.frame.encode_frame(np.ascontiguousarray(pixels, dtype=np.uint8), transfer_syntax_uid=SC_TRANSFER_SYNTAX,
                                  bits_allocated=8, bits_stored=8, photometric_interpretation=SC_PHOTOMETRIC,
                                  pixel_representation=0, planar_configuration=0)
    return frame, pixels.shape


def overlay_pixels(overlay_png: Path) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of an overlay picture. A PNG the scorer wrote with every row
    Up-filtered (`tasks.scoring.overlay.encode_png`, earlier runs' overlays) is undone by ISA-L's
    inflate and one cumulative sum, a third of Pillow's decoding time; any other is Pillow's."""
    data = Path(overlay_png).read_bytes()
    fast = up_filtered_rgb(data)
    if fast is not None:
        return fast
    with Image.open(overlay_png) as image:
        return np.asarray(image.convert("RGB"))


def up_filtered_rgb(data: bytes) -> np.ndarray | None:
    """The pixels of an 8-bit RGB, non-interlaced PNG whose rows are all Up-filtered; else None."""
    from isal import isal_zlib

    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        payload = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
        elif kind[0] & 0x20 == 0:  # a critical chunk other than these (a palette): not this fast path
            return None
        pos += 12 + length
    if header is None or header[2:] != (8, 2, 0, 0, 0):
        return None
    width, height = header[:2]
    try:
        scan = np.frombuffer(isal_zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except isal_zlib.error:
        return None
    if scan.size != height * (1 + 3 * width):
        return None
    scan = scan.reshape(height, 1 + 3 * width)
    if not (scan[:, 0] == 2).all():
        return None
    # Up: each byte is the one above plus the stored difference, mod 256 (above the first row:
    # 0). Row by row: numpy's cumulative sum down the columns takes fifteen times as long.
    out = np.empty((height, 3 * width), dtype=np.uint8)
    out[0] = scan[0, 1:]
    for y in range(1, height):
        np.add(out[y - 1], scan[y, 1:], out=out[y])
    return out.reshape(height, width, 3)


def _secondary_capture(source: pydicom.Dataset, pixels: np.ndarray, digest: str) -> hd.sc.SCImage:
    series_uid, instance_uid = result_uids(str(source.SOPInstanceUID), digest, "sc")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation=SC_PHOTOMETRIC, bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=9902,
        sop_instance_uid=instance_uid, instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"), transfer_syntax_uid=SC_TRANSFER_SYNTAX)
    sc.LossyImageCompression = "01"  # said, as the standard asks of a lossy-compressed image
    sc.LossyImageCompressionMethod = "ISO_10918_1"
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = f"{ALGORITHM} overlay (not for diagnosis)"
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    sc.DerivationDescription = f"{ALGORITHM} {digest[:16]}: attention box and class activation maps"
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def _box_corners(row: dict) -> np.ndarray:
    """The attention box's closed polyline in PIXEL units: (0, 0) is the top left corner of the
    first pixel; the box is inclusive."""
    y0, x0, y1, x1 = (float(row[c]) for c in BOX_COLUMNS)
    return np.array([[x0, y0], [x1 + 1, y0], [x1 + 1, y1 + 1], [x0, y1 + 1], [x0, y0]], dtype=np.float64)


# Patient and study attributes highdicom's presentation state and SR read from their source
# image (Type 2 in both: present, maybe empty); an image without one still gets its results.
_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName")


def _patient_study_filled(source: pydicom.Dataset) -> pydicom.Dataset:
    missing = [keyword for keyword in _PATIENT_STUDY if keyword not in source]
    if not missing:
        return source
    # A template's recording copy is the template's own: filled in place, so it goes on recording.
    filled = source if isinstance(source, _Recorder) else pydicom.Dataset()
    if filled is not source:
        filled.update(source)
    for keyword in missing:
        setattr(filled, keyword, "")
    return filled


def presentation_state(source: pydicom.Dataset, row: dict, digest: str) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The attention box as a grayscale softcopy presentation state over the source image: a
    viewer draws it on the original radiograph (its own window and zoom), not on a picture."""
    series_uid, instance_uid = result_uids(str(source.SOPInstanceUID), digest, "pr")
    source = _patient_study_filled(source)
    corners = _box_corners(row)
    x0, y0 = corners[0]
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


# ---------------------------------------------------------------------- every object, fast
#
# Per instance, highdicom takes ~15 ms to build the Secondary Capture, ~10 ms the presentation
# state and ~6 ms the SR's top level, and pydicom ~9 ms more to encode the three: together as
# long as the PACS takes to store them. What such an object holds depends on the model, on the
# few facts of the source that highdicom reads and decides on (SOP class, size, photometric
# interpretation, VOI and modality LUT, character set, equipment) and, copied unchanged, on
# the source's identity (patient, study, instance: `_IDENTITY`). So highdicom builds each kind
# once per model and per value of what it read, over a copy of the source whose identity is
# replaced by markers, and that build is encoded once with undefined lengths; an instance's
# object is the encoding with each marker's value and length replaced by the instance's (its
# identity, its result UIDs, the time now, its box), and its pixels appended. The copy
# records what highdicom read (`_Recorder`): a source that differs in any of it gets a
# template of its own, so the fast object is highdicom's whatever the source. The test suite
# checks the two ways give the same dataset, and the bytes go to the PACS as they are.

_IDENTITY = {  # source attribute -> its marker; highdicom copies these values, never decides on them
    "StudyInstanceUID": "1.999.997.11", "SeriesInstanceUID": "1.999.997.12", "SOPInstanceUID": "1.999.997.13",
    "PatientID": "XCXRPATIENTID", "PatientName": "XCXRPATIENT^NAME", "PatientBirthDate": "18010203",
    "AccessionNumber": "XCXRACCESSION", "StudyID": "XCXRSTUDYID", "StudyDate": "18020304", "StudyTime": "010203",
    "ReferringPhysicianName": "XCXRREFERRING^NAME", "StudyDescription": "XCXRSTUDYDESCRIPTION",
    "IssuerOfPatientID": "XCXRISSUER", "PatientAge": "123W", "PatientSize": "8.765", "PatientWeight": "876.125",
}
_NOW = {  # attributes highdicom sets to the time of the build -> their markers
    "InstanceCreationDate": "18030405", "InstanceCreationTime": "020304.050607", "ContentDate": "18040506",
    "ContentTime": "030405.060708", "DateOfSecondaryCapture": "18050607", "TimeOfSecondaryCapture": "040506.070809",
    "PresentationCreationDate": "18060708", "PresentationCreationTime": "050607.080910",
}
_CONTRIBUTION_MARK = "18070809101112.131415"  # highdicom's Contribution DateTime (processing equipment)
_IDENTITY_TAGS = {pydicom.datadict.tag_for_keyword(k): k for k in _IDENTITY}
_PIXEL_DATA = 0x7FE00010
# The box of a presentation state template (exact in float32, unlike any real box)
_MARK_BOX = {"box_y0": 0.2265625, "box_x0": 0.1171875, "box_y1": 0.4453125, "box_x1": 0.3359375}
_GRAPHIC_DATA = b"\x70\x00\x22\x00FL\x28\x00"  # (0070,0022) FL, 10 values
_ANCHOR_POINT = b"\x70\x00\x14\x00FL\x08\x00"  # (0070,0014) FL, 2 values


class _Recorder(pydicom.Dataset):
    """A copy of a source header that notes every attribute read from it."""

    def __init__(self, source: pydicom.Dataset):
        super().__init__(dict(source._dict))  # its own mapping (Dataset(source) would share the source's)
        self.__dict__["read"] = set()
        self.__dict__["read_all"] = False

    def _note(self, key) -> None:
        if isinstance(key, str):
            tag = pydicom.datadict.tag_for_keyword(key)
            if tag is None:
                return
            key = tag
        try:
            self.__dict__["read"].add(int(pydicom.tag.Tag(key)))
        except (TypeError, ValueError, OverflowError):
            self.__dict__["read_all"] = True

    def __copy__(self):  # a copy's reads would go unrecorded: count everything as read
        self.__dict__["read_all"] = True
        return pydicom.Dataset(dict(self._dict))

    def __deepcopy__(self, memo):
        import copy

        self.__dict__["read_all"] = True
        return copy.deepcopy(pydicom.Dataset(dict(self._dict)), memo)

    def __getattr__(self, name: str):
        self._note(name)  # (pydicom answers a missing keyword without __getitem__ or __contains__)
        return super().__getattr__(name)

    def __getitem__(self, key):
        if isinstance(key, slice):
            self.__dict__["read_all"] = True
        else:
            self._note(key)
        return super().__getitem__(key)

    def get_item(self, key, *args, **kwargs):
        self._note(key) if not isinstance(key, slice) else self.__dict__.update(read_all=True)
        return super().get_item(key, *args, **kwargs)

    def __contains__(self, key) -> bool:
        self._note(key)
        return super().__contains__(key)

    def data_element(self, name: str):
        self._note(name)
        return super().data_element(name)

    def _everything(self, method: str, *args, **kwargs):
        self.__dict__["read_all"] = True
        return getattr(super(), method)(*args, **kwargs)

    def __iter__(self):
        return self._everything("__iter__")

    def keys(self):
        return self._everything("keys")

    def values(self):
        return self._everything("values")

    def items(self):
        return self._everything("items")

    def elements(self):
        return self._everything("elements")

    def iterall(self):
        return self._everything("iterall")

    def __len__(self) -> int:
        return self._everything("__len__")


def _state(source: pydicom.Dataset, keyword: str) -> str:
    if keyword not in source:
        return "absent"
    value = source[keyword].value
    return "empty" if value is None or value == "" else "value"


def _read_key(source: pydicom.Dataset, read: frozenset | None) -> tuple:
    """What of `source` a template depends on: the value of every attribute highdicom read
    (None: of every attribute), and whether each identity attribute is there and empty."""
    tags = sorted(int(t) for t in source.keys()) if read is None else sorted(read)
    values = []
    for tag in tags:
        if tag in _IDENTITY_TAGS:
            continue
        elem = source.get(tag)  # by tag: a plain Dataset (not a recorder) here
        values.append((tag, None if elem is None else (elem.VR, repr(elem.value))))
    return (tuple(values), tuple(_state(source, k) for k in _IDENTITY))


def _encode_body(ds: pydicom.Dataset, encodings) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds, parent_encoding=encodings)
    return buf.getvalue()


_ASCII_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"}  # (no character set applies)


def _encode_value(tag: int, vr: str, value, encodings) -> bytes:
    """The value bytes (padded) of one element as pydicom writes it, explicit VR little endian."""
    if isinstance(value, str) and (vr in _ASCII_VRS or value.isascii()) and "\\" not in value:
        raw = value.encode("ascii")  # one value in ASCII: pydicom writes it as it is, padded
        return raw + ((b"\x00" if vr == "UI" else b" ") if len(raw) % 2 else b"")
    from pydicom.dataelem import DataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_data_element(buf, DataElement(tag, vr, value), encodings)
    raw = buf.getvalue()
    return raw[12:] if vr.encode() in _LONG_VRS else raw[8:]


def _find_sites(body: bytes, markers: dict[str, str]) -> tuple[list[tuple], set[str]]:
    """(value offset, old length, length field offset or None, its size, site) of every
    length-prefixed occurrence of each marker in `body`; and the sites found."""
    places, found = [], set()
    for marker, site in markers.items():
        raw = marker.encode("ascii")
        uid = marker.startswith("1.")
        padded = raw + ((b"\x00" if uid else b" ") if len(raw) % 2 else b"")
        start = 0
        while (at := body.find(padded, start)) >= 0:
            start = at + 1
            if body[at - 2:at] == len(padded).to_bytes(2, "little") and body[at - 4:at - 2] not in _LONG_VRS:
                places.append((at, len(padded), at - 2, 2, site))
                found.add(site)
            elif body[at - 4:at] == len(padded).to_bytes(4, "little") and body[at - 8:at - 6] in _LONG_VRS:
                places.append((at, len(padded), at - 4, 4, site))
                found.add(site)
    return places, found


def _render(body: bytes, places: list[tuple], values: dict[str, bytes]) -> list[bytes]:
    """`body` with the values put in: as pieces, joined once with the rest of the object."""
    out, pos = [], 0
    for value_at, old_len, len_at, size, site in places:
        raw = values[site]
        if len_at is None:  # a fixed-size value (floats)
            if len(raw) != old_len:
                raise ValueError(f"template: {site} is {len(raw)} bytes, not {old_len}")
            out += [body[pos:value_at], raw]
        else:
            if len(raw) % 2:
                raise ValueError(f"template: {site} has an odd length")
            out += [body[pos:len_at], len(raw).to_bytes(size, "little"), body[len_at + size:value_at], raw]
        pos = value_at + old_len
    out.append(body[pos:])
    return out


_LEFTOVERS = (b"1.999.997.", b"XCXR")


class _ObjectTemplate:
    """One kind of result object for sources alike in what highdicom read: its encoding (the
    elements before and after an optional `split` element, which the instance supplies) with
    the place of every per-instance value."""

    def __init__(self, build, source: pydicom.Dataset, split: int | None = None):
        marked = _Recorder(source)
        present = {}
        for keyword, marker in _IDENTITY.items():
            if _state(source, keyword) == "value":
                vr = source[keyword].VR
                marked[keyword] = pydicom.DataElement(pydicom.datadict.tag_for_keyword(keyword), vr, marker)
                present[keyword] = marker
        marked.__dict__["read"].clear()
        ds = build(marked)
        self.read = None if marked.read_all else frozenset(marked.read)
        self.key = _read_key(source, self.read)
        self.meta = ds.file_meta
        sites = {marker: f"id:{keyword}" for keyword, marker in present.items()}
        sites[str(ds.SeriesInstanceUID)] = "series"
        sites[str(ds.SOPInstanceUID)] = "instance"
        self.now = {}
        for keyword, marker in _NOW.items():
            if keyword in ds:
                ds[keyword] = pydicom.DataElement(pydicom.datadict.tag_for_keyword(keyword), ds[keyword].VR, marker)
                sites[marker] = f"now:{keyword}"
                self.now[keyword] = (pydicom.datadict.tag_for_keyword(keyword), ds[keyword].VR)
        for item in ds.get("ContributingEquipmentSequence", []):  # highdicom's own item: the build's time
            purpose = item.get("PurposeOfReferenceCodeSequence") or [None]
            if "ContributionDateTime" in item and purpose[0] is not None and purpose[0].CodeValue == "109102":
                item.ContributionDateTime = _CONTRIBUTION_MARK
                sites[_CONTRIBUTION_MARK] = "now:ContributionDateTime"
                self.now["ContributionDateTime"] = (0x0018A002, "DT")
        self.split_vr = None
        if split is not None and split in ds:
            self.split_vr = ds[split].VR
            del ds[split]
        _delimit(ds)
        charset = ds.get("SpecificCharacterSet")
        self.encodings = convert_encodings(charset) if charset else [default_encoding]
        head, tail = pydicom.Dataset(), pydicom.Dataset()
        for elem in ds:  # in tag order
            (head if split is None or elem.tag < split else tail).add(elem)
        self.parts = []
        found = set()
        for part in (head, tail):
            body = _encode_body(part, self.encodings) if len(part) else b""
            places, seen = _find_sites(body, sites)
            found |= seen
            self.parts.append([body, sorted(places)])
        missing = {"series", "instance"} - found  # (an identity attribute may not be copied at all)
        if missing:
            raise ValueError(f"template: {sorted(missing)} not found in the encoding")
        self.identity = {keyword: (pydicom.datadict.tag_for_keyword(keyword), marked[keyword].VR)
                         for keyword in present if f"id:{keyword}" in found}

    def add_fixed(self, prefix: bytes, value: bytes, site: str) -> None:
        """A fixed-size value after `prefix` (its element's header), found exactly once."""
        hits = []
        for k, (body, places) in enumerate(self.parts):
            at = body.find(prefix + value)
            if at >= 0:
                hits.append((k, at))
                if body.find(prefix + value, at + 1) >= 0:
                    hits.append((k, at))
        if len(hits) != 1:
            raise ValueError(f"template: {site} found {len(hits)} times")
        k, at = hits[0]
        self.parts[k][1] = sorted([*self.parts[k][1], (at + len(prefix), len(value), None, 0, site)])

    def values(self, source: pydicom.Dataset, digest: str, kind: str) -> dict[str, bytes]:
        import datetime

        from pydicom.valuerep import DA, DT, TM

        series_uid, instance_uid = result_uids(str(source.SOPInstanceUID), digest, kind)
        values = {"series": _uid_bytes(series_uid), "instance": _uid_bytes(instance_uid)}
        for keyword, (tag, vr) in self.identity.items():
            values[f"id:{keyword}"] = _encode_value(tag, vr, source[keyword].value, self.encodings)
        now = datetime.datetime.now()
        for keyword, (tag, vr) in self.now.items():
            text = str(DA(now.date())) if vr == "DA" else str(TM(now.time())) if vr == "TM" else str(DT(now))
            values[f"now:{keyword}"] = _encode_value(tag, vr, text, self.encodings)
        values["_instance_uid"] = instance_uid.encode("ascii")
        return values

    def render(self, values: dict[str, bytes], split: list[bytes] = ()) -> bytes:
        """The instance's whole DICOM file (preamble, file meta, dataset); `split`: the pieces
        of the element the instance supplies."""
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_file_meta_info

        head = _render(self.parts[0][0], self.parts[0][1], values)
        tail = _render(self.parts[1][0], self.parts[1][1], values)
        for leftover in _LEFTOVERS:
            if any(leftover in piece for piece in (*head, *tail)):
                raise ValueError("template: a marker was left in the object")
        meta = pydicom.dataset.FileMetaDataset(self.meta)
        meta.MediaStorageSOPInstanceUID = values["_instance_uid"].decode("ascii")
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_file_meta_info(buf, meta, enforce_standard=True)
        return b"".join([b"\x00" * 128, b"DICM", buf.getvalue(), *head, *split, *tail])


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _element(tag: int, vr: str, value: bytes) -> list[bytes]:
    """One explicit VR little endian element of long VR (OB, SQ...) with a defined length: its
    header and its value (padded to even length)."""
    pad = b"\x00" if len(value) % 2 else b""
    header = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode() + b"\x00\x00" + struct.pack("<I", len(value) + len(pad))
    return [header, value, pad]


_OBJECT_TEMPLATES: dict[tuple, list[_ObjectTemplate]] = {}


def _object_template(kind: tuple, source: pydicom.Dataset, build, split: int | None = None,
                     prepare=None) -> _ObjectTemplate:
    """The template of `kind` for `source`: one made for a source alike in what highdicom read,
    or a new one (then `prepare` adds its fixed-size sites)."""
    with _TEMPLATES_LOCK:
        made = _OBJECT_TEMPLATES.setdefault(kind, [])
        for template in made:
            if _read_key(source, template.read) == template.key:
                return template
        template = _ObjectTemplate(build, source, split)
        if prepare is not None:
            prepare(template)
        made.append(template)
        return template


def result_templates() -> dict[str, int]:
    """How many templates of each kind ("sr", "sc", "pr") this process has made."""
    with _TEMPLATES_LOCK:
        counts: dict[str, int] = {}
        for kind, made in _OBJECT_TEMPLATES.items():
            counts[kind[0]] = counts.get(kind[0], 0) + len(made)
        return counts


def forget_result_templates() -> None:
    with _TEMPLATES_LOCK:
        _OBJECT_TEMPLATES.clear()


def _fast_sc(source: pydicom.Dataset, frame: bytes, shape: tuple[int, int, int], digest: str) -> bytes:
    """The Secondary Capture of an overlay from its JPEG baseline `frame` of `shape` (`overlay_frame`)."""
    template = _object_template(
        ("sc", digest, tuple(shape)), source,
        lambda marked: _secondary_capture(marked, np.zeros(shape, dtype=np.uint8), digest), split=_PIXEL_DATA)
    # The frame encapsulated as highdicom does it (pydicom's, with an offset table), under an
    # undefined-length Pixel Data element closed by its delimiter.
    header = struct.pack("<HH2sHI", _PIXEL_DATA >> 16, _PIXEL_DATA & 0xFFFF, b"OB", 0, 0xFFFFFFFF)
    delimiter = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return template.render(template.values(source, digest, "sc"), [header, encapsulate([frame]), delimiter])


def _fast_pr(source: pydicom.Dataset, row: dict, digest: str) -> bytes:
    marks = _box_corners(_MARK_BOX).astype(np.float32)

    def prepare(template: _ObjectTemplate) -> None:
        template.add_fixed(_GRAPHIC_DATA, marks.tobytes(), "graphic")
        template.add_fixed(_ANCHOR_POINT, marks[0].tobytes(), "anchor")

    template = _object_template(("pr", digest), source, lambda marked: presentation_state(marked, _MARK_BOX, digest),
                                prepare=prepare)
    values = template.values(source, digest, "pr")
    corners = _box_corners(row).astype("<f4")
    values["graphic"], values["anchor"] = corners.tobytes(), corners[0].tobytes()
    return template.render(values)


def _fast_sr(source: pydicom.Dataset, row: dict, thresholds: np.ndarray, digest: str) -> bytes:
    from highdicom.sr import ImageContentItem

    content = _template(thresholds, digest, row)
    sop_uid = str(source.SOPInstanceUID)

    def build(marked):
        small = pydicom.Dataset()
        for elem in content.root_attrs:
            small.add(elem)
        small.ContentSequence = [ImageContentItem(
            name=CodedConcept("260753009", "SCT", "Source"), referenced_sop_class_uid=marked.SOPClassUID,
            referenced_sop_instance_uid=marked.SOPInstanceUID, relationship_type="CONTAINS")]
        return _sr(marked, small, digest)

    template = _object_template(("sr", id(content)), source, build, split=_CONTENT_SEQUENCE)
    body = content.render(_report_values(source, row, digest, sop_uid, template.encodings))
    sequence = [struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00\xff\xff\xff\xff", body, b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"]
    return template.render(template.values(source, digest, "sr"), sequence)


def encoded_results(header: pydicom.Dataset, row: dict, out_dir: Path, thresholds, digest: str) -> list[bytes]:
    """`result_datasets`, each object as the DICOM file (bytes) that STOW-RS sends: made from
    the templates above; highdicom builds (and pydicom encodes) any object a template cannot make."""
    scored = row["status"] == "scored"
    overlay = Path(out_dir) / row["overlay"] if scored and row.get("overlay") else None
    boxed = scored and _has_box(header, row)
    out = []
    try:
        out.append(_fast_sr(header, row, thresholds, digest))
        if overlay is not None and overlay.exists():
            out.append(_fast_sc(header, *overlay_frame(overlay), digest))
        if boxed:
            out.append(_fast_pr(header, row, digest))
    except ValueError as exc:  # a template that cannot be made: highdicom builds them in full
        log.warning("result template not usable (%s); building the objects in full", exc)
        out = [_file_bytes(ds) for ds in result_datasets(header, row, out_dir, thresholds, digest)]
    return out


def _has_box(header: pydicom.Dataset, row: dict) -> bool:
    """Whether the presentation state can be drawn: an image to draw on and the whole box."""
    return "Rows" in header and all(_num(row.get(c)) is not None for c in BOX_COLUMNS)


def _file_bytes(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def result_datasets(header: pydicom.Dataset, row: dict, out_dir: Path, thresholds, digest: str) -> list:
    """What one instance gets back: SR always; for a scored one, the SC of its overlay and the
    GSPS; built by highdicom (the reference of `encoded_results`)."""
    datasets = [structured_report(header, row, thresholds, digest)]
    if row["status"] == "scored":
        if row.get("overlay") and (out_dir / row["overlay"]).exists():
            datasets.append(secondary_capture(header, out_dir / row["overlay"], digest))
        if _has_box(header, row):
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
        objects = encoded_results(header, row, out_dir, scorer.thresholds, digest)
        source.store(objects, entry["study_instance_uid"])
        return len(objects)

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
