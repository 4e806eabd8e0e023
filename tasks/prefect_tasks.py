"""The Prefect task wrappers of the plain unit-of-work functions in `tasks/`.

Tests call the plain functions; flows call these. Deterministic failures (bad data) are not
retried: retrying a corrupt file only repeats the same rejection.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cxr.errors import DataError
from tasks.ingest import run_ingest
from tasks.split import run_split
from tasks.synth import synthesize
from tasks.evaluate import evaluate
from tasks.train import train_stage


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


synth_task = _task("synth")(synthesize)
ingest_task = _task("ingest")(run_ingest)
split_task = _task("split")(run_split)
train_task = _task("train-stage")(train_stage)
evaluate_task = _task("evaluate")(evaluate)
