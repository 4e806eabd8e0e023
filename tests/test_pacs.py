"""A PACS as a source and a sink, against a real Orthanc (Debian's orthanc + orthanc-dicomweb,
started by scripts/orthanc.sh on loopback with authentication): QIDO-RS/WADO-RS in, the one
Scorer, SR + Secondary Capture back over STOW-RS; and the C-STORE receiver."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import ROOT, STUDIES, registered_copy

pytestmark = pytest.mark.slow

DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if shutil.which("Orthanc") is None and shutil.which("apt-get") is None:
        pytest.skip("Orthanc is not installed and apt-get is not available")
    state = tmp_path_factory.mktemp("orthanc")
    user, password = "cxr-test", "pw-" + secrets.token_hex(8)
    env = dict(os.environ, CXR_ORTHANC_DIR=str(state), CXR_DICOMWEB_USER=user, CXR_DICOMWEB_PASSWORD=password)
    started = subprocess.run([str(ROOT / "scripts" / "orthanc.sh"), "start"], env=env, capture_output=True, text=True)
    if started.returncode != 0 and "apt" in started.stderr:
        pytest.skip(f"could not install Orthanc: {started.stderr[-300:]}")
    assert started.returncode == 0, started.stderr
    assert password not in started.stdout + started.stderr
    url = started.stdout.strip().splitlines()[-1]
    yield {"url": url, "user": user, "password": password, "http": url.rsplit("/dicom-web", 1)[0],
           "dicom_port": int((state / "dicom_port").read_text())}
    subprocess.run([str(ROOT / "scripts" / "orthanc.sh"), "stop"], env=env, check=False)


def _dataset(pixels: np.ndarray, *, modality: str, sop_class: str, body_part: str, study_uid: str | None = None,
             date: str = "20260101", photometric: str = "MONOCHROME2") -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Test^Patient", "19700101", "O"
    ds.StudyDate = ds.SeriesDate = date
    ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "120000", "1", "A1", ""
    ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = modality, body_part, 1, 1
    ds.Manufacturer = "test"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    return ds


def _bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _upload(orthanc, data: bytes) -> None:
    r = requests.post(f"{orthanc['http']}/instances", data=data, auth=(orthanc["user"], orthanc["password"]), timeout=30)
    assert r.status_code == 200, r.text


def _count(orthanc) -> int:
    r = requests.get(f"{orthanc['http']}/statistics", auth=(orthanc["user"], orthanc["password"]), timeout=30)
    return r.json()["CountInstances"]


@pytest.fixture(scope="module")
def pacs(orthanc):
    """The shared MONOCHROME1 CR, the shared PNG as a DX, a knee CR and a CT, stored into Orthanc."""
    real = pydicom.dcmread(STUDIES / "Fake_MONOHR1.dcm")
    png = np.asarray(Image.open(STUDIES / "00000001_000.png").convert("L"))
    dx = _dataset(png, modality="DX", sop_class=DX_CLASS, body_part="CHEST")
    knee = _dataset(png, modality="DX", sop_class=DX_CLASS, body_part="KNEE")
    ct = _dataset(png[:256, :256], modality="CT", sop_class=CT_CLASS, body_part="CHEST")
    for data in [(STUDIES / "Fake_MONOHR1.dcm").read_bytes(), _bytes(dx), _bytes(knee), _bytes(ct)]:
        _upload(orthanc, data)
    return {"real": real, "dx": dx, "knee": knee, "ct": ct}


@pytest.fixture
def creds(orthanc, monkeypatch):
    monkeypatch.setenv("CXR_DICOMWEB_USER", orthanc["user"])
    monkeypatch.setenv("CXR_DICOMWEB_PASSWORD", orthanc["password"])
    monkeypatch.delenv("CXR_DICOMWEB_TOKEN", raising=False)


@pytest.fixture(scope="module")
def pacs_params(trained):
    return registered_copy(trained, "models-pacs")


def _qido(orthanc, path, **params):
    r = requests.get(f"{orthanc['url']}/{path}", params=params, auth=(orthanc["user"], orthanc["password"]),
                     headers={"Accept": "application/dicom+json"}, timeout=30)
    assert r.status_code in (200, 204), r.text
    return r.json() if r.content else []


def _wado(orthanc, study, series, sop) -> Dataset:
    from io import BytesIO

    r = requests.get(f"{orthanc['http']}/dicom-web/studies/{study}/series/{series}/instances/{sop}",
                     auth=(orthanc["user"], orthanc["password"]), timeout=30,
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200
    boundary = r.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    part = [p for p in r.content.split(b"--" + boundary) if p.strip(b"\r\n-")][0]
    return pydicom.dcmread(BytesIO(part.split(b"\r\n\r\n", 1)[1]))


def _series_of(orthanc, study_uid, modality):
    return [s for s in _qido(orthanc, f"studies/{study_uid}/series") if s["00080060"]["Value"][0] == modality]


def _sr_values(sr: Dataset) -> dict:
    """{finding: {"Fusion probability": p, "Operating threshold": t, "Flagged ...": yes/no}} of an SR."""
    out = {}

    def walk(items, finding=None):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if name == "Finding" and "ConceptCodeSequence" in item:
                finding = item.ConceptCodeSequence[0].CodeMeaning
            if item.ValueType == "NUM":
                out.setdefault(finding, {})[name] = float(item.MeasuredValueSequence[0].NumericValue)
            if item.ValueType == "CODE" and finding is not None:
                out.setdefault(finding, {})[name] = item.ConceptCodeSequence[0].CodeMeaning
            if "ContentSequence" in item:
                walk(item.ContentSequence, finding)

    for group in sr.ContentSequence:
        if "ContentSequence" in group:
            walk(group.ContentSequence)
    return out


def _all_texts(sr: Dataset) -> dict[str, set]:
    """{concept name: {text values}} of every TEXT item of an SR, at any depth."""
    out: dict[str, set] = {}

    def walk(items):
        for item in items:
            if item.ValueType == "TEXT":
                out.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, set()).add(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out


def _text(sr: Dataset) -> str:
    return " ".join(str(i.TextValue) for i in sr.ContentSequence if i.ValueType == "TEXT")


def test_score_from_pacs_and_write_back(orthanc, pacs, pacs_params, creds, tmp_path):
    from cxr.core.labels import LABEL_COLUMNS, PATHOLOGIES
    from tasks.scoring.dicomweb import read_index, score_dicomweb
    from tasks.scoring.rows import read_scores

    out = Path(pacs_params.paths.reports) / "pacs-run"
    t0 = time.time()
    summary = score_dicomweb(pacs_params, orthanc["url"], out)
    print(f"first run {time.time() - t0:.1f}s: {summary['message']}")
    assert orthanc["password"] not in repr(summary)
    scores = read_scores(out)
    index = read_index(out)
    by_sop = index.set_index("sop_instance_uid")
    # CR/DX instances only: the CT study is left out by the query itself.
    assert set(index["sop_instance_uid"]) == {str(pacs[k].SOPInstanceUID) for k in ("real", "dx", "knee")}
    rows = scores.set_index("sha256").loc[by_sop["sha256"]].set_index(by_sop.index)
    knee = rows.loc[str(pacs["knee"].SOPInstanceUID)]
    assert knee["status"] == "rejected" and "KNEE" in knee["reason"]
    for key in ("real", "dx"):
        assert rows.loc[str(pacs[key].SOPInstanceUID), "status"] == "scored"
    assert by_sop.loc[str(pacs["dx"].SOPInstanceUID), "study_instance_uid"] == str(pacs["dx"].StudyInstanceUID)
    assert summary["stored_back"] == 5  # SR + SC for two scored instances, an SR for the knee

    # The results are in the source studies: an SR (14 findings, probabilities = scores.parquet) and an SC.
    for key in ("real", "dx"):
        src = pacs[key]
        srs, scs = _series_of(orthanc, src.StudyInstanceUID, "SR"), _series_of(orthanc, src.StudyInstanceUID, "OT")
        assert len(srs) == 1 and len(scs) == 1
        sr_series = srs[0]["0020000E"]["Value"][0]
        sr_sop = _qido(orthanc, f"studies/{src.StudyInstanceUID}/series/{sr_series}/instances")[0]["00080018"]["Value"][0]
        sr = _wado(orthanc, src.StudyInstanceUID, sr_series, sr_sop)
        values = _sr_values(sr)
        row = rows.loc[str(src.SOPInstanceUID)]
        found = {f: v for f, v in values.items() if f in PATHOLOGIES}
        assert len(found) == 14
        for pathology, column in zip(PATHOLOGIES, LABEL_COLUMNS):
            assert abs(found[pathology]["Fusion probability"] - row[column]) < 1e-4
            assert 0 < found[pathology]["Operating threshold"] < 1
            assert found[pathology]["Flagged at the operating threshold"] == ("Yes" if row[f"{column}_flag"] else "No")
        texts = _all_texts(sr)
        assert texts.get("Algorithm Name") == {"cxr AG-CNN"} and texts.get("Algorithm Version") == {row["model_digest"][:64]}
        assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        sc_series = scs[0]["0020000E"]["Value"][0]
        sc_sop = _qido(orthanc, f"studies/{src.StudyInstanceUID}/series/{sc_series}/instances")[0]["00080018"]["Value"][0]
        sc = _wado(orthanc, src.StudyInstanceUID, sc_series, sc_sop)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert "NOT FOR DIAGNOSIS" in sc.ImageComments and sc.BurnedInAnnotation == "YES"
    knee_srs = _series_of(orthanc, pacs["knee"].StudyInstanceUID, "SR")
    assert len(knee_srs) == 1 and not _series_of(orthanc, pacs["knee"].StudyInstanceUID, "OT")
    ks = knee_srs[0]["0020000E"]["Value"][0]
    ksop = _qido(orthanc, f"studies/{pacs['knee'].StudyInstanceUID}/series/{ks}/instances")[0]["00080018"]["Value"][0]
    assert "Not assessed" in _text(_wado(orthanc, pacs["knee"].StudyInstanceUID, ks, ksop))
    assert "KNEE" in _text(_wado(orthanc, pacs["knee"].StudyInstanceUID, ks, ksop))

    # A rerun stores nothing new, and scores nothing again.
    count = _count(orthanc)
    again = score_dicomweb(pacs_params, orthanc["url"], out)  # the watermark: studies dated before today - 7 days
    assert again["instances_found"] == 0 and again["stored_back"] == 0
    since = dt.date(1900, 1, 1)  # every study again: each instance is skipped by its SOPInstanceUID
    again = score_dicomweb(pacs_params, orthanc["url"], out, since=since)
    assert again["instances_found"] == 3 and again["already_scored_instances"] == 3 and again["stored_back"] == 0
    assert _count(orthanc) == count
    assert len(read_scores(out)) == len(scores)
    # Forgetting the write-back marks (a kill after scoring) stores the same UIDs: still nothing new.
    idx = read_index(out)
    idx["written_back"] = False
    from tasks.scoring.dicomweb import write_index

    write_index(out, idx)
    third = score_dicomweb(pacs_params, orthanc["url"], out, since=since)
    assert third["stored_back"] == 5 and _count(orthanc) == count
    # No credential in any file the runs wrote.
    secret = orthanc["password"].encode()
    assert not [p for p in out.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_wrong_password_is_one_clear_error(orthanc, pacs, pacs_params, monkeypatch, tmp_path):
    from cxr.core.errors import DataError
    from tasks.scoring.dicomweb import score_dicomweb

    wrong = "wrong-" + secrets.token_hex(6)
    monkeypatch.setenv("CXR_DICOMWEB_USER", orthanc["user"])
    monkeypatch.setenv("CXR_DICOMWEB_PASSWORD", wrong)
    t0 = time.time()
    with pytest.raises(DataError) as err:
        score_dicomweb(pacs_params, orthanc["url"], Path(pacs_params.paths.reports) / "pacs-wrong")
    assert time.time() - t0 < 5  # 401 is not retried
    message = str(err.value)
    assert orthanc["url"] in message and "credentials" in message and "401" in message
    assert wrong not in message and orthanc["password"] not in message


def test_unreachable_pacs_is_retried_then_one_error(pacs_params, creds, tmp_path, caplog):
    from cxr.core.errors import DataError
    from tasks.scoring.dicomweb import DicomWebSource, score_dicomweb

    url = f"http://u:secret-in-url@127.0.0.1:{_free_port()}/dicom-web"
    source = DicomWebSource(url, retries=2, backoff=0.05)
    with caplog.at_level("WARNING", logger="cxr.pacs"):
        with pytest.raises(DataError) as err:
            score_dicomweb(pacs_params, url, Path(pacs_params.paths.reports) / "pacs-down", source=source)
    message = str(err.value)
    assert "127.0.0.1" in message and "unreachable" in message and "3 attempts" in message
    assert "secret-in-url" not in message + caplog.text and "u:" not in message
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2


def test_cli_score_dicomweb_wrong_password(orthanc, pacs, pacs_params, tmp_path):
    """`cxr score --dicomweb` with wrong credentials: one message, non-zero exit, no secret anywhere."""
    from tests.conftest import run_cxr

    cfg = tmp_path / "params.yaml"
    cfg.write_text(pacs_params.model_dump_json())  # JSON is YAML
    wrong = "wrong-" + secrets.token_hex(6)
    env = {"CXR_DICOMWEB_USER": orthanc["user"], "CXR_DICOMWEB_PASSWORD": wrong, "PREFECT_API_URL": "",
           "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true"}
    result = run_cxr("score", "--dicomweb", orthanc["url"], "--out", str(Path(pacs_params.paths.reports) / "cli-wrong"),
                     "--params", str(cfg), env=env, timeout=240)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert orthanc["url"] in text and "credentials" in text
    assert wrong not in text and orthanc["password"] not in text


def test_c_store_receiver(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import BasicTextSRStorage, DigitalXRayImageStorageForPresentation

    from tasks.scoring.receive import REFUSED_NOT_IMAGE, make_receiver

    incoming, port = tmp_path / "incoming", _free_port()
    server = make_receiver(incoming, port=port, ae_title="CXR")
    try:
        png = np.asarray(Image.open(STUDIES / "00000001_000.png").convert("L"))
        dx = _dataset(png, modality="DX", sop_class=DX_CLASS, body_part="CHEST")
        sr = Dataset()
        sr.SOPClassUID, sr.SOPInstanceUID = BasicTextSRStorage, generate_uid()
        sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = generate_uid(), generate_uid(), "SR"
        sr.file_meta = FileMetaDataset()
        sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ae = AE(ae_title="SCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        ae.add_requested_context(BasicTextSRStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR")
        assert assoc.is_established
        assert assoc.send_c_store(dx).Status == 0x0000
        assert assoc.send_c_store(sr).Status == REFUSED_NOT_IMAGE
        assoc.release()
    finally:
        server.shutdown()
    files = list(incoming.iterdir())
    assert [f.name for f in files] == [f"{dx.SOPInstanceUID}.dcm"]
    assert pydicom.dcmread(files[0]).SOPInstanceUID == dx.SOPInstanceUID
