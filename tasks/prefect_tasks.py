"""The Prefect task wrappers of the plain unit-of-work functions in `tasks/`.

Tests call the plain functions; flows call these. Deterministic failures (bad data) are not
retried: retrying a corrupt file only repeats the same rejection.

Importing this module also connects the project's own lines to the Prefect UI (in every
process that runs these tasks, Dask workers included):
  * every `cxr.*` log record at INFO and above goes to the logs of the flow or task run it
    was made in (Prefect's API log handler on the `cxr` logger: what
    PREFECT_LOGGING_EXTRA_LOGGERS=cxr would add, but regardless of whether Prefect was
    imported before the variable was set); outside a run the handler stays silent;
  * progress reports (`cxr.core.progress`: training epochs, cache chunks, scoring batches)
    update one Prefect progress artifact per run and piece of work, e.g. `cxr-train-global`;
  * the ingest and split tasks say their Great Expectations gate's verdict as one line of
    the run's logs (`cxr.gates`), passed or failed, with the expectations met and the Data Docs.
The terminal is the CLI's business (`cxr.cli._terminal_logging` keeps it quiet by default).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from cxr.core.errors import DataError
from cxr.core.progress import Progress, add_listener
from tasks.metadata.ingest import run_ingest
from tasks.metadata.split import run_split
from tasks.metadata.synth import synthesize


def _retry_transient(task, task_run, state) -> bool:
    # Retry I/O hiccups, never bad data.
    try:
        state.result()
    except DataError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


def _task(name: str):
    # Outputs are files tracked by DVC, so Prefect result caching would only go stale.
    return task(name=name, retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)


def _run_context():
    """The innermost Prefect run of this thread (a task run, else a flow run), or None."""
    return TaskRunContext.get() or FlowRunContext.get()


class _InRunOnly(logging.Filter):
    """Only records made inside a flow or task run go to the API (no warning outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "flow_run_id", None) is not None or _run_context() is not None


def send_cxr_logs_to_prefect() -> None:
    """`cxr.*` INFO+ records into the run logs on the Prefect server (idempotent)."""
    logger = logging.getLogger("cxr")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):  # e.g. PREFECT_LOGGING_EXTRA_LOGGERS=cxr
        handler = APILogHandler(level=logging.INFO)
        handler.addFilter(_InRunOnly())
        logger.addHandler(handler)


class ProgressArtifacts:
    """A `cxr.core.progress` listener: one Prefect progress artifact per (run, work key).

    The artifact is keyed `cxr-<key>` (so it is listed on the Artifacts page, one version per
    run) and updated at most every `interval_s` seconds, and always at the end. Outside a run
    it does nothing.
    """

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self._ids: dict[tuple, tuple] = {}  # (run id, key) -> (artifact id, last update time)
        self._lock = threading.Lock()

    def __call__(self, progress: Progress) -> None:
        ctx = _run_context()
        if ctx is None:
            return
        run = ctx.task_run.id if isinstance(ctx, TaskRunContext) else ctx.flow_run.id
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        with self._lock:
            now, known = time.monotonic(), self._ids.get((run, progress.key))
            final = progress.done >= progress.total
            if known is None:
                artifact = create_progress_artifact(progress.percent, key=f"cxr-{progress.key}",
                                                    description=progress.describe())
            elif final or now - known[1] >= self.interval_s:
                artifact = update_progress_artifact(known[0], progress.percent, description=progress.describe())
            else:
                return
            self._ids[(run, progress.key)] = (artifact, now)


send_cxr_logs_to_prefect()
progress_artifacts = ProgressArtifacts()
add_listener(progress_artifacts)


gate_log = logging.getLogger("cxr.gates")


def _results(summary: dict | None, validation_json: Path) -> list[tuple[str, bool]] | None:
    """(expectation, met) of a suite run: from a failed gate's summary, else from the result
    JSON the passed run just wrote (rewritten atomically at every run, so never an old one)."""
    if summary is not None:
        return [(r["description"] or r["expectation"], bool(r["success"])) for r in summary["results"]]
    if not validation_json.exists():
        return None
    payload = json.loads(validation_json.read_text())
    return [(r["expectation_config"].get("description") or r["expectation_config"]["type"], bool(r["success"]))
            for r in payload["results"]]


@contextmanager
def _gate_verdict(suite: str, validation_dir: Path):
    """Say the GE suite `suite`'s verdict once the work in the block has run it."""
    validation_dir = Path(validation_dir).resolve()
    try:
        yield
    except DataError as exc:
        summary = getattr(exc, "summary", None)
        if summary is not None:  # None: refused before the suite ran; the failure says why
            _say_verdict(suite, _results(summary, validation_dir), validation_dir, passed=False)
        raise
    _say_verdict(suite, _results(None, validation_dir / f"{suite}_validation.json"), validation_dir, passed=True)


def _say_verdict(suite: str, results: list[tuple[str, bool]] | None, validation_dir: Path, *, passed: bool) -> None:
    if results is None:
        return
    unmet = [name for name, met in results if not met]
    gate_log.log(logging.INFO if passed else logging.ERROR,
                 "%s gate (Great Expectations): %s, %d/%d expectations met%s; Data Docs %s", suite,
                 "passed" if passed else "FAILED", len(results) - len(unmet), len(results),
                 f"; not met: {', '.join(unmet)}" if unmet else "", validation_dir / "data_docs" / "index.html")


synth_task = _task("synth")(synthesize)


@_task("ingest")
def ingest_task(metadata_csv, out_dir) -> dict:
    with _gate_verdict("metadata", Path(out_dir) / "validation"):
        return run_ingest(metadata_csv, out_dir)


@_task("split")
def split_task(metadata_parquet, out_dir, *, ratios: dict, tolerance: float, seed: int, assignments=None) -> dict:
    with _gate_verdict("splits", Path(out_dir) / "validation"):
        return run_split(metadata_parquet, out_dir, ratios=ratios, tolerance=tolerance, seed=seed, assignments=assignments)


# Torch-heavy work is imported when it runs, so that `cxr ingest` does not pay seconds
# loading torchvision and scikit-learn it never uses.
@_task("train-stage")
def train_task(params, stage: str, nproc: int = 1, **kwargs) -> dict:
    from tasks.training.distributed import train_distributed

    return train_distributed(params, stage, nproc, **kwargs)


@_task("register-model")
def register_task(params) -> dict:
    from tasks.training.registration import register

    return register(params)


@_task("evaluate")
def evaluate_task(params, **kwargs) -> dict:
    from tasks.evaluation.evaluate import evaluate

    return evaluate(params, **kwargs)


def _one_torch_thread_on_dask_worker() -> bool:
    """On a Dask worker: torch on one thread, and True (the task keeps to one thread too).

    A worker runs threads_per_worker tasks at once and workers x threads is sized to the
    cores; torch's intra-op pool (or a task's own thread pool) per task would oversubscribe them.
    """
    if "distributed" not in sys.modules:
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:  # not inside a Dask worker
        return False
    import torch

    torch.set_num_threads(1)
    return True


# Scoring is resumable by design, so a transient I/O retry only finishes the rest.
@_task("plan-scoring")
def plan_scoring_task(params, input_dir, out_dir, **kwargs):
    from tasks.scoring.run import plan_scoring

    return plan_scoring(params, input_dir, out_dir, **kwargs)


@_task("score-shard")
def score_shard_task(context, index: int, studies) -> dict:
    from tasks.scoring.run import score_shard

    on_worker = _one_torch_thread_on_dask_worker()
    return score_shard(context, index, studies, workers=1 if on_worker else 2)


@_task("score-shards")
def run_shards_task(plan) -> list[dict]:
    """Every shard of an in-process run, pipelined (decode -> forward -> write) in one task."""
    from tasks.scoring.run import run_shards

    return run_shards(plan)


@_task("finish-scoring")
def finish_scoring_task(plan, results: list[dict]) -> dict:
    from tasks.scoring.run import finish_scoring

    return finish_scoring(plan, results)


@_task("score-report")
def report_task(out_dir, summary: dict):
    from tasks.scoring.report import write_report

    return write_report(out_dir, summary)


# Caches: one task per chunk so a build fans out with `.map`; a re-run skips finished chunks.
# The chunk tasks take only picklable values (frozen plan dataclasses of paths, ids, digests),
# so they run alike in the flow's threads and in Dask worker processes (params: dask).
@_task("plan-image-cache")
def plan_image_cache_task(image_dir, ids, root, size: int, shard_images: int):
    from tasks.images.image_cache import plan_image_cache

    return plan_image_cache(image_dir, ids, root, size, shard_images)


@_task("build-image-chunk")
def build_image_chunk_task(plan, chunk: int) -> dict:
    from tasks.images.image_cache import build_image_chunk

    _one_torch_thread_on_dask_worker()
    return build_image_chunk(plan, chunk)


@_task("publish-image-cache")
def publish_image_cache_task(plan) -> dict:
    from tasks.images.image_cache import publish_image_cache

    return publish_image_cache(plan)


@_task("plan-crop-cache")
def plan_crop_cache_task(params):
    from tasks.training.crop_cache import plan_crop_cache

    return plan_crop_cache(params)


@_task("build-crop-chunk")
def build_crop_chunk_task(plan, chunk: int) -> dict:
    from tasks.training.crop_cache import build_crop_chunk

    _one_torch_thread_on_dask_worker()
    return build_crop_chunk(plan, chunk)


@_task("publish-crop-cache")
def publish_crop_cache_task(plan) -> dict:
    from tasks.training.crop_cache import publish_crop_cache

    return publish_crop_cache(plan)
