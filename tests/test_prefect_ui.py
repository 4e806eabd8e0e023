"""The Prefect side for real: a server started by the project, the data pipeline and a scoring
run against it, flow runs, task runs and artifacts read back through the API, the nightly
deployment served and triggered, and the UI page of the scoring run rendered in headless
Chromium (screenshot kept in tests/output/)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, STUDIES, VENV_BIN, run_cxr

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = ROOT / "tests" / "output"


def flow_run_page(api_url: str, flow_run_id, profile: Path, shot: Path) -> str:
    """The Prefect UI's page of a flow run as headless Chromium renders it: returns its DOM and
    saves a screenshot at `shot` (`profile`: the browser's own user-data folder)."""
    url = f"{api_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}"
    shot.parent.mkdir(exist_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=20000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=180, check=True)
    return dom.stdout


def _params_file(params, path: Path, **extra) -> Path:
    data = params.model_dump(mode="json", by_alias=True)
    data["paths"]["roots"] = list(data["paths"]["roots"]) + [str(path.parent)]
    for key, value in extra.items():
        data["paths"][key] = str(value)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _api(coro_fn):
    from prefect.client.orchestration import get_client

    async def run():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(run())


@pytest.fixture(scope="module")
def scoring_run(trained, tmp_path_factory, prefect_server, sample_csv):
    root = tmp_path_factory.mktemp("ui")
    models = root / "models"
    # With the finished stages' checkpoints, `cxr pipeline` resumes each stage as done (same
    # params and inputs) and goes on to evaluation: the whole DAG in one flow run, in seconds.
    shutil.copytree(trained.paths.models, models)
    params_file = _params_file(trained, root / "params.yaml", models=models)
    from tasks.training.registration import register
    from cxr.core.config import load_params

    register(load_params(params_file))
    pipeline = run_cxr("--params", str(params_file), "pipeline", "--metadata", str(sample_csv))
    assert pipeline.returncode == 0, pipeline.stderr[-3000:]
    # The scoring run in this process (what `cxr score` runs; the console command itself is
    # test_score's): the same flow, tasks and artifacts on the server, without a second start-up.
    from flows.score import score

    summary = score(load_params(params_file), STUDIES, root / "scores")
    return {"root": root, "params_file": params_file, "summary": summary, "pipeline": json.loads(pipeline.stdout),
            "pipeline_stderr": pipeline.stderr}


def test_cxr_pipeline_runs_the_whole_dag_on_the_nih_sample(scoring_run, trained):
    """`cxr pipeline` on the real 800-image NIH sample: ingest, patient split, caches, the three
    stages (resumed from their finished checkpoints) and evaluation, with the No Finding vs
    any-finding AUROC beside the 14-class means."""
    from tasks.bundle.weights import model_digest

    summary = scoring_run["pipeline"]
    assert summary["images"] == 800 and summary["patients"] == 211
    assert sum(summary["split_images"].values()) == 800
    assert summary["cache_images"]["rejected"] == 0
    for stage in ("global", "local", "fusion"):
        assert 0.0 <= summary[f"train_{stage}"]["best_valid_mean_auroc"] <= 1.0
    ev = summary["evaluate"]
    assert ev["test_images"] == summary["split_images"]["test"]
    for branch in ("global", "local", "fusion"):
        assert 0.0 <= ev[f"{branch}_mean_auroc"] <= 1.0 and 0.0 <= ev[f"{branch}_any_finding_auroc"] <= 1.0
    assert "No Finding vs any finding" in Path(ev["report"]).read_text()
    # Resumed, not retrained: the pipeline's weights are the trained ones.
    assert model_digest(scoring_run["root"] / "models") == model_digest(trained.paths.models)


def test_the_pipelines_own_lines_reach_its_runs_logs_not_the_terminal(scoring_run):
    """`cxr pipeline` (a console command) sends the `cxr.*` lines to the server: each train
    run says that it resumed its finished stage; the terminal stays quiet by default."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId

    async def read(client):
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train"])))
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
        return runs, logs

    runs, logs = _api(read)
    said = {l.message for l in logs if l.name == "cxr.train"}
    for stage in ("global", "local", "fusion"):
        assert f"resuming stage {stage} after epoch 1/1" in said, said
        assert any(m.startswith(f"stage {stage} done: kept ") for m in said), said
    stderr = scoring_run["pipeline_stderr"]
    assert "resuming stage" not in stderr and "stage global done" not in stderr, stderr[-2000:]


def test_flow_runs_task_runs_and_artifacts_through_the_api(scoring_run):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run_id = scoring_run["summary"]["flow_run_id"]

    async def read(client):
        run = await client.read_flow_run(run_id)
        flows = {f.id: f.name for f in await client.read_flows()}
        runs = await client.read_flow_runs()
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        artifacts = await client.read_artifacts()
        return run, flows, runs, tasks, artifacts

    run, flows, runs, tasks, artifacts = _api(read)
    assert run.state.is_completed()
    names = {flows[r.flow_id] for r in runs if r.state and r.state.is_completed()}
    assert {"pipeline", "data-pipeline", "cache-images", "train", "evaluate", "score"} <= names
    # In-process scoring runs its shards as one pipelined task (score-shards); Dask maps score-shard.
    assert {"plan-scoring", "score-shards", "finish-scoring", "score-report"} <= {t.name.rsplit("-", 1)[0] for t in tasks}
    mine = [a for a in artifacts if a.flow_run_id == run.id]
    assert {"cxr-score-table", "cxr-score-report"} <= {a.key for a in mine}
    table = next(a for a in mine if a.key == "cxr-score-table")
    assert "00000001_000" in json.dumps(table.data)
    # The scoring batches updated a progress artifact of the run's score-shards task to 100%.
    progress = [a for a in mine if a.key == "cxr-score"]
    assert len(progress) == 1 and progress[0].type == "progress" and progress[0].data == 100.0
    assert "studies/s" in progress[0].description


def test_ui_page_of_the_scoring_run_renders_in_chromium(scoring_run, prefect_server):
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: `make test` installs it (scripts/install-chromium.sh)")
    shot = OUTPUT / "prefect-ui-scoring-run.png"
    dom = flow_run_page(prefect_server, scoring_run["summary"]["flow_run_id"], scoring_run["root"] / "chromium", shot)
    run = _api(lambda c: c.read_flow_run(scoring_run["summary"]["flow_run_id"]))
    assert run.name in dom, "the flow run's page did not render its name"
    assert shot.exists() and shot.stat().st_size > 10_000


def test_nightly_deployment_is_served_on_its_schedule_and_runs(scoring_run, prefect_server):
    root = scoring_run["root"]
    incoming = root / "incoming"
    incoming.mkdir()
    shutil.copy(STUDIES / "00000001_000.png", incoming / "a.png")
    params_file = _params_file(__import__("cxr.core.config", fromlist=["load_params"]).load_params(scoring_run["params_file"]),
                               root / "nightly.yaml", incoming=incoming)
    # With an alert webhook in params, `cxr serve` also makes (or updates) the failure alert.
    data = yaml.safe_load(params_file.read_text())
    data["nightly"]["alert_webhook"] = "http://127.0.0.1:9/cxr-alert"
    params_file.write_text(yaml.safe_dump(data, sort_keys=False))
    # The runner polls for due runs each second instead of each 10 s (Prefect's default).
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", PREFECT_API_URL=prefect_server,
               PREFECT_RUNNER_POLL_FREQUENCY="1")
    server = subprocess.Popen([str(VENV_BIN / "cxr"), "--params", str(params_file), "serve"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        deployment = None
        while time.monotonic() < deadline and deployment is None:
            try:
                deployment = _api(lambda c: c.read_deployment_by_name("nightly-scoring/nightly-scoring"))
            except Exception:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                time.sleep(1)
        assert deployment is not None
        schedule = deployment.schedules[0].schedule
        # One time-zone rule: params nightly.cron in nightly.timezone, as prefect.yaml says.
        assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "UTC")
        from flows.alerts import AUTOMATION

        automations = _api(lambda c: c.read_automations_by_name(AUTOMATION))
        assert len(automations) == 1 and automations[0].enabled
        from prefect.deployments import run_deployment

        flow_run = run_deployment("nightly-scoring/nightly-scoring", parameters={"day": "2026-01-02"}, timeout=300, poll_interval=1)
        assert flow_run.state.is_completed(), flow_run.state
        report = Path(yaml.safe_load(params_file.read_text())["paths"]["reports"]) / "nightly" / "2026-01-02"
        assert (report / "report.html").exists() and json.loads((report / "summary.json").read_text())["scored"] == 1
        # The next night finds nothing new.
        again = run_deployment("nightly-scoring/nightly-scoring", parameters={"day": "2026-01-03"}, timeout=300, poll_interval=1)
        assert again.state.is_completed()
        second = json.loads((report.parent / "2026-01-03" / "summary.json").read_text())
        assert second["scored"] == 0 and second["already_scored"] == 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
