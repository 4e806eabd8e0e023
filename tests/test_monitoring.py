"""What people watch (issue 19): the project's own lines and progress in the Prefect UI, the
nightly failure alert, one time-zone rule, `cxr score`'s progress bar and the app's /metrics.

Against the session's real Prefect server (tests/conftest.py): a two-epoch train flow and a
three-chunk image-cache flow on the 160-image slice, their run logs and progress artifacts
read back through the API and the train run's page rendered in Chromium; a nightly run that
fails, and the automation's webhook call heard by a loopback HTTP receiver.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import pty
import re
import shutil
import struct
import termios
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, STUDIES, make_params, sliced_params

EPOCH_LINE = re.compile(r"^stage global epoch (\d+)/2: loss (\d+\.\d+), valid mean AUROC (\d+\.\d+|nan), (\d+\.\d) s$")


def _api(coro_fn):
    from prefect.client.orchestration import get_client

    async def run():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(run())


def _logs(flow_run_id) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    async def read(client):
        return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                      sort=LogSort.TIMESTAMP_ASC)

    return _api(read)


def _run_logs(flow_run_id, want, timeout: float = 20.0) -> list:
    """The run's logs once `want(logs)` holds (the API handler sends in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = _logs(flow_run_id)
        if want(logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.5)


def _progress_artifacts(flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    async def read(client):
        return await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))

    return {a.key: a for a in _api(read)}


@pytest.fixture(scope="module")
def watched(workspace, sliced, tmp_path_factory, prefect_server):
    """The image cache in three chunks and stage I for two epochs, as Prefect flow runs."""
    from flows.cache import cache_images_flow
    from flows.train import train_flow

    root = tmp_path_factory.mktemp("watched")
    params = sliced_params(workspace, sliced, root, epochs=2)
    # 160 images in shards of 64: three chunks, in a cache of this module's own.
    params = params.model_copy(update={
        "paths": params.paths.model_copy(update={"cache": root / "cache"}),
        "cache": params.cache.model_copy(update={"image_size": 64, "shard_images": 64})})
    t0 = time.perf_counter()
    cache_state = cache_images_flow(params, return_state=True)
    train_state = train_flow(params, "global", return_state=True)
    assert cache_state.is_completed() and train_state.is_completed(), (cache_state, train_state)
    return {"params": params, "root": root, "seconds": time.perf_counter() - t0,
            "cache_run": cache_state.state_details.flow_run_id, "train_run": train_state.state_details.flow_run_id,
            "summary": train_state.result()}


def test_the_train_runs_logs_hold_one_line_per_epoch_with_loss_and_auroc(watched):
    run_id = watched["train_run"]
    # Wait for the stage's last line too: the API handler sends in batches, in the background.
    logs = _run_logs(run_id, lambda ls: sum(bool(EPOCH_LINE.match(l.message)) for l in ls) >= 2
                     and any(l.message.startswith("stage global done: kept epoch") for l in ls))
    epochs = [EPOCH_LINE.match(l.message) for l in logs if l.name == "cxr.train" and EPOCH_LINE.match(l.message)]
    assert [int(m.group(1)) for m in epochs] == [1, 2], [l.message for l in logs]
    history = watched["summary"]["history"]
    for match, record in zip(epochs, history):
        assert float(match.group(2)) == pytest.approx(record["loss"], abs=1e-4)
        assert float(match.group(3)) == pytest.approx(record["valid_mean_auroc"], abs=1e-4)
        assert float(match.group(4)) == pytest.approx(record["seconds"], abs=0.06)
    # They belong to the train-stage task run, and Prefect's own lines are still there.
    assert all(l.task_run_id is not None for l in logs if l.name == "cxr.train")
    assert any(l.message.startswith("stage global done: kept epoch") for l in logs)
    assert any(l.name.startswith("prefect") for l in logs)
    progress = _progress_artifacts(run_id)
    assert progress["cxr-train-global"].data == pytest.approx(100.0)
    assert "train-global: 2/2 epochs" in progress["cxr-train-global"].description


def test_the_cache_runs_logs_say_done_of_total_chunks(watched):
    run_id = watched["cache_run"]
    pattern = re.compile(r"^image cache: (\d)/3 chunks finished \(chunk \d done\), \d+\.\d s$")
    logs = _run_logs(run_id, lambda ls: sum(bool(pattern.match(l.message)) for l in ls) >= 3)
    done = [int(pattern.match(l.message).group(1)) for l in logs if pattern.match(l.message)]
    assert done == [1, 2, 3], [l.message for l in logs]
    # Each chunk's own line sits in its build-image-chunk task run.
    chunk_lines = [l for l in logs if re.match(r"^image cache chunk \d/3: \d+ images cached, 0 rejected", l.message)]
    assert len(chunk_lines) == 3 and len({l.task_run_id for l in chunk_lines}) == 3
    assert _progress_artifacts(run_id)["cxr-image-cache"].data == pytest.approx(100.0)


def test_a_ddp_train_runs_logs_hold_rank_0s_epoch_lines_once(workspace, sliced, tmp_path, prefect_server):
    """`cxr train --nproc 2`: the spawned ranks know no Prefect run; rank 0's lines reach it."""
    from flows.train import train_flow

    params = sliced_params(workspace, sliced, tmp_path, epochs=2)
    state = train_flow(params, "global", nproc=2, return_state=True)
    assert state.is_completed(), state
    run_id = state.state_details.flow_run_id
    logs = _run_logs(run_id, lambda ls: any(l.message.startswith("stage global done: kept epoch") for l in ls))
    epochs = [EPOCH_LINE.match(l.message) for l in logs if EPOCH_LINE.match(l.message)]
    assert [int(m.group(1)) for m in epochs] == [1, 2], [l.message for l in logs]  # rank 1's are not repeated
    history = state.result()["history"]
    assert [float(m.group(2)) for m in epochs] == pytest.approx([r["loss"] for r in history], abs=1e-4)
    assert all(l.task_run_id is not None for l in logs if l.name == "cxr.train")
    assert _progress_artifacts(run_id)["cxr-train-global"].data == pytest.approx(100.0)


GATE_LINE = re.compile(r"^(metadata|splits) gate \(Great Expectations\): (passed|FAILED), (\d+)/(\d+) expectations met"
                       r"(; not met: .+)?; Data Docs (.+/data_docs/index\.html)$")


def test_the_ingest_and_split_runs_logs_say_the_gates_verdicts(sample_csv, tmp_path, prefect_server):
    from flows.data import ingest_flow, split_flow

    params = make_params(tmp_path)
    runs = {"metadata": ingest_flow(sample_csv, params.paths.interim, return_state=True),
            "splits": split_flow(params, params.paths.interim / "metadata.parquet", params.paths.processed, return_state=True)}
    # Ratios no patient split of the sample meets (98/1/1 within 0.1%): the gate refuses it, and says so.
    strict = params.model_copy(update={"split": params.split.model_copy(update={"train": 0.98, "valid": 0.01, "test": 0.01,
                                                                                 "tolerance": 0.001})})
    runs["refused"] = split_flow(strict, params.paths.interim / "metadata.parquet", tmp_path / "strict", return_state=True)
    assert runs["metadata"].is_completed() and runs["splits"].is_completed() and runs["refused"].is_failed(), runs
    verdicts = {}
    for name, state in runs.items():
        logs = _run_logs(state.state_details.flow_run_id, lambda ls: any(GATE_LINE.match(l.message) for l in ls))
        lines = [l for l in logs if GATE_LINE.match(l.message)]
        assert len(lines) == 1 and lines[0].task_run_id is not None, [l.message for l in logs]
        verdicts[name] = GATE_LINE.match(lines[0].message).groups()
    for name in ("metadata", "splits"):
        suite, verdict, met, total, unmet, docs = verdicts[name]
        assert (suite, verdict, unmet) == (name, "passed", None) and met == total and int(total) > 3
        assert Path(docs).is_file()
    suite, verdict, met, total, unmet, _ = verdicts["refused"]
    assert (suite, verdict) == ("splits", "FAILED") and int(met) < int(total) and unmet


def test_the_train_run_page_shows_the_epoch_lines_in_chromium(watched, prefect_server):
    from tests.test_prefect_ui import CHROMIUM, OUTPUT, flow_run_page

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: `make test` installs it (scripts/install-chromium.sh)")
    shot = OUTPUT / "prefect-ui-train-run-logs.png"
    dom = flow_run_page(prefect_server, watched["train_run"], watched["root"] / "chromium", shot)
    assert re.search(r"stage global epoch 1/2: loss \d+\.\d+, valid mean AUROC", dom), \
        "the run page's logs do not show the epoch lines"
    assert shot.exists() and shot.stat().st_size > 10_000


# ---------------------------------------------------------------------------- the nightly alert


class _Receiver(BaseHTTPRequestHandler):
    heard: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).heard.append({"path": self.path, "type": self.headers.get("Content-Type"), "body": body})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def receiver():
    _Receiver.heard = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cxr-alert", _Receiver.heard
    finally:
        server.shutdown()
        server.server_close()


def test_a_failed_nightly_run_fires_the_automation_to_a_loopback_receiver(prefect_server, receiver, tmp_path):
    from prefect.automations import Automation

    from flows.alerts import AUTOMATION, ensure_nightly_alert
    from flows.nightly import nightly_scoring_flow

    url, heard = receiver
    first = ensure_nightly_alert(url)
    again = ensure_nightly_alert(url)  # idempotent: the same automation, brought up to date
    assert again.automation_id == first.automation_id and not again.created
    assert len(_api(lambda c: c.read_automations_by_name(AUTOMATION))) == 1
    assert Automation.read(name=AUTOMATION).enabled
    # A nightly run that fails: studies have arrived, but no model is registered in paths.models.
    params = make_params(tmp_path)
    data = params.model_dump(mode="json", by_alias=True)
    data["nightly"]["alert_webhook"] = url
    (tmp_path / "incoming").mkdir()
    shutil.copy(STUDIES / "00000001_000.png", tmp_path / "incoming" / "a.png")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(data, sort_keys=False))
    state = nightly_scoring_flow(str(params_file), day="2026-01-05", return_state=True)
    assert state.is_failed(), state
    run_id = str(state.state_details.flow_run_id)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not heard:
        time.sleep(0.5)
    assert heard, "the webhook heard nothing within 60 s of the failed run"
    notice = json.loads(heard[0]["body"])
    assert heard[0]["path"] == "/cxr-alert" and "json" in heard[0]["type"]
    assert notice["flow"] == "nightly-scoring" and notice["flow_run_id"] == run_id and notice["state"] == "Failed"
    assert "no registered model" in notice["message"]  # the failed state's message: why it failed
    assert notice["url"].endswith(f"/runs/flow-run/{run_id}")


def test_alerts_need_a_webhook_url(tmp_path, capsys):
    from cxr.cli import main

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(make_params(tmp_path).model_dump(mode="json", by_alias=True), sort_keys=False))
    assert main(["--params", str(path), "alerts"]) == 2
    err = capsys.readouterr().err
    assert "nightly.alert_webhook is empty" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- one time-zone rule


def test_serve_and_prefect_yaml_read_the_cron_in_the_params_time_zone(tmp_path):
    from flows.nightly import nightly_deployment

    params = yaml.safe_load((ROOT / "params.yaml").read_text())["nightly"]
    deployed = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["schedules"][0]
    assert (deployed["cron"], deployed["timezone"]) == (params["cron"], params["timezone"]) == ("0 2 * * *", "UTC")
    schedule = nightly_deployment(str(ROOT / "params.yaml")).schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == (params["cron"], params["timezone"])
    # Another zone in params is the zone `cxr serve` schedules in; a made-up one is refused.
    data = make_params(tmp_path).model_dump(mode="json", by_alias=True)
    data["nightly"]["timezone"] = "Europe/Berlin"
    (tmp_path / "berlin.yaml").write_text(yaml.safe_dump(data))
    assert nightly_deployment(str(tmp_path / "berlin.yaml")).schedules[0].schedule.timezone == "Europe/Berlin"
    from cxr.core.config import load_params
    from cxr.core.errors import DataError

    data["nightly"]["timezone"] = "Mars/Olympus"
    (tmp_path / "mars.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(DataError, match="nightly.timezone"):
        load_params(tmp_path / "mars.yaml")


# ---------------------------------------------------------------------------- progress where people wait


def test_the_score_progress_bar_draws_on_a_terminal_only():
    """`cxr score`'s bar (flows.score.terminal_progress) on a real pseudo-terminal, fed by the
    progress reports the scoring batches make (test_prefect_ui checks those reports through
    the run's progress artifact); on a pipe nothing is drawn."""
    from cxr.core.progress import report
    from flows.score import terminal_progress

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    with os.fdopen(slave, "w", buffering=1) as tty, terminal_progress("score", stream=tty) as bar:
        assert bar is not None
        for done in range(4):
            report("score", done, 3, unit="studies", note=f"{done} done")
            report("train-global", done, 3, unit="epochs")  # another piece of work: not this bar's
            time.sleep(0.15)  # past tqdm's redraw interval
    os.set_blocking(master, False)
    drawn = b""
    try:
        while chunk := os.read(master, 65536):
            drawn += chunk
    except (BlockingIOError, OSError):
        pass
    os.close(master)
    text = drawn.decode(errors="replace")
    # Redrawn in place (carriage returns) from 0/3 to 3/3, with tqdm's rate and time left.
    assert "\r" in text and "0/3" in text and "3/3" in text and "100%" in text and "studies/s" in text, text
    assert "epochs" not in text
    # Not a terminal (a pipe, a log): no bar, and the reports write nothing.
    piped = io.StringIO()
    with terminal_progress("score", stream=piped) as bar:
        assert bar is None
        for done in range(3):
            report("score", done, 2, unit="studies")
    assert piped.getvalue() == ""


def test_the_app_serves_prometheus_metrics(trained):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from app.main import create_app
    from tests.app_helpers import app_params

    params, _ = app_params(trained, Path(trained.paths.models).parent, "metrics")
    app = create_app(params)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        png = (STUDIES / "00000001_000.png").read_bytes()
        assert client.post("/api/v1/studies", files={"file": ("a.png", png, "image/png")}).status_code == 200
        assert client.post("/api/v1/studies", files={"file": ("empty.png", b"", "image/png")}).status_code == 422
        assert client.post("/api/v1/studies", files={"file": ("note.png", b"not an image" * 50, "image/png")}).status_code == 422
        assert client.get("/api/v1/runs").status_code == 200
        assert client.get("/no/such/page").status_code == 404
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(response.text) for s in f.samples}

        def value(name, **labels):
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        assert value("cxr_app_requests_total", route="/api/v1/studies", method="POST", status="200") == 1
        assert value("cxr_app_requests_total", route="/api/v1/studies", method="POST", status="422") == 2
        assert value("cxr_app_requests_total", route="/api/v1/runs", method="GET", status="200") == 1
        assert value("cxr_app_requests_total", route="unmatched", method="GET", status="404") == 1
        assert not any("/no/such/page" in str(k) for k in samples)
        assert value("cxr_app_request_duration_seconds_count", route="/api/v1/studies", method="POST") == 3
        # Two uploads reached a forward pass (the empty one is refused before): batches of one.
        assert value("cxr_app_batch_size_count") == 2 and value("cxr_app_batch_size_sum") == 2
        assert value("cxr_app_refusals_total", reason="empty") == 1
        assert value("cxr_app_refusals_total", reason="unreadable") == 1
        assert value("cxr_app_refusals_total", reason="out_of_distribution") == 0
        digest = app.state.service.scorer.digest
        info = [k for k in samples if k[0] == "cxr_app_model_info"]
        assert len(info) == 1 and ("digest", digest) in info[0][1]
        # With a token, /metrics wants it like the API.
        app.state.token = "t" * 32
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {'t' * 32}"}).status_code == 200
