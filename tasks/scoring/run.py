"""Batch scoring of new studies: loader -> AG-CNN in batches -> rows, JSON, overlays, Parquet.

The run of one folder: plan (manifest, bundle, gates, hashes) -> shards (one batch, one part
file each) -> finish (fold behind the scores gate). The studies go through the one `Scorer`
(`tasks.scoring.scorer`); the rows and parts are `tasks.scoring.rows`.

Incremental and crash-safe. A study is keyed by (content sha256, model digest): one already
in `scores.parquet` or in a part file is skipped. Each batch ends with one atomically
written Parquet part under `out/parts/`, written only after every per-study file of the
batch is on disk; the run ends by folding the parts into `scores.parquet` (atomically) and
only then removing them, so a run killed anywhere leaves either a part or nothing for each
batch, and the next run finishes without duplicates or lost rows. A file the loader or the
out-of-distribution gate refuses becomes a `rejected` row with the reason; it never stops
the batch.

In-process runs are a three-stage pipeline (`run_shards`): decoder threads prepare the next
batches while the model scores this one, and writer threads render and write the previous
batches' pictures, each stage bounded to a couple of batches so memory stays flat and the
forward pass does not wait on either.

Two Great Expectations gates (`tasks/scoring/gates.py`, results and Data Docs in `out/validation/`)
and the model bundle guard the run. Before anything is written: the bundle must be whole and
its files the registered ones, and the input manifest must be keyable (unique ids and output names); a file
resolving outside the input folder, missing, empty or over `score.max_bytes` is a rejected
row, never read. Before `scores.parquet` is replaced: the folded table must have one row per
(sha256, model digest) and finite probabilities in [0, 1]; if not, this run's parts and
per-study files are discarded and the previous scores and report stay published.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from cxr.core.atomic import atomic_path, make_durable
from cxr.core.config import Params
from cxr.core.errors import DataError
from cxr.core.progress import report
from tasks.scoring.gates import validate_score_manifest, validate_scores
from tasks.scoring.rows import SCHEMA, ScoredStudy, consolidate, read_scores
from tasks.scoring.scorer import Scorer, forward_pool
from tasks.scoring.studies import Study, list_studies, reason_of, row_key, row_keys, sha_or_reason

log = logging.getLogger("cxr.score")
# A progress line at most this often (plus the first and the last batch); the bar and the
# Prefect progress artifact hear every batch.
PROGRESS_LINE_S = 10.0


@dataclass(frozen=True)
class ScoreContext:
    """What every shard of one scoring run needs: small and picklable, sent to each shard task."""

    params: Params
    input_dir: Path
    out_dir: Path
    models_dir: Path
    digest: str  # the bundle the plan verified; every shard scores with it
    run_id: str


@dataclass
class ScorePlan:
    """A scoring run, decided before any study is read: the new studies in shards of one batch."""

    context: ScoreContext
    shards: list[list[Study]]
    summary: dict  # counts known from the manifest (files found, already scored, duplicates)
    keys: list[str]  # (sha256, model digest) keys of this input's rows
    scorer: Scorer | None = field(default=None, repr=False, compare=False)  # this process's, when planned here

    def __getstate__(self):  # a plan crosses processes (Prefect results, Dask) without its model
        return {**self.__dict__, "scorer": None}


def plan_scoring(params: Params, input_dir: Path, out_dir: Path, *, models_dir: Path | None = None,
                 digest: str | None = None, workers: int = 2) -> ScorePlan:
    """Check the manifest and the weights, hash the inputs and split the new studies into shards.

    Nothing is written but the validation results: a missing or changed bundle or an
    unkeyable manifest stop the run here. Each shard is one batch and becomes one part file.
    """
    s = params.score
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    models_dir = Path(models_dir or params.paths.models)
    manifest = list_studies(input_dir, s.max_bytes)
    # Before anything is written or hashed: no whole, registered bundle scores nothing.
    scorer = Scorer.load(params, models_dir=models_dir, digest=digest)
    refused = dict(zip(manifest["path"], manifest["reason"]))
    files = list(manifest["path"])
    with ThreadPoolExecutor(max(1, workers) + 1) as pool:  # hashers + the gate
        # The manifest gate (seconds of Great Expectations set-up in a fresh process) runs while
        # the inputs are hashed; nothing is scored until it has passed. Its Data Docs pages
        # come with the scores gate's build at the end of the run (one build, both suites),
        # unless it fails or every run must rebuild them.
        gate = pool.submit(validate_score_manifest, manifest.assign(path=manifest["path"].map(str)), s.max_bytes,
                           out_dir / "validation", source=str(input_dir),
                           docs="deferred" if s.data_docs == "changed" else s.data_docs)
        try:
            # A refused file is never opened, not even to hash it.
            hashed = list(pool.map(lambda p: (None, refused[p]) if isinstance(refused[p], str) else sha_or_reason(p), files))
        finally:
            gate.exception()  # wait for it either way: its result files are written whole
        gate.result()  # an unkeyable manifest stops the run here
    log.info("manifest gate passed: %d files under %s (%d refused before reading)", len(files), input_dir,
             sum(isinstance(r, str) for r in refused.values()))
    digest, entry = scorer.digest, scorer.threshold_entry
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(2)

    known = read_scores(out_dir)
    done = set(row_keys(known[known["model_digest"] == digest]))
    todo, seen, keys, already, duplicates = [], set(), [], 0, 0
    for path, (sha, reason) in zip(files, hashed):
        study = Study(path.relative_to(input_dir).as_posix(), path, sha, reason)
        key = row_key(sha, path, digest)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        keys.append(key)
        if key in done:
            already += 1
        else:
            todo.append(study)

    context = ScoreContext(params, input_dir, out_dir, models_dir, digest, run_id)
    registered = scorer.entry
    summary = {
        "run_id": run_id, "input_dir": str(input_dir), "out_dir": str(out_dir), "model_digest": digest,
        "backbone": registered["backbone"], "training_data_version": registered["training_data_version"],
        "data_version": entry["data_version"], "threshold_rule": entry["rule"], "files_found": len(files),
        "already_scored": already, "duplicates_in_input": duplicates, "validation": str(out_dir / "validation"),
        "ood": {"mode": scorer.ood_mode, "gate": None if scorer.gate is None else scorer.gate.method,
                "threshold": None if scorer.gate is None else float(scorer.gate.threshold)},
    }
    shards = [todo[i : i + s.batch_size] for i in range(0, len(todo), s.batch_size)]
    log.info("scoring run %s: %d new studies in %d batches, %d already scored by model %s", run_id, len(todo),
             len(shards), already, digest[:12])
    return ScorePlan(context, shards, summary, keys, scorer)


def context_scorer(context: ScoreContext) -> Scorer:
    """The Scorer of the run's bundle in this process (a shard on a worker loads it once)."""
    return Scorer.load(context.params, models_dir=context.models_dir, digest=context.digest)


def batch_files(out_dir: Path, scored: list[ScoredStudy]) -> list[str]:
    """The per-study files of a batch's rows (JSON, overlay, thumbnail), as paths."""
    return [str(Path(out_dir) / s.row[k]) for s in scored for k in ("json", "overlay", "thumbnail") if s.row[k]]


def flush_batch(out_dir: Path, scored: list[ScoredStudy], writes: list[Future]) -> None:
    """Once the batch's writes are done, flush its files to disk (one fsync per file and
    folder, on a writer thread: the forward pass never waits on the disk)."""
    for f in writes:
        f.result()
    make_durable(batch_files(out_dir, scored))


def commit_batch(out_dir: Path, run_id: str, index: int, scored: list[ScoredStudy], *, flushed: bool = False) -> dict:
    """The batch's part file, after every per-study file of it is written and on disk (the
    part is what makes them part of the run; `flushed`: `flush_batch` did it); its counts."""
    rows = [s.row for s in scored]
    written = batch_files(out_dir, scored)
    if not flushed:
        make_durable(written)
    # Column by column: one conversion per column, not a dict walk per row.
    table = pa.Table.from_pydict({c: [r[c] for r in rows] for c in SCHEMA.names}, schema=SCHEMA)
    with atomic_path(_part_path(out_dir, run_id, index)) as tmp:
        pq.write_table(table, tmp)
    n_scored = sum(r["status"] == "scored" for r in rows)
    return {"shard": index, "scored": n_scored, "rejected": len(rows) - n_scored, "written": written}


def _numpy_blas_single():
    """numpy's BLAS (OpenBLAS) on one thread for the block. A scoring run's numpy products
    are small (the overlay's maps, the OOD gate's distances), and OpenBLAS spreads them over
    its threads anyway, whose spinning after each product takes the forward's cores:
    1-2 ms less CPU a study (benchmarks/bench_score.py). torch's kernels are not affected."""
    return threadpool_limits(1, user_api="blas")


def score_shard(context: ScoreContext, index: int, studies: list[Study], workers: int = 2) -> dict:
    """Score one shard into `parts/part-<run>-<index>.parquet` plus its per-study files.

    The Dask path's unit of work (in-process runs use the pipelined `run_shards`). The
    part's name is fixed by (run, shard), so a shard run twice (a worker lost mid-shard and
    the shard rescheduled) replaces its own part: no shard is lost or counted twice.
    Returns the shard's counts and the per-study files it wrote.
    """
    scorer = context_scorer(context)
    out_dir, pictures = context.out_dir, context.params.score.pictures
    with _numpy_blas_single(), ThreadPoolExecutor(max(1, workers)) as pool:
        scored = scorer.infer(list(pool.map(scorer.prepare, [st.fresh() for st in studies])), context.run_id)
        list(pool.map(lambda st: scorer.write(out_dir, st, pictures=pictures, durable=False), scored))
    return commit_batch(out_dir, context.run_id, index, scored)


def run_shards(plan: ScorePlan, *, workers: int = 2, stop_after_batches: int | None = None, ahead: int = 2) -> list[dict]:
    """Score every shard of `plan` in this process, decode -> forward -> write as a pipeline.

    Half of `workers` decoder threads (at least one) keep up to `ahead` batches decoded ahead
    of the forward passes; the forward runs a couple of batches at once on a CPU
    (`forward_streams`), one thread each; `workers` writer threads (at least two) render and
    write the pictures and JSON of up to `ahead` batches behind it. A batch's part file is
    written once all its studies' files are, in batch order. The first failure (a write
    error, say) stops the run: batches before it keep their parts, the failing batch gets
    none, and the error is raised.
    """
    context = plan.context
    scorer = plan.scorer or context_scorer(context)
    out_dir, run_id, pictures = context.out_dir, context.run_id, context.params.score.pictures
    shards = plan.shards if stop_after_batches is None else plan.shards[:stop_after_batches]
    results: list[dict] = []
    watch = _Watch(sum(len(b) for b in shards), len(shards))
    decoding: deque[list[Future]] = deque()
    inferring: deque[Future] = deque()
    writing: deque[tuple[int, list[ScoredStudy], list[Future]]] = deque()
    forwards, streams = forward_pool(scorer.device)

    def written(index: int, scored: list[ScoredStudy]) -> None:
        writes = [writers.submit(scorer.write, out_dir, st, pictures=pictures, durable=False) for st in scored]
        writing.append((index, scored, [*writes, writers.submit(flush_batch, out_dir, scored, writes)]))
        # Commit finished batches; wait only when `ahead` batches are already being written.
        while writing and (len(writing) > ahead or all(f.done() for f in writing[0][2])):
            results.append(watch.committed(_commit_written(out_dir, run_id, writing.popleft())))

    # Threads beyond what the work needs cost CPU on a 2-core machine: each more thread
    # contending for the GIL is more hand-overs (kernel time) and more of the forward's cache
    # evicted. A decoder prepares a study in ~1.5 ms, a writer writes one in ~4 ms, against
    # ~15 ms of forward a study: one decoder and two writers keep up with two forward streams
    # (2 + 4 threads before: 0.65 -> 0.67 of forward-only, benchmarks/bench_score.py). A
    # batch's files are flushed to disk once, by a writer after the batch's writes
    # (`flush_batch`), before its part commits them: no fsync per file and folder, and none
    # on a forward's thread.
    with _numpy_blas_single(), forwards, \
            ThreadPoolExecutor(max(1, workers // 2), thread_name_prefix="cxr-decode") as decoders, \
            ThreadPoolExecutor(max(2, workers), thread_name_prefix="cxr-write") as writers:
        try:
            queued = iter(shards)
            for _ in range(ahead):
                _queue_decode(decoders, decoding, queued, scorer)
            for index in range(len(shards)):
                prepared = [f.result() for f in decoding.popleft()]
                _queue_decode(decoders, decoding, queued, scorer)
                inferring.append(forwards.submit(scorer.infer, prepared, run_id))
                del prepared
                if len(inferring) >= streams:  # batches leave the forward in order
                    written(index - len(inferring) + 1, inferring.popleft().result())
            while inferring:
                written(len(shards) - len(inferring), inferring.popleft().result())
            while writing:
                results.append(watch.committed(_commit_written(out_dir, run_id, writing.popleft())))
        except BaseException:
            for futures in [*decoding, inferring, *(w[2] for w in writing)]:
                for f in futures:
                    f.cancel()
            raise
    return results


class _Watch:
    """Progress of the pipelined shards: every batch reported, a log line now and then."""

    def __init__(self, studies: int, batches: int):
        self.total, self.batches, self.done, self.rejected = studies, batches, 0, 0
        self.t0 = self.last_line = time.perf_counter()
        if studies:
            report("score", 0, studies, unit="studies", note="starting")  # the bar shows before the first batch

    def committed(self, result: dict) -> dict:
        self.done += result["scored"] + result["rejected"]
        self.rejected += result["rejected"]
        now = time.perf_counter()
        rate = self.done / max(now - self.t0, 1e-9)
        report("score", self.done, self.total, unit="studies", note=f"{rate:.1f} studies/s, {self.rejected} rejected")
        batch = result["shard"] + 1
        if batch in (1, self.batches) or now - self.last_line >= PROGRESS_LINE_S:
            self.last_line = now
            log.info("scored %d/%d studies (batch %d/%d, %d rejected so far), %.1f studies/s", self.done, self.total,
                     batch, self.batches, self.rejected, rate)
        return result


def _queue_decode(pool: ThreadPoolExecutor, decoding: deque, shards, scorer: Scorer) -> None:
    batch = next(shards, None)
    if batch is not None:
        decoding.append([pool.submit(scorer.prepare, st.fresh()) for st in batch])


def _commit_written(out_dir: Path, run_id: str, pending: tuple[int, list[ScoredStudy], list[Future]]) -> dict:
    index, scored, futures = pending
    for f in futures:
        f.result()  # raises the batch's first write error: no part for a batch with a missing file
    return commit_batch(out_dir, run_id, index, scored, flushed=True)


def _part_path(out_dir: Path, run_id: str, index: int) -> Path:
    return Path(out_dir) / "parts" / f"part-{run_id}-{index:06d}.parquet"


def _run_counts(plan: ScorePlan, results: list[dict]) -> dict:
    """The summary of the shards scored so far: the plan's counts plus theirs."""
    scored = sum(r["scored"] for r in results)
    rejected = sum(r["rejected"] for r in results)
    return {**plan.summary, "new_studies": scored + rejected, "scored": scored, "rejected": rejected,
            "batches": len(results)}


def finish_scoring(plan: ScorePlan, results: list[dict]) -> dict:
    """Fold the run's parts into scores.parquet behind the scores gate; return the run's summary.

    When the gate fails, this run's parts and per-study files are removed and DataError
    says so: the previous scores.parquet stays published.
    """
    out_dir, run_id = plan.context.out_dir, plan.context.run_id
    summary = _run_counts(plan, results)
    new = summary["new_studies"]
    summary["message"] = f"{new} new studies; {plan.summary['already_scored']} already scored by this model"
    docs = plan.context.params.score.data_docs
    try:
        consolidate(out_dir, gate=lambda df: validate_scores(df.assign(key=row_keys(df)), out_dir / "validation",
                                                              source=str(out_dir / "scores.parquet"), docs=docs))
    except DataError as exc:
        # Unpublishable rows must not linger: the next run would fold or skip them.
        written = [Path(p) for r in results for p in r["written"]]
        for path in [*(out_dir / "parts").glob(f"part-{run_id}-*.parquet"), *written]:
            path.unlink(missing_ok=True)
        error = DataError(f"the scores failed validation, so nothing was published (the previous scores.parquet and "
                          f"report.html are kept; this run's {new} rows were discarded and will be scored "
                          f"again next run): {reason_of(exc)}", where=exc.where)
        error.summary = getattr(exc, "summary", None)  # what the gate checked, for callers that record it
        log.warning("scores gate failed for run %s: %d rows discarded, previous scores kept", run_id, new)
        raise error from None
    log.info("scores gate passed: run %s published %d new rows (%d scored, %d rejected) into %s", run_id, new,
             summary["scored"], summary["rejected"], out_dir / "scores.parquet")
    # The run index beside the scores: counts and sort keys, so the app and the report page
    # a run of any size without reading its whole table (tasks/scoring/run_index.py).
    from tasks.scoring.run_index import update_index

    update_index(out_dir)
    summary["studies"] = plan.keys
    return summary


def score_studies(params: Params, input_dir: Path, out_dir: Path, *, models_dir: Path | None = None,
                  digest: str | None = None, stop_after_batches: int | None = None, workers: int = 2) -> dict:
    """Score every new study under `input_dir` into `out_dir` in this process; return the run's summary.

    plan -> the pipelined shards -> finish; `flows.score` runs the same steps as Prefect
    tasks (or maps the shards over Dask workers). `stop_after_batches` ends the run after
    that many part files, before consolidation (it simulates a killed run). The summary's
    `studies` lists the keys of this input's rows.
    """
    plan = plan_scoring(params, input_dir, out_dir, models_dir=models_dir, digest=digest, workers=workers)
    results = run_shards(plan, workers=workers, stop_after_batches=stop_after_batches)
    if stop_after_batches is not None and len(results) < len(plan.shards):
        return {**_run_counts(plan, results), "stopped_after_batches": len(results),
                "message": f"stopped after {len(results)} batches"}
    return finish_scoring(plan, results)
