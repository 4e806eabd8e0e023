"""Scoring flow: score new studies, write the HTML report, show the results in the Prefect UI.

plan (manifest, registry and manifest gates, hashes) -> the shards (one batch, one part file
each) -> finish (fold the parts behind the scores gate) -> report. In-process, the shards run
as one pipelined task (decode, forward and write overlap); with `dask:` enabled, `score`
maps one task per shard over Dask worker processes, each loading the weights once, with the
same scores as the in-process run. Both go through `tasks.scoring.scorer.Scorer`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from cxr.core.config import Params
from flows.runner import task_runner
from tasks.prefect_tasks import (finish_scoring_task, plan_scoring_task, report_task, run_shards_task,
                                 score_shard_task)
from tasks.scoring.report import NOT_A_DEVICE, run_rows

# A table artifact is for a glance; the report and scores.parquet hold every study.
TABLE_ROWS = 200


def _publish(summary: dict, report: Path) -> None:
    rows = run_rows(Path(summary["out_dir"]), summary, limit=TABLE_ROWS)
    table = [{k: (None if v != v else v) for k, v in r.items()}  # NaN -> None: artifacts are JSON
             for r in rows[["study_id", "status", "flagged", "max_flagged_probability", "top_findings", "ood_score",
                         "ood_flag", "reason"]]
             .head(TABLE_ROWS).to_dict("records")]
    create_table_artifact(table=table, key="cxr-score-table",
                          description=f"Scores of run {summary['run_id']} (first {TABLE_ROWS} rows, highest flagged first)")
    create_link_artifact(key="cxr-score-report", link=Path(report).resolve().as_uri(),
                         link_text=f"Scoring report {summary['run_id']}", description=summary["message"])
    create_markdown_artifact(key="cxr-score-summary", description="Scoring run summary", markdown="\n".join([
        f"# Scoring run {summary['run_id']}", "", f"**{summary['message']}.**", "",
        f"- scored {summary['scored']}, rejected {summary['rejected']}, already scored {summary['already_scored']}",
        f"- model digest `{summary['model_digest']}` (backbone {summary.get('backbone')}, registered)",
        f"- training data version `{summary.get('training_data_version')}` (registry)",
        f"- report: [{report}]({Path(report).resolve().as_uri()})", "", f"_{NOT_A_DEVICE}_"]))


def _mapped_shards(plan) -> list[dict]:
    """One task per shard on the Dask workers; progress as each shard finishes, results in order."""
    from prefect.futures import as_completed

    from cxr.core.progress import report

    futures = score_shard_task.map(unmapped(plan.context), range(len(plan.shards)), plan.shards)
    total, done = sum(len(s) for s in plan.shards), 0
    for future in as_completed(futures):
        if future.state.is_completed():
            result = future.result()
            done += result["scored"] + result["rejected"]
            report("score", done, total, unit="studies")
    return futures.result()


# In-process, one shard at a time: each batch's forward pass already uses every core.
@flow(name="score", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def score_flow(params: Params, input_dir: Path, out_dir: Path, models_dir: Path | None = None) -> dict:
    """Score `input_dir` into `out_dir`; return the run summary (counts, digests, report path)."""
    from prefect.runtime import flow_run

    plan = plan_scoring_task(params, Path(input_dir), Path(out_dir), models_dir=models_dir)
    results = []
    if plan.shards and params.dask.enabled:
        results = _mapped_shards(plan)
    elif plan.shards:
        # In this process: one pipelined task, so the forward pass never waits on decoding or writing.
        results = run_shards_task(plan)
    summary = finish_scoring_task(plan, results)
    report = report_task(Path(out_dir), summary)
    _publish(summary, report)
    print(summary["message"])
    result = {k: v for k, v in summary.items() if k != "studies"}
    return {**result, "report": str(report), "flow_run_id": str(flow_run.id)}


class TerminalBar:
    """A `cxr.core.progress` listener drawing a tqdm bar on `stream` for the work `key`."""

    def __init__(self, key: str, stream=None):
        self.key, self.stream, self.bar = key, stream or sys.stderr, None

    def __call__(self, progress) -> None:
        if progress.key != self.key:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=progress.total, unit=f" {progress.unit}", desc=progress.key, file=self.stream,
                            dynamic_ncols=True, leave=True)
        # tqdm's own rate and time left; the report's note (the same rate) is for the Prefect UI.
        self.bar.update(progress.done - self.bar.n)
        if progress.done >= progress.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def terminal_progress(key: str = "score", stream=None) -> Iterator[TerminalBar | None]:
    """A progress bar of `key` on a terminal (stderr by default); nothing when it is not a TTY
    (a pipe, a log file, CI), so captured output stays free of carriage returns."""
    from cxr.core.progress import listening

    stream = stream or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        yield None
        return
    bar = TerminalBar(key, stream)
    with listening(bar):
        try:
            yield bar
        finally:
            bar.close()


def score(params: Params, input_dir: Path, out_dir: Path, models_dir: Path | None = None) -> dict:
    """`score_flow` on the params' task runner (Dask workers when dask.enabled)."""
    return score_flow.with_options(task_runner=task_runner(params))(params, input_dir, out_dir, models_dir)
