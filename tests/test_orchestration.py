"""DVC and Prefect for real: `dvc repro` from a fresh copy, reruns nothing when nothing
changed, and every stage is a flow run visible through the Prefect API."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import yaml

from tests.conftest import ROOT, VENV_BIN


def _fresh_copy(dest):
    """The committed tree plus working changes, as a new clone would see it (no data)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.email=ci@cxr", "-c", "user.name=ci", "commit", "-qm", "fresh"], cwd=dest, check=True)


def _dvc(*args, cwd, env):
    return subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_dvc_repro_from_fresh_copy_then_nothing_to_rerun(tmp_path, prefect_server):
    repo = tmp_path / "repo"
    repo.mkdir()
    _fresh_copy(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["synth"].update(patients=40, image_size=64, min_patients_per_class=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", PREFECT_API_URL=prefect_server)

    first = _dvc("repro", "split", cwd=repo, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("synth", "ingest", "split"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (repo / "data/processed/splits.parquet").exists()
    assert (repo / "data/interim/validation/data_docs/index.html").exists()

    second = _dvc("repro", "split", cwd=repo, env=env)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    status = _dvc("status", "split", cwd=repo, env=env)
    assert "up to date" in status.stdout

    # A params change reruns exactly the stages that depend on it.
    params["split"].update(train=0.6, valid=0.2, test=0.2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _dvc("repro", "split", cwd=repo, env=env)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "Running stage 'split'" in third.stdout and "Running stage 'synth'" not in third.stdout


def test_stages_are_flow_runs_in_prefect(sample_csv, tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from flows.data import ingest_flow

    state = ingest_flow(sample_csv, tmp_path / "interim", return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id

    async def inspect():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            tasks = await client.read_task_runs()
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["ingest"])))
            return run, [t for t in tasks if t.flow_run_id == flow_run_id], runs

    run, task_runs, runs = asyncio.run(inspect())
    assert run.state.is_completed()
    assert [t.name.split("-")[0] for t in task_runs] == ["ingest"]
    assert all(t.state.is_completed() for t in task_runs)
    assert any(r.id == flow_run_id for r in runs)
