"""Batch scoring of new studies: loader -> AG-CNN in batches -> rows, JSON, overlays, Parquet.

Incremental and crash-safe. A study is keyed by (content sha256, model digest): one already
in `scores.parquet` or in a part file is skipped. Each batch ends with one atomically
written Parquet part under `out/parts/`; the run ends by folding the parts into
`scores.parquet` (atomically) and only then removing them, so a run killed anywhere leaves
either a part or nothing for each batch, and the next run finishes without duplicates or
lost rows. A file the loader refuses becomes a `rejected` row with the reason; it never
stops the batch.

Two Great Expectations gates (`tasks/validate.py`, results and Data Docs in `out/validation/`)
and the model registry guard the run. Before anything is written: the weights must be the
registered ones, and the input manifest must be keyable (unique ids and output names); a file
resolving outside the input folder, missing, empty or over `score.max_bytes` is a rejected
row, never read. Before `scores.parquet` is replaced: the folded table must have one row per
(sha256, model digest) and finite probabilities in [0, 1]; if not, this run's parts and
per-study files are discarded and the previous scores and report stay published.
"""

from __future__ import annotations

import logging
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from cxr.atomic import atomic_path, atomic_write_json
from cxr.config import ModelParams, Params
from cxr.errors import DataError
from cxr.labels import LABEL_COLUMNS, PATHOLOGIES
from tasks.dataset import input_box_to_image, network_pixels_from_image, to_input
from tasks.images import LoaderLimits, file_sha256, load_image
from tasks.overlay import display_shape, render_overlay, resize_gray, save_png, thumbnail
from tasks.registry import verify
from tasks.thresholds import load_or_compute_thresholds
from tasks.train import pick_device
from tasks.validate import validate_score_manifest, validate_scores
from tasks.weights import STAGES, load_agcnn

log = logging.getLogger("cxr.score")

FLAG_COLUMNS = tuple(f"{c}_flag" for c in LABEL_COLUMNS)
BOX_COLUMNS = ("box_y0", "box_x0", "box_y1", "box_x1")
SCHEMA = pa.schema(
    [("study_id", pa.string()), ("source_path", pa.string()), ("sha256", pa.string()), ("model_digest", pa.string()),
     ("status", pa.string()), ("reason", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC")), ("run_id", pa.string()),
     ("image_height", pa.int32()), ("image_width", pa.int32()), *[(c, pa.int32()) for c in BOX_COLUMNS],
     *[(c, pa.float32()) for c in LABEL_COLUMNS], *[(c, pa.bool_()) for c in FLAG_COLUMNS],
     ("flagged", pa.string()), ("max_flagged_probability", pa.float32()), ("top_findings", pa.string()),
     ("overlay", pa.string()), ("thumbnail", pa.string()), ("json", pa.string())]
)


@dataclass
class _Study:
    study_id: str
    path: Path
    sha256: str | None
    reason: str | None = None  # set when the loader refused the file
    pixels: np.ndarray | None = None  # (S, S) uint8 network input
    display: np.ndarray | None = None  # (h, w) float32 [0, 1] for the pictures
    shape: tuple[int, int] | None = None  # (H, W) of the original image


# --------------------------------------------------------------------------- inputs


def list_studies(input_dir: Path, max_bytes: int | None = None) -> pd.DataFrame:
    """The input manifest: one row per non-hidden file (or link) under `input_dir`, sorted.

    Columns: study_id (path relative to the folder), path, size_bytes (None when not present
    or not looked at), output_name, inside (resolves inside the folder), reason (why the file
    will not be read, else None). A file or link resolving outside the folder is never opened
    (not even its size is taken). DataError when the folder is missing or holds no files.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataError("input folder not found (or not a folder)", where=str(input_dir))
    root = input_dir.resolve()
    rows = []
    for path in sorted(input_dir.rglob("*")):
        rel = path.relative_to(input_dir)
        # Folders (and links to them: rglob does not descend those) are walked, not scored;
        # a dangling link is kept so that it shows up as a missing file.
        if any(part.startswith(".") for part in rel.parts) or not (path.is_file() or (path.is_symlink() and not path.exists())):
            continue
        target = path.resolve()
        inside = target == root or root in target.parents
        size = reason = None
        if not inside:
            reason = "resolves outside the input folder"
        else:
            try:
                size = path.stat().st_size
            except OSError:
                reason = "file not found (a dangling link, or removed while listing)"
        if size == 0:
            reason = "empty file"
        elif size is not None and max_bytes is not None and size > max_bytes:
            reason = f"file of {size} bytes is over the limit of {max_bytes} bytes (score.max_bytes)"
        rows.append({"study_id": rel.as_posix(), "path": path, "size_bytes": size,
                     "output_name": output_name(rel.as_posix()), "inside": inside, "reason": reason})
    if not rows:
        raise DataError("input folder holds no files to score", where=str(input_dir))
    return pd.DataFrame(rows).astype({"size_bytes": "Int64"})


def output_name(study_id: str) -> str:
    """A file-name-safe stem for a study's outputs ('a/b c.png' -> 'a__b_c.png')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", study_id.replace("/", "__"))


def _reason(exc: DataError) -> str:
    # The row already names the file; keep only what was wrong with it.
    text = str(exc)
    return text[len(exc.where) + 2 :] if exc.where and text.startswith(f"{exc.where}: ") else text


def network_pixels(image: np.ndarray, model: ModelParams) -> np.ndarray:
    """(H, W) float [0, 1] -> (image_size, image_size) uint8: the input a test image of the same file gets."""
    return network_pixels_from_image(image, model)


def _load(study: _Study, model: ModelParams, limits: LoaderLimits, overlay_size: int) -> _Study:
    try:
        image = load_image(study.path, limits)  # the one loader: one decode serves input and pictures
    except DataError as exc:
        study.reason = _reason(exc)
        return study
    study.shape = image.shape
    study.pixels = network_pixels(image, model)
    study.display = resize_gray(image, display_shape(*image.shape, overlay_size))
    return study


# --------------------------------------------------------------------------- parts and scores


def read_scores(out_dir: Path) -> pd.DataFrame:
    """All rows known in `out_dir`: scores.parquet plus parts not yet folded in (may hold duplicates)."""
    out_dir = Path(out_dir)
    files = [out_dir / "scores.parquet"] if (out_dir / "scores.parquet").exists() else []
    files += sorted((out_dir / "parts").glob("part-*.parquet"))
    if not files:
        return SCHEMA.empty_table().to_pandas()
    return pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files]).to_pandas()


def _row_keys(df: pd.DataFrame) -> pd.Series:
    # A file that could not even be read has no content hash: key it by its path instead.
    return df["sha256"].fillna("path:" + df["source_path"]) + "|" + df["model_digest"]


def consolidate(out_dir: Path, gate=None) -> pd.DataFrame:
    """Fold the part files into scores.parquet (first row per (sha256, model digest) wins), then remove them.

    `gate(df)` sees the folded table first; when it raises, nothing is replaced or removed.
    """
    out_dir = Path(out_dir)
    parts = sorted((out_dir / "parts").glob("part-*.parquet"))
    df = read_scores(out_dir)
    df = df.loc[~_row_keys(df).duplicated()].reset_index(drop=True)
    if gate is not None:
        gate(df)
    if parts or not (out_dir / "scores.parquet").exists():
        with atomic_path(out_dir / "scores.parquet") as tmp:
            pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), tmp)
        for part in parts:  # only after scores.parquet holds their rows
            part.unlink(missing_ok=True)
    return df


# --------------------------------------------------------------------------- the model


def class_activation_maps(features: torch.Tensor, weights: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """CAM_k = relu(sum_c W[k, c] * features[c]), each map scaled to [0, 1].

    features: (B, C, h, w); weights: (K, C) the global classifier; classes: (B, T) indices.
    Returns (B, T, h, w) float32.
    """
    cams = torch.einsum("btc,bchw->bthw", weights[classes].float(), features.float()).clamp_min_(0)
    peak = cams.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, cams / peak.clamp_min(1e-12), torch.zeros_like(cams))


def _rows_for_batch(model, batch: list[_Study], device, params: Params, thresholds: np.ndarray):
    """Forward one batch; yield (study, facts) with probabilities, flags, boxes and display CAMs."""
    m, top = params.model, params.score.top_findings
    with torch.inference_mode():
        out = model(to_input(torch.from_numpy(np.stack([s.pixels for s in batch])), device))
        probs = torch.sigmoid(out.fusion_logits.float())
        classes = probs.topk(top, dim=1).indices
        cams = class_activation_maps(out.global_features, model.global_branch.classifier.weight, classes)
    probs, classes, boxes, cams = probs.cpu().numpy(), classes.cpu().numpy(), out.boxes.cpu().numpy(), cams.cpu()
    whole_input = (0, 0, m.image_size - 1, m.image_size - 1)
    for i, study in enumerate(batch):
        dh, dw = study.display.shape
        # The maps cover the network input, i.e. the centre crop of the resized image: place
        # them on that region of the picture (all of it when model.resize is unset).
        y0, x0, y1, x1 = input_box_to_image(whole_input, m, (dh, dw))
        up = np.zeros((cams.shape[1], dh, dw), dtype=np.float32)
        up[:, y0 : y1 + 1, x0 : x1 + 1] = F.interpolate(cams[i : i + 1], size=(y1 - y0 + 1, x1 - x0 + 1),
                                                        mode="bilinear", align_corners=False)[0].numpy()
        box = tuple(boxes[i])
        yield study, probs[i], probs[i] >= thresholds, classes[i], input_box_to_image(box, m, study.shape), \
            input_box_to_image(box, m, (dh, dw)), up


def _write_study(out_dir: Path, row: dict, study: _Study | None, pictures) -> None:
    name = output_name(row["study_id"])
    if pictures is not None:
        display_box, cams, titles = pictures
        save_png(render_overlay(study.display, display_box, cams, titles), out_dir / row["overlay"])
        save_png(thumbnail(study.display, display_box), out_dir / row["thumbnail"])
    facts = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
    facts["probabilities"] = {p: facts.pop(c) for p, c in zip(PATHOLOGIES, LABEL_COLUMNS)}
    facts["flags"] = {p: facts.pop(c) for p, c in zip(PATHOLOGIES, FLAG_COLUMNS)}
    facts["attention_box"] = {"y0": facts.pop("box_y0"), "x0": facts.pop("box_x0"), "y1": facts.pop("box_y1"),
                              "x1": facts.pop("box_x1"), "units": "original image pixels, inclusive"}
    atomic_write_json(out_dir / "studies" / f"{name}.json", facts)


def _base_row(study: _Study, digest: str, run_id: str, status: str) -> dict:
    row = dict.fromkeys(SCHEMA.names)
    name = output_name(study.study_id)
    row.update(study_id=study.study_id, source_path=str(study.path), sha256=study.sha256, model_digest=digest,
               status=status, reason=study.reason, scored_at=datetime.now(timezone.utc), run_id=run_id,
               json=f"studies/{name}.json")
    return row


# --------------------------------------------------------------------------- the run


def check_models(models_dir: Path) -> dict:
    """The registry entry of the weights in `models_dir`; DataError when missing or unregistered."""
    missing = [s for s in STAGES if not (Path(models_dir) / f"{s}.safetensors").exists()]
    if missing:
        raise DataError(f"model weights missing for stage(s) {', '.join(missing)}; train them first (`cxr train --stage ...`)",
                        where=str(models_dir))
    return verify(models_dir)


@dataclass(frozen=True)
class ScoreContext:
    """What every shard of one scoring run needs: small and picklable, sent to each shard task."""

    params: Params
    input_dir: Path
    out_dir: Path
    models_dir: Path
    digest: str
    run_id: str
    thresholds: tuple[float, ...]


@dataclass
class ScorePlan:
    """A scoring run, decided before any study is read: the new studies in shards of one batch."""

    context: ScoreContext
    shards: list[list[_Study]]
    summary: dict  # counts known from the manifest (files found, already scored, duplicates)
    keys: list[str]  # (sha256, model digest) keys of this input's rows


def plan_scoring(params: Params, input_dir: Path, out_dir: Path, *, models_dir: Path | None = None,
                 thresholds_path: Path | None = None, workers: int = 2) -> ScorePlan:
    """Check the manifest and the weights, hash the inputs and split the new studies into shards.

    Nothing is written but the validation results: unregistered weights or an unkeyable
    manifest stop the run here. Each shard is one batch and becomes one part file.
    """
    s = params.score
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    models_dir = Path(models_dir or params.paths.models)
    manifest = list_studies(input_dir, s.max_bytes)
    registered = check_models(models_dir)  # before anything is written: unregistered weights score nothing
    validate_score_manifest(manifest.assign(path=manifest["path"].map(str)), s.max_bytes, out_dir / "validation",
                            source=str(input_dir))
    digest = registered["digest"]  # verify() has just hashed the weights on disk: no second pass
    device = pick_device(params.train.device)
    model = _model(models_dir, digest, params, device)
    entry = load_or_compute_thresholds(params, model, device, digest, thresholds_path or models_dir / "thresholds.json")
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(2)

    known = read_scores(out_dir)
    done = set(_row_keys(known[known["model_digest"] == digest]))
    todo, seen, keys, already, duplicates = [], set(), [], 0, 0
    refused = dict(zip(manifest["path"], manifest["reason"]))
    files = list(manifest["path"])
    with ThreadPoolExecutor(max(1, workers)) as pool:
        # A refused file is never opened, not even to hash it.
        shas = list(pool.map(lambda p: (refused[p],) if isinstance(refused[p], str) else _sha_or_none(p), files))
    for path, sha in zip(files, shas):
        study = _Study(path.relative_to(input_dir).as_posix(), path, sha if isinstance(sha, str) else None)
        if not isinstance(sha, str):
            study.reason = sha[0]
        key = (study.sha256 or f"path:{path}") + "|" + digest
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        keys.append(key)
        if key in done:
            already += 1
        else:
            todo.append(study)

    thresholds = tuple(float(entry["classes"][p]["threshold"]) for p in PATHOLOGIES)
    context = ScoreContext(params, input_dir, out_dir, models_dir, digest, run_id, thresholds)
    summary = {
        "run_id": run_id, "input_dir": str(input_dir), "out_dir": str(out_dir), "model_digest": digest,
        "backbone": registered["backbone"], "training_data_version": registered["training_data_version"],
        "data_version": entry["data_version"], "threshold_rule": entry["rule"], "files_found": len(files),
        "already_scored": already, "duplicates_in_input": duplicates, "validation": str(out_dir / "validation"),
    }
    shards = [todo[i : i + s.batch_size] for i in range(0, len(todo), s.batch_size)]
    return ScorePlan(context, shards, summary, keys)


_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(models_dir: Path, digest: str, params: Params, device) -> torch.nn.Module:
    """The AG-CNN of these weights on `device`, loaded once per process (shards reuse it)."""
    key = (str(Path(models_dir).resolve()), digest, str(device), params.model)
    if key not in _MODELS:
        _MODELS.clear()  # one model per process: a new digest replaces the old one
        _MODELS[key] = load_agcnn(models_dir, params).to(device)
    return _MODELS[key]


def score_shard(context: ScoreContext, index: int, studies: list[_Study], workers: int = 2) -> dict:
    """Score one shard into `parts/part-<run>-<index>.parquet` plus its per-study files.

    The part's name is fixed by (run, shard), so a shard run twice (a worker lost mid-shard
    and the shard rescheduled) replaces its own part: no shard is lost or counted twice.
    Returns the shard's counts and the per-study files it wrote.
    """
    params, out_dir, digest, run_id = context.params, context.out_dir, context.digest, context.run_id
    s = params.score
    device = pick_device(params.train.device)
    model = _model(context.models_dir, digest, params, device)
    thresholds = np.asarray(context.thresholds, dtype=np.float32)
    limits = LoaderLimits(max_pixels=s.max_pixels, min_side=s.min_side)
    # Copies: a shard's studies may be reused by the caller (in-process), pixels must not stick to them.
    chunk = [_Study(st.study_id, st.path, st.sha256, st.reason) for st in studies]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        chunk = list(pool.map(lambda st: st if st.reason else _load(st, params.model, limits, s.overlay_size),
                              chunk))
        good = [st for st in chunk if st.reason is None]
        rows, writes = [], []
        for st in chunk:
            if st.reason is not None:
                row = _base_row(st, digest, run_id, "rejected")
                rows.append(row)
                writes.append((row, st, None))
        if good:
            for st, prob, flag, top, box, dbox, cams in _rows_for_batch(model, good, device, params, thresholds):
                row = _base_row(st, digest, run_id, "scored")
                name = output_name(st.study_id)
                flagged = [p for p, f in zip(PATHOLOGIES, flag) if f]
                row.update(dict(zip(LABEL_COLUMNS, prob.tolist())), **dict(zip(FLAG_COLUMNS, flag.tolist())),
                           **dict(zip(BOX_COLUMNS, box)), image_height=st.shape[0], image_width=st.shape[1],
                           flagged=", ".join(flagged), max_flagged_probability=float(prob[flag].max()) if flagged else None,
                           top_findings=", ".join(PATHOLOGIES[k] for k in top),
                           overlay=f"overlays/{name}.png", thumbnail=f"thumbs/{name}.png")
                titles = [f"{st.study_id} (attention box)"] + [
                    f"{PATHOLOGIES[k]} {prob[k]:.2f}" + (" FLAGGED" if flag[k] else "") for k in top]
                rows.append(row)
                writes.append((row, st, (dbox, cams, titles)))
        written = [str(out_dir / row[k]) for row, *_ in writes for k in ("json", "overlay", "thumbnail") if row[k]]
        list(pool.map(lambda w: _write_study(out_dir, *w), writes))
    with atomic_path(_part_path(out_dir, run_id, index)) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    return {"shard": index, "scored": len(good), "rejected": len(chunk) - len(good), "written": written}


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
    try:
        consolidate(out_dir, gate=lambda df: validate_scores(df.assign(key=_row_keys(df)), out_dir / "validation",
                                                              source=str(out_dir / "scores.parquet")))
    except DataError as exc:
        # Unpublishable rows must not linger: the next run would fold or skip them.
        written = [Path(p) for r in results for p in r["written"]]
        for path in [*(out_dir / "parts").glob(f"part-{run_id}-*.parquet"), *written]:
            path.unlink(missing_ok=True)
        error = DataError(f"the scores failed validation, so nothing was published (the previous scores.parquet and "
                          f"report.html are kept; this run's {new} rows were discarded and will be scored "
                          f"again next run): {_reason(exc)}", where=exc.where)
        error.summary = getattr(exc, "summary", None)  # what the gate checked, for callers that record it
        raise error from None
    summary["studies"] = plan.keys
    return summary


def score_studies(params: Params, input_dir: Path, out_dir: Path, *, models_dir: Path | None = None,
                  thresholds_path: Path | None = None, stop_after_batches: int | None = None, workers: int = 2) -> dict:
    """Score every new study under `input_dir` into `out_dir` in this process; return the run's summary.

    plan -> one shard at a time -> finish; `flows.score` maps the same shards over a task
    runner instead. `stop_after_batches` ends the run after that many part files, before
    consolidation (it simulates a killed run). The summary's `studies` lists the keys of
    this input's rows.
    """
    plan = plan_scoring(params, input_dir, out_dir, models_dir=models_dir, thresholds_path=thresholds_path,
                        workers=workers)
    results = []
    for index, studies in enumerate(plan.shards):
        results.append(score_shard(plan.context, index, studies, workers))
        if stop_after_batches is not None and len(results) >= stop_after_batches and len(results) < len(plan.shards):
            return {**_run_counts(plan, results), "stopped_after_batches": len(results),
                    "message": f"stopped after {len(results)} batches"}
    return finish_scoring(plan, results)


def _sha_or_none(path: Path):
    try:
        return file_sha256(path)
    except DataError as exc:
        return (_reason(exc),)
