"""A PACS as a source and a sink, against a real Orthanc (Debian's orthanc + orthanc-dicomweb,
installed by scripts/install-orthanc.sh, started by scripts/pacs.sh on loopback with
authentication; one per session): QIDO-RS/WADO-RS in, the one Scorer, SR + Secondary Capture +
presentation state back over STOW-RS; a `cxr score --dicomweb` killed mid-run and resumed; the
nightly deployment on a PACS; the study page's viewer link; and `cxr receive` fed by storescu."""

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
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import NIH_SAMPLE, ROOT, STUDIES, registered_copy

pytestmark = pytest.mark.slow

DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """The one Orthanc of the session (only this module uses it), from the project's scripts."""
    if shutil.which("Orthanc") is None and shutil.which("apt-get") is None:
        pytest.skip("Orthanc is not installed and apt-get is not available")
    state = tmp_path_factory.mktemp("orthanc")
    user, password = "cxr-test", "pw-" + secrets.token_hex(8)
    env = dict(os.environ, CXR_PACS_DIR=str(state), CXR_DICOMWEB_USER=user, CXR_DICOMWEB_PASSWORD=password,
               CXR_PACS_HTTP_PORT=str(_free_port()), CXR_PACS_DICOM_PORT=str(_free_port()))
    started = subprocess.run([str(ROOT / "scripts" / "pacs.sh"), "start"], env=env, capture_output=True, text=True)
    if started.returncode != 0 and "apt" in started.stderr:
        pytest.skip(f"could not install Orthanc: {started.stderr[-300:]}")
    assert started.returncode == 0, started.stderr
    assert password not in started.stdout + started.stderr
    url = started.stdout.strip().splitlines()[-1]
    status = subprocess.run([str(ROOT / "scripts" / "pacs.sh"), "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.strip().splitlines()[-1] == url
    assert password not in status.stdout + status.stderr and password not in (state / "orthanc.log").read_text()
    yield {"url": url, "user": user, "password": password, "http": url.rsplit("/dicom-web", 1)[0],
           "dicom_port": int((state / "dicom_port").read_text()), "env": env}
    subprocess.run([str(ROOT / "scripts" / "pacs.sh"), "stop"], env=env, check=False)
    assert subprocess.run([str(ROOT / "scripts" / "pacs.sh"), "status"], env=env, capture_output=True).returncode == 3


def _dataset(pixels: np.ndarray, *, modality: str, sop_class: str, body_part: str, study_uid: str | None = None,
             date: str = "20200101", photometric: str = "MONOCHROME2", patient: str = "P1") -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient, "Test^Patient", "19700101", "O"
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
    knee = _dataset(png, modality="CR", sop_class=CR_CLASS, body_part="KNEE")
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
    assert summary["stored_back"] == 7  # SR + SC + GSPS for two scored instances, an SR for the knee

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
        # JPEG baseline, said to be lossy: its one frame is the overlay JPEG of the run folder,
        # byte for byte (not compressed twice), and shows that picture.
        assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50" and sc.LossyImageCompression == "01"
        assert row["overlay"].endswith(".jpg")
        jpeg = (out / row["overlay"]).read_bytes()
        jpeg += b"\x00" * (len(jpeg) % 2)  # an encapsulated fragment is padded to an even length
        assert list(generate_frames(sc.PixelData, number_of_frames=1)) == [jpeg]
        overlay = np.asarray(Image.open(out / row["overlay"]).convert("RGB"), dtype=np.float64)
        assert sc.pixel_array.shape == overlay.shape and np.abs(sc.pixel_array - overlay).mean() < 1.0
        # The attention box as a presentation state over the source image, in its pixel corners.
        prs = _series_of(orthanc, src.StudyInstanceUID, "PR")
        assert len(prs) == 1
        pr_series = prs[0]["0020000E"]["Value"][0]
        pr_sop = _qido(orthanc, f"studies/{src.StudyInstanceUID}/series/{pr_series}/instances")[0]["00080018"]["Value"][0]
        pr = _wado(orthanc, src.StudyInstanceUID, pr_series, pr_sop)
        assert pr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"  # grayscale softcopy presentation state
        assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        graphic = pr.GraphicAnnotationSequence[0].GraphicObjectSequence[0]
        xs, ys = graphic.GraphicData[0::2], graphic.GraphicData[1::2]
        assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
        assert (min(xs), min(ys), max(xs), max(ys)) == (row["box_x0"], row["box_y0"], row["box_x1"] + 1, row["box_y1"] + 1)
        assert 0 <= row["box_x0"] <= row["box_x1"] < src.Columns and 0 <= row["box_y0"] <= row["box_y1"] < src.Rows
    knee_srs = _series_of(orthanc, pacs["knee"].StudyInstanceUID, "SR")
    assert len(knee_srs) == 1 and not _series_of(orthanc, pacs["knee"].StudyInstanceUID, "OT")
    assert not _series_of(orthanc, pacs["knee"].StudyInstanceUID, "PR")
    # The CT study was never retrieved, and nothing was stored into it.
    assert [s["00080060"]["Value"][0] for s in _qido(orthanc, f"studies/{pacs['ct'].StudyInstanceUID}/series")] == ["CT"]
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
    assert third["stored_back"] == 7 and _count(orthanc) == count
    # No credential in any file the runs wrote.
    secret = orthanc["password"].encode()
    assert not [p for p in out.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_the_query_pages_through_a_pacs_that_caps_its_answers(orthanc, pacs, monkeypatch):
    from tasks.scoring import dicomweb

    monkeypatch.setattr(dicomweb, "QIDO_PAGE", 1)  # a page per instance: every page but the last is full
    source = dicomweb.DicomWebSource(orthanc["url"], user=orthanc["user"], password=orthanc["password"])
    found = source.instances()
    assert sorted(i.sop_instance_uid for i in found) == sorted(str(pacs[k].SOPInstanceUID) for k in ("real", "dx", "knee"))
    dx = next(i for i in found if i.sop_instance_uid == str(pacs["dx"].SOPInstanceUID))
    assert (dx.study_instance_uid, dx.series_instance_uid) == (str(pacs["dx"].StudyInstanceUID), str(pacs["dx"].SeriesInstanceUID))
    assert source.instances(dt.date(2999, 1, 1)) == []


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


def test_cli_score_dicomweb_refuses_a_bad_url_or_a_stopped_pacs_before_prefect(tmp_path):
    """No Prefect server is given: the answer comes from the preflight query, in seconds."""
    import time

    from tests.conftest import run_cxr

    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}  # would fail loudly if a run started
    for url, says in (("not-a-url", "is not a DICOMweb URL"),
                      (f"http://u:pw-{secrets.token_hex(4)}@127.0.0.1:{_free_port()}/dicom-web", "unreachable")):
        t0 = time.time()
        result = run_cxr("score", "--dicomweb", url, "--out", str(tmp_path / "out"), env=env, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        text = result.stdout + result.stderr
        assert "Traceback" not in text and says in text and text.count("cxr score: error:") == 1
        assert "pw-" not in text and not (tmp_path / "out").exists()
        assert time.time() - t0 < 30


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


# ---------------------------------------------------------------------- more of the real PACS

def _today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


def _nih_cr(k: int, date: dt.date, *, patient: str) -> Dataset:
    """NIH sample radiograph number k as a chest CR dated `date`, in a study of its own."""
    png = sorted((NIH_SAMPLE / "images").glob("*.png"))[k]
    pixels = np.asarray(Image.open(png).convert("L"))
    return _dataset(pixels, modality="CR", sop_class=CR_CLASS, body_part="CHEST", date=date.strftime("%Y%m%d"),
                    patient=patient)


def _results_of(orthanc, study_uid) -> dict[str, int]:
    """{modality: instances} of the result series (SR, OT, PR) in a study."""
    out = {}
    for series in _qido(orthanc, f"studies/{study_uid}/series"):
        modality = series["00080060"]["Value"][0]
        if modality in ("SR", "OT", "PR"):
            n = len(_qido(orthanc, f"studies/{study_uid}/series/{series['0020000E']['Value'][0]}/instances"))
            out[modality] = out.get(modality, 0) + n
    return out


def _params_file(params, path: Path) -> Path:
    path.write_text(params.model_dump_json(by_alias=True))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def nightly_store(orthanc, pacs, pacs_params, prefect_server, tmp_path_factory):
    """The nightly deployment's flow on the PACS, twice: everything the first night, then only what is new."""
    from cxr.core.config import Params
    from flows.nightly import nightly_scoring_flow

    root = Path(pacs_params.paths.reports).parent / "nightly-pacs"
    data = pacs_params.model_dump(mode="json", by_alias=True)
    data["paths"]["reports"] = str(root)
    data["nightly"] = {**data["nightly"], "source": "dicomweb", "dicomweb_url": orthanc["url"]}
    data["source"] = {"lookback_days": 2}
    params = Params.model_validate(data)
    cfg = _params_file(params, tmp_path_factory.mktemp("nightly") / "params.yaml")
    today = _today()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_DICOMWEB_USER", orthanc["user"])
        mp.setenv("CXR_DICOMWEB_PASSWORD", orthanc["password"])
        mp.delenv("CXR_DICOMWEB_TOKEN", raising=False)
        first = nightly_scoring_flow(params_file=str(cfg), day=(today - dt.timedelta(days=1)).isoformat())
        new = {"today": _nih_cr(40, today, patient="NEW1"),
               "late": _nih_cr(41, today - dt.timedelta(days=1), patient="NEW2"),  # arrived late, within the lookback
               "old": _nih_cr(42, today - dt.timedelta(days=30), patient="NEW3")}  # older than the lookback
        for ds in new.values():
            _upload(orthanc, _bytes(ds))
        second = nightly_scoring_flow(params_file=str(cfg), day=today.isoformat())
    return {"root": root, "store": root / "nightly", "first": first, "second": second, "new": new, "params": params,
            "prefect": prefect_server}


def test_nightly_on_a_pacs_scores_only_what_is_newer_than_its_last_run(orthanc, nightly_store):
    from tasks.scoring.dicomweb import read_index, read_state
    from tasks.scoring.rows import read_scores

    first, second, new, store = nightly_store["first"], nightly_store["second"], nightly_store["new"], nightly_store["store"]
    assert first["since"] is None and first["instances_found"] >= 3  # no watermark yet: every CR/DX study
    assert read_state(store)["watermark"] == _today().isoformat()
    assert second["since"] == (_today() - dt.timedelta(days=2)).isoformat()
    assert second["instances_found"] == 2 and second["already_scored_instances"] == 0
    assert second["stored_back"] == 6  # SR + SC + presentation state for each of the two
    index = read_index(store)
    took = set(index.loc[index["run_id"] == second["run_id"], "sop_instance_uid"])
    assert took == {str(new["today"].SOPInstanceUID), str(new["late"].SOPInstanceUID)}
    assert _results_of(orthanc, new["today"].StudyInstanceUID) == {"SR": 1, "OT": 1, "PR": 1}
    assert _results_of(orthanc, new["old"].StudyInstanceUID) == {}
    scores = read_scores(store)
    assert scores["sha256"].is_unique and len(scores) == len(index)
    # Each night keeps its dated report and summary.
    for day in (_today() - dt.timedelta(days=1), _today()):
        assert (store / day.isoformat() / "summary.json").is_file()
    assert (store / _today().isoformat() / "report.html").is_file()
    # No credential in the store or in the Prefect runs (parameters and logs).
    secret = orthanc["password"]
    assert not [p for p in nightly_store["root"].rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    api = nightly_store["prefect"]
    runs = requests.post(f"{api}/flow_runs/filter", json={"limit": 200, "sort": "START_TIME_DESC"}, timeout=30).json()
    assert any(orthanc["url"] in json_dumps(r["parameters"]) for r in runs), "the PACS flow run was not recorded"
    assert secret not in json_dumps(runs)
    logs = requests.post(f"{api}/logs/filter", json={"limit": 200, "sort": "TIMESTAMP_DESC"}, timeout=30).json()
    assert logs and secret not in json_dumps(logs)


def json_dumps(value) -> str:
    import json

    return json.dumps(value, default=str)


def test_the_study_page_of_a_pacs_study_links_to_the_viewer(orthanc, nightly_store, tmp_path):
    import httpx

    from cxr.core.config import Params
    from tasks.scoring.dicomweb import read_index
    from tasks.scoring.rows import read_scores
    from tests.app_helpers import threaded_app

    data = nightly_store["params"].model_dump(mode="json", by_alias=True)
    data["app"] = {**data["app"], "store": str(nightly_store["root"].parent / "app-pacs"), "runs": [str(nightly_store["root"])],
                   "viewer_url": f"{orthanc['http']}/app/explorer.html#study?uuid={{orthanc_study_id}}"}
    params = Params.model_validate(data)
    src = nightly_store["new"]["today"]
    index = read_index(nightly_store["store"]).set_index("sop_instance_uid")
    scores = read_scores(nightly_store["store"]).set_index("sha256")
    name = Path(scores.loc[index.loc[str(src.SOPInstanceUID), "sha256"], "json"]).stem
    with threaded_app(params) as url, httpx.Client(base_url=url, timeout=60) as client:
        runs = {r["run_id"]: r for r in client.get("/api/v1/runs").json()}
        assert runs["nightly"]["kind"] == "nightly" and runs["nightly"]["studies"] == len(index)
        assert f"nightly~{_today().isoformat()}" in runs
        assert "nightly" in client.get("/runs").text
        page = client.get(f"/runs/nightly/studies/{name}")
    assert page.status_code == 200
    html = page.text
    assert f'<code id="study-uid">{src.StudyInstanceUID}</code>' in html
    assert orthanc["password"] not in html
    link = html.split('id="viewer-link" href="', 1)[1].split('"', 1)[0]
    assert link.startswith(f"{orthanc['http']}/app/explorer.html#study?uuid=")
    # The link names the study Orthanc holds: its id answers with the same StudyInstanceUID.
    study = requests.get(f"{orthanc['http']}/studies/{link.rsplit('=', 1)[1]}",
                         auth=(orthanc["user"], orthanc["password"]), timeout=30)
    assert study.status_code == 200 and study.json()["MainDicomTags"]["StudyInstanceUID"] == src.StudyInstanceUID
    # With a {study_uid} template (OHIF's) the link carries the UID itself; without one, no link.
    from app.pacs_link import pacs_facts
    from app.runs import Run

    run = Run("nightly", nightly_store["store"].resolve(), "nightly")
    row = scores.loc[index.loc[str(src.SOPInstanceUID), "sha256"]].to_dict()
    row["sha256"] = index.loc[str(src.SOPInstanceUID), "sha256"]
    ohif = pacs_facts(run, row, "https://pacs.example/viewer?StudyInstanceUIDs={study_uid}")
    assert ohif["viewer_link"] == f"https://pacs.example/viewer?StudyInstanceUIDs={src.StudyInstanceUID}"
    assert pacs_facts(run, row, "")["viewer_link"] is None


def test_cxr_receive_takes_a_c_store_from_storescu(pacs_params, tmp_path):
    """The real `cxr receive` command, fed by dcmtk's storescu (pynetdicom's when dcmtk is missing)."""
    import signal
    import sys

    from tests.conftest import clean_env, VENV_BIN

    incoming, port = Path(pacs_params.paths.reports).parent / "incoming-received", _free_port()
    data = pacs_params.model_dump(mode="json", by_alias=True)
    data["paths"]["incoming"] = str(incoming)
    from cxr.core.config import Params

    cfg = _params_file(Params.model_validate(data), tmp_path / "params.yaml")
    png = np.asarray(Image.open(STUDIES / "00000001_000.png").convert("L"))
    cr = _dataset(png, modality="CR", sop_class=CR_CLASS, body_part="CHEST")
    sent = tmp_path / "sent.dcm"
    sent.write_bytes(_bytes(cr))
    proc = subprocess.Popen([str(VENV_BIN / "cxr"), "--params", str(cfg), "receive", "--port", str(port)],
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        while not seen or "receiving C-STORE" not in seen[-1]:
            line = proc.stdout.readline()
            assert line, f"cxr receive exited: {''.join(seen)}"
            seen.append(line)
        assert f"on 127.0.0.1:{port}" in seen[-1], seen  # loopback unless told otherwise
        if shutil.which("storescu"):
            scu = ["storescu", "-aec", "CXR", "127.0.0.1", str(port), str(sent)]
        else:
            scu = [sys.executable, "-m", "pynetdicom", "storescu", "-aec", "CXR", "127.0.0.1", str(port), str(sent)]
        done = subprocess.run(scu, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        received = incoming / f"{cr.SOPInstanceUID}.dcm"
        assert received.is_file() and pydicom.dcmread(received).SOPInstanceUID == cr.SOPInstanceUID
        assert [p.name for p in incoming.iterdir()] == [received.name]  # no temporary file left
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # no listener left behind for the rest of the session
            raise
    assert proc.returncode == 0 and "Traceback" not in rest and "receiver stopped" in rest


def test_a_killed_cli_run_resumes_and_duplicates_nothing(orthanc, pacs, pacs_params, creds, prefect_server, tmp_path):
    """SIGKILL of `cxr score --dicomweb` while it stores results back; the rerun completes it all once."""
    import signal

    from tests.conftest import clean_env, VENV_BIN
    from tasks.scoring.dicomweb import read_index, score_dicomweb
    from tasks.scoring.rows import read_scores

    day = _today() - dt.timedelta(days=20)
    sources = [_nih_cr(k, day, patient=f"KILL{k}") for k in range(24)]
    for ds in sources:
        _upload(orthanc, _bytes(ds))
    baseline = _count(orthanc)
    out = Path(pacs_params.paths.reports) / "pacs-kill"
    cfg = _params_file(pacs_params, tmp_path / "params.yaml")
    log = tmp_path / "cli.log"
    env = clean_env({"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"})
    since = (day - dt.timedelta(days=1)).isoformat()
    with open(log, "wb") as handle:
        proc = subprocess.Popen([str(VENV_BIN / "cxr"), "--params", str(cfg), "score", "--dicomweb", orthanc["url"],
                                 "--out", str(out), "--since", since], cwd=ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        try:
            while _count(orthanc) < baseline + 3:  # one instance's SR, SC and presentation state
                assert proc.poll() is None, f"cxr exited ({proc.returncode}) before storing: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no result stored back within 240 s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _count(orthanc)
    assert baseline < killed_at < baseline + 3 * len(sources), "the kill did not land mid-write-back"
    assert orthanc["password"] not in log.read_text()

    again = score_dicomweb(pacs_params, orthanc["url"], out, since=dt.date.fromisoformat(since))
    # Nothing fetched or scored again; only what the kill left unstored is stored now.
    assert again["already_scored_instances"] == again["instances_found"] >= len(sources)
    # (Studies another test stored in this window get results under the UIDs they already have.)
    assert _count(orthanc) == baseline + 3 * len(sources)
    for ds in sources:
        assert _results_of(orthanc, ds.StudyInstanceUID) == {"SR": 1, "OT": 1, "PR": 1}
    index = read_index(out)
    assert {str(ds.SOPInstanceUID) for ds in sources} <= set(index["sop_instance_uid"])
    assert index["sop_instance_uid"].is_unique and index["written_back"].all()
    scores = read_scores(out)
    assert len(scores) == len(index) and scores["sha256"].is_unique and (scores["status"] == "scored").all()


@pytest.mark.parametrize("shape", ["flagged-ood", "rejected"])
def test_the_fast_report_is_the_highdicom_report(shape):
    """The write-back's report (a per-shape template with the instance's values written in)
    equals highdicom's full build of it, element for element, after a DICOM round trip."""
    from io import BytesIO

    from cxr.core.labels import LABEL_COLUMNS
    from tasks.scoring.dicom_sink import fast_structured_report, structured_report

    header = pydicom.dcmread(STUDIES / "Fake_MONOHR1.dcm", stop_before_pixels=True)
    rng = np.random.default_rng(len(shape))
    row = {c: float(p) for c, p in zip(LABEL_COLUMNS, rng.random(14))}
    row.update({f"{c}_flag": bool(row[c] > 0.5) for c in LABEL_COLUMNS})
    row.update(status="scored", reason=None, ood_score=float(rng.random() * 40), ood_flag=False)
    if shape == "flagged-ood":
        row.update(ood_flag=True, reason="out of distribution: feature distance 31.2 over 12.5 (Ünïcode)")
    if shape == "rejected":
        row = {**{c: None for c in row}, "status": "rejected", "reason": "not a chest radiograph: BodyPartExamined is KNEE"}
    thresholds, digest = rng.random(14), "d" * 64
    ignore = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "ContributingEquipmentSequence")

    def round_trip(sr):
        buf = BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        ds = pydicom.dcmread(BytesIO(buf.getvalue()))
        for keyword in ignore:
            ds.pop(keyword, None)
        return ds

    full = round_trip(structured_report(header, row, thresholds, digest))
    fast = round_trip(fast_structured_report(header, row, thresholds, digest))
    assert fast == full
    if shape == "flagged-ood":  # text beyond ASCII, in the report's character set
        assert "Ünïcode" in _text(fast)
    # The template, reused: the same report again; another reason's length in a report alike.
    assert round_trip(fast_structured_report(header, row, thresholds, digest)) == fast
    if shape == "rejected":
        row2 = {**row, "reason": "download failed: HTTP 404 Not Found (a reason of another length)"}
        assert round_trip(fast_structured_report(header, row2, thresholds, digest)) == \
            round_trip(structured_report(header, row2, thresholds, digest))


def _headers() -> dict[str, Dataset]:
    """Source headers unlike each other in what highdicom reads or copies: the real MONOCHROME1
    CR (JPEG), a DX, a CR in Latin-1 with accents in its names, one without accession number
    and with an empty birth date, and a CR alike the first but for its identity."""
    real = pydicom.dcmread(STUDIES / "Fake_MONOHR1.dcm", stop_before_pixels=True)
    png = np.asarray(Image.open(STUDIES / "00000001_000.png").convert("L"))
    dx = _dataset(png[:300, :200], modality="DX", sop_class=DX_CLASS, body_part="CHEST", patient="DX1")
    latin = _dataset(png, modality="CR", sop_class=CR_CLASS, body_part="CHEST", patient="LAT1")
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName, latin.ReferringPhysicianName = "Müller^Jörg", "Ærø^Søren"
    sparse = _dataset(png, modality="CR", sop_class=CR_CLASS, body_part="CHEST", patient="SP1")
    del sparse.AccessionNumber
    sparse.PatientBirthDate = ""
    twin = real.copy()
    twin.SOPInstanceUID, twin.StudyInstanceUID, twin.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    twin.PatientID, twin.PatientName, twin.StudyDate, twin.StudyTime = "TWIN-7", "Twin^Other", "20240229", "235959"
    twin.PatientAge = "061Y" if twin.get("PatientAge") != "061Y" else "062Y"  # copied, never decided on
    headers = {"real": real, "dx": dx, "latin": latin, "sparse": sparse, "twin": twin}
    for name, ds in headers.items():
        if name != "real":  # as a downloaded header is: read back from its file, without pixels
            ds = pydicom.dcmread(BytesIO(_bytes(ds)), stop_before_pixels=True)
        headers[name] = ds
    return headers


from io import BytesIO  # noqa: E402


def test_the_fast_objects_are_highdicoms_objects(tmp_path):
    """The write-back's SR, Secondary Capture and presentation state (templates made by
    highdicom once per kind of source, the instance's values written into their encoding)
    equal highdicom's own build of each, element for element and in their file meta, for
    sources unlike each other; a source alike another in all highdicom reads reuses its
    template; the build times are the time now."""
    from cxr.core.labels import LABEL_COLUMNS
    from tasks.scoring.dicom_sink import encoded_results, forget_result_templates, result_datasets, result_templates
    from tasks.scoring.overlay import overlay_jpeg, render_overlay, save_png

    rng = np.random.default_rng(7)
    thresholds, digest = rng.random(14), "e" * 64
    now = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "DateOfSecondaryCapture",
           "TimeOfSecondaryCapture", "PresentationCreationDate", "PresentationCreationTime")
    ignore = now
    # The scorer's overlay (a JPEG, carried as the frame) and an earlier run's PNG (encoded).
    overlays = ["overlays/x.jpg", "overlays/x.png"]
    (tmp_path / "overlays").mkdir()
    gray, cams = rng.random((96, 80)), rng.random((2, 96, 80))
    (tmp_path / overlays[0]).write_bytes(overlay_jpeg(gray, (10, 12, 60, 50), cams, ["a", "b", "c"]))
    save_png(render_overlay(gray, (10, 12, 60, 50), cams, ["a", "b", "c"]), tmp_path / overlays[1])

    def read(data: bytes) -> Dataset:
        ds = pydicom.dcmread(BytesIO(data))
        for keyword in ignore:
            ds.pop(keyword, None)
        for item in ds.get("ContributingEquipmentSequence", []):
            if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102":  # highdicom's: the build's time
                assert item.ContributionDateTime[:8] == dt.date.today().strftime("%Y%m%d")
                del item.ContributionDateTime
        return ds

    forget_result_templates()
    for i, (name, header) in enumerate(_headers().items()):
        overlay = overlays[i % 2]
        row = {c: float(p) for c, p in zip(LABEL_COLUMNS, rng.random(14))}
        row.update({f"{c}_flag": bool(row[c] > 0.5) for c in LABEL_COLUMNS})
        row.update(status="scored", reason=None, ood_score=float(rng.random() * 40), ood_flag=bool(name == "latin"),
                   overlay=overlay, box_y0=3.0, box_x0=7.0, box_y1=float(header.Rows - 9), box_x1=float(header.Columns - 2))
        fast = encoded_results(header, row, tmp_path, thresholds, digest)
        full = [_bytes(ds) for ds in result_datasets(header, row, tmp_path, thresholds, digest)]
        assert len(fast) == len(full) == 3, name
        for data, reference in zip(fast, full):
            a, b = read(data), read(reference)
            assert a == b, (name, a.SOPClassUID, [e.keyword for e in b if e.tag not in a or a[e.tag] != e])
            assert a.file_meta == b.file_meta, name
            when = pydicom.dcmread(BytesIO(data))
            assert when.InstanceCreationDate == dt.date.today().strftime("%Y%m%d"), name
        if name == "latin":
            assert str(read(fast[0]).PatientName) == "Müller^Jörg"
    # One template per kind for the real CR and its twin; the other sources differ in what highdicom reads.
    assert result_templates() == {"sr": 4, "sc": 4, "pr": 4}


def test_the_secondary_capture_carries_the_overlay_jpeg_and_encodes_anything_else(tmp_path):
    """The Secondary Capture's frame: the scorer's overlay JPEG as it is on disk; a progressive
    JPEG or a PNG decoded and encoded as a baseline frame of the same picture."""
    from tasks.images.loader import jpeg_start_of_frame
    from tasks.scoring.dicom_sink import overlay_frame
    from tasks.scoring.overlay import overlay_jpeg, save_png

    y, x = np.mgrid[0:64, 0:48] / np.array([63.0, 47.0])[:, None, None]  # smooth, as radiographs and maps are
    gray, cams = 0.2 + 0.6 * y * x, np.stack([y, x, (y + x) / 2])
    ours = overlay_jpeg(gray, (4, 5, 40, 30), cams, ["a", "b", "c", "d"])
    (tmp_path / "ours.jpg").write_bytes(ours)
    frame, shape = overlay_frame(tmp_path / "ours.jpg")
    assert frame == ours and shape == (64 + 16, 4 * 48, 3)
    picture = np.asarray(Image.open(BytesIO(ours)).convert("RGB"))
    Image.fromarray(picture).save(tmp_path / "progressive.jpg", quality=95, progressive=True)
    save_png(picture, tmp_path / "lossless.png")
    for name in ("progressive.jpg", "lossless.png"):
        frame, shape = overlay_frame(tmp_path / name)
        assert jpeg_start_of_frame(frame)[0] == 0xC0 and shape == picture.shape, name
        again = np.asarray(Image.open(BytesIO(frame)).convert("RGB"), dtype=np.float64)
        assert np.abs(again - picture).mean() < 4.0, name  # the titles and box lines are sharp


def test_the_overlay_is_read_back_as_pillow_reads_it(tmp_path):
    """An earlier run's overlay PNG: the scorer's Up-filtered PNG decoded by the fast path,
    any other PNG by Pillow; the same pixels either way."""
    from tasks.scoring.dicom_sink import overlay_pixels, up_filtered_rgb
    from tasks.scoring.overlay import save_png

    rgb = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    save_png(rgb, tmp_path / "ours.png")
    Image.fromarray(rgb).save(tmp_path / "pillow.png", optimize=True)  # adaptive filters
    assert up_filtered_rgb((tmp_path / "ours.png").read_bytes()) is not None
    assert up_filtered_rgb((tmp_path / "pillow.png").read_bytes()) is None
    for name in ("ours.png", "pillow.png"):
        assert np.array_equal(overlay_pixels(tmp_path / name), rgb)
