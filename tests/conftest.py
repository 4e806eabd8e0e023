"""Shared fixtures: the real NIH sample in ../shared/data and one real Prefect server per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
NIH_SAMPLE = SHARED / "nih-sample-64"
STUDIES = SHARED / "studies"
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 for the whole session (it takes ~15 s).

    In-process flows and `cxr` subprocesses both point at it through PREFECT_API_URL.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    env = dict(os.environ, PREFECT_HOME=str(home), CXR_PREFECT_PORT=str(_free_port()))
    url = subprocess.run(
        [str(ROOT / "scripts" / "prefect-server.sh"), "start"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip().splitlines()[-1]
    old = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url
    subprocess.run([str(ROOT / "scripts" / "prefect-server.sh"), "stop"], env=env, check=False)
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# Dask's nannies write OMP_NUM_THREADS=1 (and friends) into this process's environment when a
# local cluster starts; subprocesses started later must not inherit that, or their torch runs
# single-threaded and its float sums differ from an in-process run's.
_THREAD_ENV = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")}


def clean_env(extra: dict | None = None) -> dict:
    """os.environ as it was at session start for the thread settings, plus `extra`."""
    env = dict(os.environ, **(extra or {}))
    for key, value in _THREAD_ENV.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cxr(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real `cxr` console command (needs the prefect_server fixture for speed)."""
    full_env = clean_env(env)
    full_env["PATH"] = f"{VENV_BIN}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run(
        [str(VENV_BIN / "cxr"), *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    path = NIH_SAMPLE / "Data_Entry_sample.csv"
    assert path.exists(), f"shared NIH sample missing at {path}"
    return path


def make_params(root: Path, **global_stage) -> "Params":
    """Params for a small CPU workspace under `root` on the real 64-px NIH sample images."""
    from cxr.core.config import Params

    stage = {"epochs": 1, "batch_size": 64}
    return Params.model_validate({
        "seed": 3,
        "paths": {"raw": str(root / "raw"), "images": str(NIH_SAMPLE / "images"), "interim": str(root / "interim"),
                  "processed": str(root / "processed"), "models": str(root / "models"), "metrics": str(root / "metrics"),
                  "reports": str(root / "reports"), "cache": str(root / "cache"), "incoming": str(root / "incoming"), "roots": [str(root), str(NIH_SAMPLE)]},
        "model": {"backbone": "resnet18", "image_size": 64, "local_size": 64},
        "train": {"global": {**stage, **global_stage}, "local": stage, "fusion": stage},
        "evaluate": {"bootstrap": 20},
    })


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, sample_csv) -> Path:
    """The NIH sample ingested and split (patient level) in a temporary workspace."""
    from tasks.metadata.ingest import run_ingest
    from tasks.metadata.split import run_split

    root = tmp_path_factory.mktemp("ws")
    params = make_params(root)
    run_ingest(sample_csv, params.paths.interim)
    run_split(params.paths.interim / "metadata.parquet", params.paths.processed, ratios=params.split.ratios(),
              tolerance=params.split.tolerance, seed=params.seed)
    return root


SLICE = {"train": 96, "valid": 32, "test": 32}


@pytest.fixture(scope="session")
def sliced(workspace, tmp_path_factory) -> Path:
    """A `processed` folder with a 160-image slice of the workspace's split (96 train, 32
    valid, 32 test) and its class weights: for tests of training mechanics (resume, data
    parallelism, random crops) whose assertions do not depend on how many images an epoch has.

    Use it as `paths.processed` beside the workspace's interim metadata and images.
    """
    import shutil

    import pandas as pd

    from tasks.metadata.split import read_splits

    root = tmp_path_factory.mktemp("sliced") / "processed"
    root.mkdir()
    splits = read_splits(workspace / "processed" / "splits.parquet")
    sub = pd.concat([g.head(SLICE[name]) for name, g in splits.groupby("split")])
    sub.to_parquet(root / "splits.parquet", index=False)
    shutil.copy(workspace / "processed" / "class_weights.json", root)
    return root


def sliced_params(workspace: Path, sliced: Path, root: Path, **global_stage) -> "Params":
    """make_params on the workspace, reading the `sliced` split and writing models, metrics and
    checkpoints under `root` (its own models/ and metrics/)."""
    params = make_params(workspace, **global_stage)
    return params.model_copy(update={"paths": params.paths.model_copy(update={
        "processed": sliced, "models": root / "models", "metrics": root / "metrics"})})


@pytest.fixture(scope="session")
def trained(workspace) -> "Params":
    """All three stages trained for one epoch on the sample (about 30-40 s on 2 cores).

    Read-only for tests: copy `params.paths.models` elsewhere before changing anything.
    """
    from tasks.training.stages import train_stage

    params = make_params(workspace)
    if not (params.paths.models / "fusion.safetensors").exists():
        for stage in ("global", "local", "fusion"):
            train_stage(params, stage, progress=False)
    return params


def registered_copy(trained, name: str, **score) -> "Params":
    """`trained` with a private, registered copy of its models (scoring refuses unregistered
    weights), placed beside them so it stays inside the workspace's data roots."""
    import shutil

    from tasks.training.registration import register

    models = Path(trained.paths.models).parent / name
    shutil.copytree(trained.paths.models, models, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
    params = trained.model_copy(update={"paths": trained.paths.model_copy(update={"models": models}),
                                        "score": trained.score.model_copy(update=score)})
    register(params)
    return params
