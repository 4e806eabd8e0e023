"""A PACS as a scoring source: QIDO-RS for new chest CR/DX instances, WADO-RS into a run folder,
then the one batch path (`tasks.scoring.run.score_studies`, the one `Scorer`).

- Credentials come from CXR_DICOMWEB_USER / CXR_DICOMWEB_PASSWORD or a bearer token in
  CXR_DICOMWEB_TOKEN (or user:password@ in the URL, which is then stripped). They live only in
  the HTTP session: every URL, message, row and summary uses the scrubbed URL.
- Transient faults (connection refused, timeouts, 5xx) are retried with backoff, then one
  DataError names the URL and what was wrong; 401/403 (and other 4xx) are not retried.
- The watermark (`pacs_state.json` in the out dir) is the UTC date of the last successful run;
  the next query takes studies from that date less `lookback_days` (or `--since`); with no
  watermark and no `since`, every CR/DX study. Instances already scored by the same model are
  skipped by SOPInstanceUID (`dicom_index.parquet`, written after each run is folded).
- An instance whose header says it is not a chest radiograph (BodyPartExamined not CHEST, a
  non-image SOP class) or that fails to download is a `rejected` row with the reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import requests

from cxr.core.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from cxr.core.config import Params
from cxr.core.digest import file_sha256
from cxr.core.errors import DataError
from tasks.scoring.rows import SCHEMA, ScoredStudy, base_row, consolidate, read_scores, study_json_bytes
from tasks.scoring.dicom_index import INDEX_FILE, INDEX_SCHEMA, read_index, write_index  # noqa: F401
from tasks.scoring.studies import Study

log = logging.getLogger("cxr.pacs")

MODALITIES = ("CR", "DX")
STATE_FILE = "pacs_state.json"
# Concurrent WADO-RS retrievals (and STOW-RS stores) of one run.
FETCH_THREADS = 4
# Matches asked for per QIDO-RS request (a page; the query goes on until one comes back short).
QIDO_PAGE = 1000
# Image storage SOP classes a chest radiograph may come in.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX (presentation, processing)
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",  # secondary capture (8/16-bit grey)
}
_T_STUDY, _T_SERIES, _T_SOP, _T_CLASS = "0020000D", "0020000E", "00080018", "00080016"
_T_DATE = "00080020"


def scrub_url(url: str) -> str:
    """The URL without user:password@ (and without a query string, which may carry a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


@dataclass
class Instance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None


class DicomWebSource:
    """QIDO-RS / WADO-RS / STOW-RS against one DICOMweb root, with retries and scrubbed errors."""

    def __init__(self, url: str, *, user: str | None = None, password: str | None = None, token: str | None = None,
                 retries: int = 3, backoff: float = 0.5, timeout: float = 30.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DataError("is not a DICOMweb URL: give its root as http(s)://host[:port]/path "
                            "(for Orthanc with its DICOMweb plugin, http://host:8042/dicom-web)", where=scrub_url(url))
        user = user or parts.username and _unquote(parts.username) or os.environ.get("CXR_DICOMWEB_USER")
        password = password or parts.password and _unquote(parts.password) or os.environ.get("CXR_DICOMWEB_PASSWORD")
        token = token or os.environ.get("CXR_DICOMWEB_TOKEN")
        self.url = scrub_url(url)
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or netrc credentials from the environment
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif user:
            self.session.auth = (user, password or "")
        self._secrets = [s for s in (password, token) if s]

    def __repr__(self) -> str:  # never the credentials
        return f"DicomWebSource({self.url!r})"

    # ------------------------------------------------------------------ HTTP

    def _fail(self, what: str, where: str | None = None) -> DataError:
        for secret in self._secrets:
            what = what.replace(secret, "***")
        return DataError(f"DICOMweb server {what}", where=where or self.url)

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """One request with retries on transient faults; DataError (scrubbed) when it fails."""
        url = f"{self.url}/{path.lstrip('/')}"
        kwargs.setdefault("timeout", self.timeout)
        for attempt in range(self.retries + 1):
            try:
                response = self.session.request(method, url, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                what = f"unreachable ({type(exc).__name__}: connection refused or timed out)"
                if attempt < self.retries:
                    log.warning("%s: %s; retry %d of %d", self.url, what, attempt + 1, self.retries)
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                raise self._fail(f"{what}, after {self.retries + 1} attempts") from None
            except requests.RequestException as exc:  # a URL requests cannot use: not worth a retry
                raise self._fail(f"cannot be asked ({type(exc).__name__})") from None
            if response.status_code >= 500:
                if attempt < self.retries:
                    log.warning("%s: HTTP %d; retry %d of %d", self.url, response.status_code, attempt + 1, self.retries)
                    response.close()
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                raise self._fail(f"answered HTTP {response.status_code} {response.reason} "
                                 f"after {self.retries + 1} attempts")
            if response.status_code in (401, 403):
                raise self._fail(f"refused the credentials (HTTP {response.status_code} {response.reason}); "
                                 "check CXR_DICOMWEB_USER/CXR_DICOMWEB_PASSWORD or CXR_DICOMWEB_TOKEN")
            if response.status_code >= 400:
                raise self._fail(f"answered HTTP {response.status_code} {response.reason} to {method} {path}")
            return response
        raise AssertionError("unreachable")

    def qido(self, path: str, params: dict | None = None) -> list[dict]:
        response = self.request("GET", path, params=params, headers={"Accept": "application/dicom+json"})
        if response.status_code == 204 or not response.content:
            return []
        return response.json()

    def check(self) -> None:
        """One small query: a stopped server or refused credentials raise their DataError now,
        before a run is started (the same messages the run would give)."""
        self.qido("studies", {"limit": "1"})

    # ------------------------------------------------------------------ QIDO-RS

    def instances(self, since: dt.date | None = None) -> list[Instance]:
        """Every CR/DX instance (of studies dated `since` or later, when given), unique by UID.

        One instance-level query per modality at the DICOMweb root, paged: a request per page
        of QIDO_PAGE instances rather than two per study (its series, then each series'
        instances). Modality is the series' own, so other series of a study (our SR and SC
        among them) are left out by the query.
        """
        found: dict[str, Instance] = {}
        for modality in MODALITIES:
            params = {"Modality": modality}
            if since is not None:
                params["StudyDate"] = since.strftime("%Y%m%d") + "-"
            for page in self._pages("instances", params):
                new = 0
                for item in page:
                    sop = _value(item, _T_SOP)
                    if sop and sop not in found:
                        found[sop] = Instance(_value(item, _T_STUDY), _value(item, _T_SERIES), sop, _value(item, _T_CLASS))
                        new += 1
                if not new:  # a PACS that ignores `offset` answers the same page again: that is all
                    break
        return list(found.values())

    def _pages(self, path: str, params: dict):
        """The matches of one QIDO-RS query, page by page (`limit`, `offset`) until a page
        comes back short: a PACS may cap one answer below what it holds."""
        offset = 0
        while True:
            page = self.qido(path, {**params, "limit": str(QIDO_PAGE), "offset": str(offset)})
            if page:
                yield page
            if len(page) < QIDO_PAGE:
                return
            offset += len(page)

    # ------------------------------------------------------------------ WADO-RS

    def retrieve(self, inst: Instance, dest: Path, max_bytes: int) -> None:
        """Stream one instance to `dest` (atomically), never holding more than max_bytes of it.

        DataError when it is over the limit or the answer is not one DICOM part.
        """
        path = f"studies/{inst.study_instance_uid}/series/{inst.series_instance_uid}/instances/{inst.sop_instance_uid}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        # identity: the PACS sends the DICOM bytes as stored. A gzip answer (what requests asks
        # for by default, and what Orthanc gives unless told otherwise) costs the PACS a
        # compression and us a decompression per instance, for pixels that shrink little and a
        # network (the hospital's, or loopback) that is not the bottleneck.
        response = self.request("GET", path, headers={"Accept": accept, "Accept-Encoding": "identity"}, stream=True)
        limit = max_bytes + 64 * 1024  # the multipart envelope
        with response, tempfile.TemporaryFile(dir=dest.parent) as raw:
            size = 0
            for chunk in response.iter_content(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise DataError(f"instance is over the limit of {max_bytes} bytes (score.max_bytes)",
                                    where=inst.sop_instance_uid)
                raw.write(chunk)
            raw.seek(0)
            body = raw.read()
        ctype = response.headers.get("Content-Type", "")
        match = re.search(r'boundary="?([^";]+)"?', ctype)
        if match:
            delim = b"--" + match.group(1).encode()
            parts = [p for p in body.split(delim) if p.strip(b"\r\n-")]
            if len(parts) != 1 or b"\r\n\r\n" not in parts[0]:
                raise DataError("WADO-RS answer is not one DICOM part", where=inst.sop_instance_uid)
            body = parts[0].split(b"\r\n\r\n", 1)[1]
            body = body[:-2] if body.endswith(b"\r\n") else body
        if len(body) > max_bytes:
            raise DataError(f"instance of {len(body)} bytes is over the limit of {max_bytes} bytes (score.max_bytes)",
                            where=inst.sop_instance_uid)
        # Whole or absent, but not flushed to disk: a retrieved copy lives only for this run
        # and is fetched again if the run dies before its rows are committed.
        atomic_write_bytes(dest, body, durable=False)

    # ------------------------------------------------------------------ STOW-RS

    def store(self, objects: list, study_uid: str) -> None:
        """STOW-RS the objects into the study, in one multipart request. Each is a DICOM file's
        bytes (sent as they are) or a pydicom dataset (encoded as a file here)."""
        from io import BytesIO

        boundary = secrets.token_hex(16)
        chunks = []
        for obj in objects:
            if not isinstance(obj, (bytes, bytearray, memoryview)):
                buf = BytesIO()
                obj.save_as(buf, enforce_file_format=True)
                obj = buf.getvalue()
            chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), obj, b"\r\n"]
        chunks.append(f"--{boundary}--\r\n".encode())
        self.request("POST", f"studies/{study_uid}", data=b"".join(chunks), headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json", "Accept-Encoding": "identity"})  # a short answer: not worth gzip


def _unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)


# ---------------------------------------------------------------------- the run store


def read_state(out_dir: Path) -> dict:
    import json

    path = Path(out_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}






def header_reason(path: Path, inst: Instance) -> str | None:
    """Why the header says this is not a chest radiograph (None when it may be one)."""
    return _header_check(path, inst)[0]


def _header_check(path: Path, inst: Instance) -> tuple[str | None, pydicom.Dataset | None]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable header is a rejected row
        return f"not a readable DICOM file ({type(exc).__name__})", None
    sop_class = str(ds.get("SOPClassUID", inst.sop_class_uid or ""))
    if sop_class not in IMAGE_SOP_CLASSES:
        return f"not a radiograph image: SOP class {sop_class or 'missing'}", ds
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body and body != "CHEST":
        return f"not a chest radiograph: BodyPartExamined is {body}", ds
    return None, ds


def orthanc_study_id(patient_id: str, study_uid: str) -> str:
    """Orthanc's identifier of a study (SHA-1 of "PatientID|StudyInstanceUID", 5 dashed groups),
    for links into Orthanc Explorer (`app.viewer_url` with {orthanc_study_id})."""
    import hashlib

    h = hashlib.sha1(f"{patient_id}|{study_uid}".encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def _file_name(sop_uid: str) -> str:
    """A server-given UID as a file name: digits and dots only (no path can be smuggled in)."""
    return re.sub(r"[^0-9.]", "_", sop_uid)[:128] + ".dcm"


def _server_failing(exc: DataError) -> bool:
    text = str(exc)
    return "refused the credentials" in text or "unreachable" in text or "HTTP 5" in text


def _fetch(source: "DicomWebSource", inst: Instance, run_dir: Path, max_bytes: int, digest: str) -> tuple[dict, str | None]:
    """Retrieve one instance into `run_dir` and check its header: (its index entry, why it is refused)."""
    dest = run_dir / _file_name(inst.sop_instance_uid)
    reason = None
    try:
        source.retrieve(inst, dest, max_bytes)
    except DataError as exc:
        if _server_failing(exc):
            raise  # the server itself is failing: the run stops (the rerun resumes)
        reason = f"download failed: {exc}"
    sha = file_sha256(dest) if dest.exists() else None
    header = None
    if reason is None:
        reason, header = _header_check(dest, inst)
    patient = None if header is None else str(header.get("PatientID", "") or "")
    entry = {"study_id": dest.name, "sha256": sha, "model_digest": digest,
             "study_instance_uid": inst.study_instance_uid, "series_instance_uid": inst.series_instance_uid,
             "sop_instance_uid": inst.sop_instance_uid, "sop_class_uid": inst.sop_class_uid, "source_url": source.url,
             "orthanc_study_id": None if header is None else orthanc_study_id(patient, inst.study_instance_uid),
             "written_back": False}
    return entry, reason


def _since(params: Params, out_dir: Path, since: dt.date | None) -> dt.date | None:
    if since is not None:
        return since
    mark = read_state(out_dir).get("watermark")
    if not mark:
        return None
    return dt.date.fromisoformat(mark) - dt.timedelta(days=params.source.lookback_days)


def score_dicomweb(params: Params, url: str, out_dir: Path, *, since: dt.date | None = None,
                   write_back: bool | None = None, models_dir: Path | None = None,
                   source: DicomWebSource | None = None) -> dict:
    """Score the new chest CR/DX instances of a DICOMweb server into `out_dir`; store results back.

    Returns the run's summary (as `score_studies`, plus the PACS counts); the URL in it is scrubbed.
    """
    from tasks.scoring.run import score_studies
    from tasks.scoring.scorer import Scorer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = source or DicomWebSource(url)
    write_back = params.score.write_back if write_back is None else write_back
    write_back = True if write_back is None else write_back
    scorer = Scorer.load(params, models_dir=models_dir)  # no registered bundle: nothing is fetched
    digest = scorer.digest
    started = dt.datetime.now(dt.timezone.utc)
    window = _since(params, out_dir, since)
    index = read_index(out_dir)
    done = set(index.loc[index["model_digest"] == digest, "sop_instance_uid"])
    t0 = time.perf_counter()
    found = source.instances(window)
    timings = {"query_s": time.perf_counter() - t0}
    todo = [i for i in found if i.sop_instance_uid not in done]
    stamp = started.strftime("%Y%m%dT%H%M%S%fZ")
    run_dir = out_dir / "pacs" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    rows, rejected = [], []
    max_bytes = params.score.max_bytes
    # WADO-RS retrievals overlap (one HTTP session, a few connections): the PACS answers while
    # this process hashes and reads headers.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="wado") as pool:
        fetched = list(pool.map(lambda i: _fetch(source, i, run_dir, max_bytes, digest), todo))
    timings["fetch_s"] = time.perf_counter() - t0 - timings["query_s"]
    t1 = time.perf_counter()
    for entry, reason in fetched:
        dest = run_dir / entry["study_id"]
        if reason is not None:
            rejected.append((Study(entry["study_id"], dest, entry["sha256"], reason), entry))
            if dest.exists():  # kept aside: not in the folder the scorer reads
                dest.rename(run_dir.parent / f"{stamp}-rejected-{dest.name}")
        rows.append(entry)

    run_id = None
    summary: dict = {}
    scorable = any(run_dir.iterdir())
    if rejected:
        run_id = f"{stamp}-pacs"
        part_rows = []
        for study, _ in rejected:
            row = base_row(study, digest, run_id, "rejected")
            atomic_write_bytes(out_dir / row["json"], study_json_bytes(ScoredStudy(row)))
            part_rows.append(row)
        with atomic_path(out_dir / "parts" / f"part-{run_id}-header.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(part_rows, schema=SCHEMA), tmp)
    if scorable:
        summary = score_studies(params, run_dir, out_dir, models_dir=models_dir)
    elif rejected:
        consolidate(out_dir)
    else:
        run_dir.rmdir()
    scores = read_scores(out_dir)
    scores = scores[scores["model_digest"] == digest].drop_duplicates(["sha256", "model_digest"])
    by_sha = {s: r for s, r in zip(scores["sha256"], scores.to_dict("records"))}
    for entry in rows:
        row = by_sha.get(entry["sha256"])
        entry["status"] = None if row is None else row["status"]
        entry["run_id"] = None if row is None else row["run_id"]
    index = pd.concat([index, pd.DataFrame(rows, columns=INDEX_SCHEMA.names)], ignore_index=True)
    write_index(out_dir, index)  # before write-back: a kill after it stores the same UIDs again, harmlessly

    timings["score_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    stored = 0
    if write_back:
        from tasks.scoring.dicom_sink import write_back_index

        stored = write_back_index(source, out_dir, scorer, threads=FETCH_THREADS)
    atomic_write_json(out_dir / STATE_FILE, {"watermark": started.date().isoformat(), "source_url": source.url,
                                             "last_run": started.isoformat(), "model_digest": digest})
    n_rej_header = len(rejected)
    return {**summary, "source_url": source.url,
            "since": None if window is None else window.isoformat(), "instances_found": len(found),
            "already_scored_instances": len(found) - len(todo), "header_rejected": n_rej_header,
            "stored_back": stored, "model_digest": digest,
            "seconds": {**{k: round(v, 3) for k, v in timings.items()},
                        "write_back_s": round(time.perf_counter() - t2, 3)},
            "message": (summary.get("message", "no new instances to score") +
                        f"; {len(todo)} new instances from {source.url}, {n_rej_header} refused by header, "
                        f"{stored} result objects stored back")}


def credentials_to_env(url: str) -> None:
    """Move user:password@ of a URL into CXR_DICOMWEB_USER/PASSWORD of this process (if any)."""
    parts = urlsplit(url)
    if parts.username:
        os.environ["CXR_DICOMWEB_USER"] = _unquote(parts.username)
        os.environ["CXR_DICOMWEB_PASSWORD"] = _unquote(parts.password or "")
