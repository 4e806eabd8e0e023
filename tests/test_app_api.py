"""The web app's JSON API against the real `cxr app` command on a free loopback port, with the
real trained model: a PNG, a JPEG and the MONOCHROME1 DICOM scored, a corrupt file and a photo
refused with reasons, 413 over score.max_bytes, repeated uploads answered from the record, the
runs browser over a real batch run, nothing served outside the app's folders, no server path
in any answer, the token rules, and a bounded load test (no 5xx, flat memory, nothing lost)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket

import httpx
import pytest

from cxr.core.labels import PATHOLOGIES
from tests.app_helpers import (DICOM, NIH_PNG, TOKEN, app_params, corrupt, cxr_app, jpeg_of, photo, post_file,
                               rss_bytes, threaded_app)
from tests.conftest import NIH_SAMPLE, ROOT, STUDIES, run_cxr

MAX_BYTES = 2_000_000  # small, so that the 413 test sends a few MB, not 200


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("app-api")
    params, params_file = app_params(trained, root, "api", batch_window_ms=20)
    params = params.model_copy(update={"score": params.score.model_copy(update={"max_bytes": MAX_BYTES})})
    params_file.write_text(params_file.read_text().replace("max_bytes: 200000000", f"max_bytes: {MAX_BYTES}"))
    # A real batch run for the runs browser: `cxr score`'s own in-process path, into the runs folder.
    from tasks.scoring.run import score_studies

    batch_out = params.app.runs[0] / "scoring"
    score_studies(params, STUDIES, batch_out)
    with cxr_app(params_file, log=root / "app.log") as (url, proc):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield {"url": url, "proc": proc, "client": client, "params": params, "root": root, "batch": batch_out,
                   "answers": []}
    # Stopping folded the app run's parts into scores.parquet (the lifespan's close).
    assert (params.app_store() / "scores.parquet").exists()


def _kept(served, response: httpx.Response) -> httpx.Response:
    served["answers"].append(response)
    return response


def _check_scored(body: dict) -> None:
    assert body["status"] == "scored", body
    assert set(body["probabilities"]) == set(PATHOLOGIES)
    assert all(0.0 <= p <= 1.0 for p in body["probabilities"].values())
    assert set(body["flags"]) == set(PATHOLOGIES)
    flagged = [p for p in PATHOLOGIES if body["flags"][p]]
    assert body["flagged"] == ", ".join(flagged)
    for branch in ("global", "local", "fusion"):
        assert set(body["branch_probabilities"][branch]) == set(PATHOLOGIES)
    assert body["branch_probabilities"]["fusion"] == pytest.approx(body["probabilities"], abs=1e-6)
    assert body["page"] == f"/runs/app/studies/{body['sha256']}"
    assert "ood" in body and "ood_score" in body


@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom"])
def test_a_radiograph_is_scored_and_its_page_shows_it(served, tmp_path, kind):
    client = served["client"]
    path = {"png": NIH_PNG, "dicom": DICOM, "jpeg": None}[kind] or jpeg_of(NIH_PNG, tmp_path / "nih.jpg")
    response = _kept(served, post_file(client, path))
    assert response.status_code == 200, response.text
    body = response.json()
    _check_scored(body)
    assert body["source_path"] == path.name
    page = _kept(served, client.get(body["page"]))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.count("<tr class=\"finding") == 14
    assert "not a diagnostic device" in page.text
    for picture in ("radiograph.png", "crop.png", "cam-0.png", f"cam-{PATHOLOGIES.index('Nodule')}.png"):
        image = client.get(f"{body['page']}/{picture}")
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n", picture


def test_a_repeated_upload_answers_from_the_record(served):
    client = served["client"]
    first = post_file(client, NIH_PNG, "again.png")
    second = _kept(served, post_file(client, NIH_PNG, "again-renamed.png"))
    assert second.status_code == 200
    assert second.headers["x-cxr-record"] == "hit"
    assert second.json() == first.json()


@pytest.mark.parametrize("kind", ["corrupt", "photo", "empty"])
def test_bad_uploads_are_refused_with_a_reason(served, tmp_path, kind):
    client = served["client"]
    path = {"corrupt": lambda: corrupt(tmp_path / "broken.png"), "photo": lambda: photo(tmp_path / "astronaut.png"),
            "empty": lambda: (tmp_path / "empty.png").write_bytes(b"") or tmp_path / "empty.png"}[kind]()
    response = _kept(served, post_file(client, path))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["status"] == "rejected" and body["reason"]
    if kind == "photo":
        assert body["reason"].startswith("out of distribution: "), body["reason"]
    if kind != "empty":
        page = _kept(served, client.get(body["page"]))
        assert page.status_code == 200 and body["reason"][:40] in page.text.replace("&#39;", "'")


def test_an_oversize_upload_is_refused_while_streaming(served):
    """Chunked (no declared length): the server counts, answers 413 once the file passes
    score.max_bytes, and does so before the client has sent the rest (never buffered whole)."""
    host, port = served["url"].removeprefix("http://").split(":")
    head = (b"--cxrb\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.dcm\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /api/v1/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=cxrb\r\n\r\n")
        sent = 0
        for chunk in [head] + [b"\0" * 65536] * (MAX_BYTES // 65536 + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        # The body is not finished (no closing boundary, no last chunk): the answer must come anyway.
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1])
    assert status == 413, answer[:300]
    assert b"score.max_bytes" in answer
    assert sent < 3 * MAX_BYTES
    # With a declared length over any acceptable body the refusal needs no body at all.
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /api/v1/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: %d\r\n\r\n" % (100 * MAX_BYTES))
        assert sock.recv(65536).split(b" ", 2)[1] == b"413"


def test_the_runs_browser_lists_batch_and_app_runs(served):
    client = served["client"]
    runs = {r["run_id"]: r for r in _kept(served, client.get("/api/v1/runs")).json()}
    assert {"app", "scoring"} <= set(runs), runs
    assert runs["scoring"]["kind"] == "batch" and runs["scoring"]["studies"] == 2
    studies = _kept(served, client.get("/api/v1/runs/scoring/studies")).json()["studies"]
    assert len(studies) == 2
    top = [s["max_flagged_probability"] for s in studies if s["max_flagged_probability"] is not None]
    assert top == sorted(top, reverse=True)
    for study in studies:
        # The batch study's page is the same page an upload gets, with the batch overlay.
        page = _kept(served, client.get(study["page"]))
        assert page.status_code == 200 and page.text.count("<tr class=\"finding") == (14 if study["status"] == "scored" else 0)
        assert study["source_path"] == study["study_id"]  # relative, never the server's input path
        if study["status"] == "scored":
            overlay = client.get(f"{study['page']}/overlay")
            assert overlay.status_code == 200 and overlay.content[:3] == b"\xff\xd8\xff"
            assert overlay.headers["content-type"] == "image/jpeg"
    html = _kept(served, client.get("/runs/scoring?sort=study_id&order=asc")).text
    assert html.index("00000001_000.png") < html.index("Fake_MONOHR1.dcm")
    app_rows = _kept(served, client.get("/api/v1/runs/app/studies")).json()["studies"]
    assert any(r["status"] == "scored" for r in app_rows)


def test_the_nightly_store_and_its_dated_folders_are_runs(served):
    """The nightly deployment's layout: a store with scores, and a dated folder per night."""
    import shutil

    import pandas as pd

    client = served["client"]
    nightly = served["params"].app.runs[0] / "nightly"
    shutil.copytree(served["batch"], nightly)
    night_run = pd.read_parquet(nightly / "scores.parquet")["run_id"].iloc[0]
    day = nightly / "2026-11-24"
    day.mkdir()
    (day / "summary.json").write_text(json.dumps({"run_id": night_run, "message": "2 new studies"}))
    runs = {r["run_id"]: r for r in _kept(served, client.get("/api/v1/runs")).json()}
    assert runs["nightly"]["kind"] == "nightly" and runs["nightly~2026-11-24"]["kind"] == "nightly"
    assert runs["nightly~2026-11-24"]["studies"] == 2
    studies = _kept(served, client.get("/api/v1/runs/nightly~2026-11-24/studies")).json()["studies"]
    scored = next(s for s in studies if s["status"] == "scored")
    assert scored["page"].startswith("/runs/nightly~2026-11-24/studies/")
    assert _kept(served, client.get(scored["page"])).text.count('<tr class="finding') == 14
    assert "nightly~2026-11-24" in _kept(served, client.get("/runs")).text


@pytest.mark.parametrize("path", [
    "/runs/..%2F..%2F..%2Fetc/studies/passwd", "/runs/app/studies/..%2F..%2Fscores.parquet",
    "/runs/app/studies/.hidden", "/runs/scoring/studies/00000001_000.png/..%2F..%2F..%2Fscores.parquet",
    "/runs/scoring/studies/00000001_000.png/%2Fetc%2Fpasswd", "/static/..%2F..%2Fcxr%2Fconfig.py",
    "/static/../app/main.py", "/api/v1/runs/..%2Fapp/studies", "/runs/app/studies/" + "a" * 300,
])
def test_nothing_outside_the_app_folders_is_served(served, path):
    response = _kept(served, served["client"].get(path))
    assert response.status_code in (404, 422), (path, response.status_code)
    assert "root:" not in response.text and "import" not in response.text


def test_another_host_name_is_refused_without_a_token(served):
    """DNS rebinding: a page whose name resolves to 127.0.0.1 must not read the app's answers."""
    response = served["client"].get("/api/v1/runs", headers={"Host": "attacker.example"})
    assert response.status_code == 400


def test_no_answer_holds_a_server_path(served):
    roots = [str(ROOT), str(served["root"]), str(NIH_SAMPLE.parent), "/tmp/", str(served["params"].paths.models)]
    assert served["answers"], "runs after the other API tests of this module"
    for response in served["answers"]:
        for root in roots:
            assert root not in response.text, (response.url, root)


def test_only_loopback_without_a_token(served, trained):
    params_file = next(served["root"].glob("params-api.yaml"))
    for host in ("0.0.0.0", "192.0.2.10"):
        refused = run_cxr("--params", str(params_file), "app", "--host", host, "--port", "1",
                          env={TOKEN: ""}, timeout=120)
        assert refused.returncode == 2, refused.stderr
        assert "refusing to listen" in refused.stderr and "CXR_APP_TOKEN" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_a_token_guards_the_api_and_the_pages_and_close_uploads_share_a_forward(served, tmp_path):
    """The same app object with a token and a long batch window, under uvicorn in a thread."""
    token = "t0ken-for-the-test-0123456789"
    params = served["params"]
    params = params.model_copy(update={"app": params.app.model_copy(update={
        "batch_window_ms": 400, "store": params.app_store().parent / "store-token"})})
    with threaded_app(params, token=token) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert post_file(client, NIH_PNG).status_code == 401
        assert client.get("/api/v1/runs").status_code == 401
        assert client.get("/healthz").json() == {"status": "ok"}  # alive, says nothing more
        page = client.get("/runs", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/signin")
        assert client.post("/signin", data={"token": "wrong", "next": "/runs"}).status_code == 401
        signed = client.post("/signin", data={"token": token, "next": "//evil.example/"}, follow_redirects=False)
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        assert client.get("/runs").status_code == 200  # the session cookie
        client.cookies.clear()
        auth = {"Authorization": f"Bearer {token}"}
        before = client.get("/healthz", headers=auth).json()["forward_passes"]
        images = sorted((NIH_SAMPLE / "images").glob("*.png"))[10:16]
        with cf.ThreadPoolExecutor(len(images)) as pool:
            answers = list(pool.map(lambda p: post_file(client, p, headers=auth), images))
        assert [a.status_code for a in answers] == [200] * len(images)
        health = client.get("/healthz", headers=auth).json()
        # Six uploads sent together inside a 400 ms window: one or two forward passes, not six.
        assert health["forward_passes"] - before <= 2, health


def test_a_bounded_load_leaves_no_5xx_no_growth_and_nothing_lost(served):
    """4 clients, 240 requests (80 distinct real radiographs, each sent three times)."""
    url, pid = served["url"], served["proc"].pid
    images = sorted((NIH_SAMPLE / "images").glob("*.png"))[100:180]
    work = images + images[::-1] + images

    def send(paths):
        codes = []
        with httpx.Client(base_url=url, timeout=120) as client:
            for path in paths:
                codes.append(post_file(client, path).status_code)
        return codes

    send(images[:8])  # warm the allocator before the first memory reading
    before = rss_bytes(pid)
    with cf.ThreadPoolExecutor(4) as pool:
        codes = [c for chunk in pool.map(send, [work[i::4] for i in range(4)]) for c in chunk]
    after = rss_bytes(pid)
    assert len(codes) == 240 and not [c for c in codes if c >= 500], codes
    assert set(codes) == {200}
    assert after - before < 150 * 2**20, f"server memory grew by {(after - before) / 2**20:.0f} MiB"
    from cxr.core.digest import file_sha256

    recorded = {r["sha256"] for r in httpx.get(f"{url}/api/v1/runs/app/studies?limit=10000").json()["studies"]}
    assert {file_sha256(p) for p in images} <= recorded
    store = served["params"].app_store()
    for path in images[:5]:
        assert json.loads((store / "studies" / f"{file_sha256(path)}.json").read_text())["status"] == "scored"


def test_without_pixels_no_picture_of_an_upload_is_kept(served):
    """app.store_pixels off: rows and JSON only; the page shows the numbers and says so."""
    params = served["params"]
    store = params.app_store().parent / "store-no-pixels"
    params = params.model_copy(update={"app": params.app.model_copy(update={"store_pixels": False, "store": store})})
    with threaded_app(params) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = post_file(client, DICOM).json()
        assert body["status"] == "scored"
        page = client.get(body["page"])
        assert page.status_code == 200 and 'id="no-pictures"' in page.text
        assert page.text.count('<tr class="finding') == 14
        for picture in ("radiograph.png", "crop.png", "cam-0.png", "overlay"):
            assert client.get(f"{body['page']}/{picture}").status_code == 404
    kept = sorted(p.relative_to(store).parts[0] for p in store.rglob("*") if p.is_file())
    # scores_index.parquet: the run's row index for paging (keys, sort columns, counts), no pixels.
    assert set(kept) <= {"studies", "parts", "scores.parquet", "scores_index.parquet"}, kept


def test_a_run_larger_than_a_page_is_paged_and_sorted_on_the_server(served):
    """A run of more rows than a page: the run page shows one page with next/previous links,
    the API sorts and pages on the server, the runs list counts from the run index, and a part
    added later is seen (schema-correct synthetic rows written straight into Parquet parts)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from app.runs import PAGE_SIZE
    from benchmarks.bench_app import write_synthetic_run
    from cxr.core.labels import LABEL_COLUMNS

    client = served["client"]
    folder = served["params"].app.runs[0] / "paging" / "big"
    n = 2 * PAGE_SIZE + 37
    write_synthetic_run(folder, n, part_rows=100, run_id="paging")
    # The oracle: the parts read whole with pandas, sorted as the pages promise.
    df = pd.concat([pq.read_table(p).to_pandas() for p in sorted((folder / "parts").glob("part-*.parquet"))])
    df["top"] = df[list(LABEL_COLUMNS)].max(axis=1)
    best = df.sort_values(["max_flagged_probability", "top", "study_id"], ascending=[False, False, True],
                          na_position="last")["study_id"].tolist()
    runs = {r["run_id"]: r for r in _kept(served, client.get("/api/v1/runs")).json()}
    run_id = next(r for r in runs if r.endswith("paging~big"))
    scored = df[df["status"] == "scored"]
    assert {k: runs[run_id][k] for k in ("studies", "scored", "rejected", "flagged")} == {
        "studies": n, "scored": len(scored), "rejected": n - len(scored), "flagged": int((scored["flagged"] != "").sum())}

    first = _kept(served, client.get(f"/runs/{run_id}")).text
    assert first.count('<tr class="scored"') + first.count('<tr class="rejected"') == PAGE_SIZE
    assert 'rel="next"' in first and 'rel="prev"' not in first and f"of {n}" in first
    assert first.index(best[0]) < first.index(best[1]) and best[PAGE_SIZE] not in first
    last = _kept(served, client.get(f"/runs/{run_id}?offset={2 * PAGE_SIZE}")).text
    assert last.count('<tr class="scored"') + last.count('<tr class="rejected"') == n - 2 * PAGE_SIZE
    assert 'rel="prev"' in last and 'rel="next"' not in last and best[-1] in last

    page = _kept(served, client.get(f"/api/v1/runs/{run_id}/studies?sort=study_id&order=asc&offset=10&limit=7")).json()
    assert page["total"] == n and [s["study_id"] for s in page["studies"]] == sorted(df["study_id"])[10:17]
    assert set(LABEL_COLUMNS) <= set(page["studies"][0])  # whole rows, not only the sort keys
    top = _kept(served, client.get(f"/api/v1/runs/{run_id}/studies?limit=5")).json()["studies"]
    assert [s["study_id"] for s in top] == best[:5]

    # A part written after the index: the new study is counted and listed.
    later = write_synthetic_run(served["root"] / "later", 1, run_id="zlater", seed=7, part_rows=1)
    (later / "parts" / "part-zlater-00000.parquet").rename(folder / "parts" / "part-paging-99999.parquet")
    runs = {r["run_id"]: r for r in _kept(served, client.get("/api/v1/runs")).json()}
    assert runs[run_id]["studies"] == n + 1
    ids = _kept(served, client.get(f"/api/v1/runs/{run_id}/studies?sort=study_id&order=desc&limit=1")).json()
    assert ids["total"] == n + 1 and ids["studies"][0]["study_id"] == "zlater_0000000.png"
