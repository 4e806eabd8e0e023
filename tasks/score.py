"""Batch scoring of new studies: loader -> AG-CNN in batches -> rows, JSON, overlays, Parquet.

One implementation for every path: `Scorer` (loaded once per process: registry-verified
weights, operating thresholds, the out-of-distribution gate, the device) turns files into
`ScoredStudy`s and writes their per-study files; `cxr score`, the nightly deployment, the
Dask shards and the web app all go through it.

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

Two Great Expectations gates (`tasks/validate.py`, results and Data Docs in `out/validation/`)
and the model registry guard the run. Before anything is written: the weights must be the
registered ones, and the input manifest must be keyable (unique ids and output names); a file
resolving outside the input folder, missing, empty or over `score.max_bytes` is a rejected
row, never read. Before `scores.parquet` is replaced: the folded table must have one row per
(sha256, model digest) and finite probabilities in [0, 1]; if not, this run's parts and
per-study files are discarded and the previous scores and report stay published.
"""

from __future__ import annotations

import inspect
import logging
import re
import secrets
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
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
from models.attention import crop_boxes
from tasks.dataset import input_box_to_image, network_pixels_from_image, to_input
from tasks.images import LoaderLimits, file_sha256, load_image
from tasks.overlay import display_shape, render_overlay, resize_gray, save_png, thumbnail
from tasks.registry import verify
from tasks.thresholds import load_or_compute_thresholds
from tasks.device import pick_device
from tasks.validate import validate_score_manifest, validate_scores
from tasks.weights import STAGES, load_agcnn

try:  # the out-of-distribution gate (tasks/ood.py); scoring runs without it on older checkouts
    from tasks import ood as _ood
except ImportError:  # pragma: no cover - only before tasks/ood.py exists
    _ood = None

log = logging.getLogger("cxr.score")

# The loader fills model-free facts (channels, colourfulness, DICOM modality...) for the precheck.
_LOADER_FACTS = "facts" in inspect.signature(load_image).parameters
OOD_MODES = ("reject", "flag", "off")
BRANCHES = ("global", "local", "fusion")

FLAG_COLUMNS = tuple(f"{c}_flag" for c in LABEL_COLUMNS)
BOX_COLUMNS = ("box_y0", "box_x0", "box_y1", "box_x1")
SCHEMA = pa.schema(
    [("study_id", pa.string()), ("source_path", pa.string()), ("sha256", pa.string()), ("model_digest", pa.string()),
     ("status", pa.string()), ("reason", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC")), ("run_id", pa.string()),
     ("image_height", pa.int32()), ("image_width", pa.int32()), *[(c, pa.int32()) for c in BOX_COLUMNS],
     *[(c, pa.float32()) for c in LABEL_COLUMNS], *[(c, pa.bool_()) for c in FLAG_COLUMNS],
     ("flagged", pa.string()), ("max_flagged_probability", pa.float32()), ("top_findings", pa.string()),
     # Out-of-distribution gate: its score (higher = further from the training data; null when
     # the weights have no gate or the file was never decoded) and whether the study was found
     # out of distribution (null when never checked).
     ("ood_score", pa.float32()), ("ood_flag", pa.bool_()),
     ("overlay", pa.string()), ("thumbnail", pa.string()), ("json", pa.string())]
)


@dataclass
class _Study:
    """A study on its way through the pipeline (small and picklable until it is prepared)."""

    study_id: str
    path: Path
    sha256: str | None
    reason: str | None = None  # set when the manifest, the loader or the precheck refused the file
    pixels: np.ndarray | None = None  # (S, S) uint8 network input
    display: np.ndarray | None = None  # (h, w) float32 [0, 1] for the pictures
    shape: tuple[int, int] | None = None  # (H, W) of the original image


@dataclass
class ScoredStudy:
    """One study's result: its row, and what the pictures and the web app need.

    row: one row of SCHEMA. probabilities: {"global", "local", "fusion"} -> (14,) float32
    (None when rejected). display: (h, w) float32 [0, 1], longest side score.overlay_size.
    display_box: inclusive (y0, x0, y1, x1) attention box on `display`. crop: (L, L) uint8,
    what the local branch saw. `cams` (a property): (14, h, w) float32 [0, 1] activation map
    of every class on `display`'s grid, upsampled on first use from the feature-map grid.
    """

    row: dict
    probabilities: dict[str, np.ndarray] | None = None
    display: np.ndarray | None = None
    display_box: tuple[int, int, int, int] | None = None
    crop: np.ndarray | None = None
    # (14, fh, fw) maps on the global branch's feature grid, and the display region they cover.
    cam_grid: np.ndarray | None = field(default=None, repr=False)
    cam_region: tuple[int, int, int, int] | None = field(default=None, repr=False)
    # Extra facts for the per-study JSON (the gate's threshold and method, the mode).
    ood: dict | None = field(default=None, repr=False)

    def cams_for(self, classes, *, levels: bool = False) -> np.ndarray | None:
        """(T, h, w) float32 maps of the class indices `classes` on `display`'s grid; with
        `levels`, as uint8 0..255 (what the overlay colours, at a quarter of the memory)."""
        if self.cam_grid is None:
            return None
        dh, dw = self.display.shape
        y0, x0, y1, x1 = self.cam_region
        grid = torch.from_numpy(self.cam_grid[list(classes)])[None]
        up = F.interpolate(grid, size=(y1 - y0 + 1, x1 - x0 + 1), mode="bilinear", align_corners=False)[0]
        if levels:
            up = up.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        out = np.zeros((grid.shape[1], dh, dw), dtype=np.uint8 if levels else np.float32)
        out[:, y0 : y1 + 1, x0 : x1 + 1] = up.numpy()
        return out

    @cached_property
    def cams(self) -> np.ndarray | None:
        return self.cams_for(range(len(PATHOLOGIES)))


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


# --------------------------------------------------------------------------- parts and scores


def read_scores(out_dir: Path) -> pd.DataFrame:
    """All rows known in `out_dir`: scores.parquet plus parts not yet folded in (may hold duplicates)."""
    out_dir = Path(out_dir)
    files = [out_dir / "scores.parquet"] if (out_dir / "scores.parquet").exists() else []
    files += sorted((out_dir / "parts").glob("part-*.parquet"))
    if not files:
        return SCHEMA.empty_table().to_pandas()
    return pa.concat_tables([_read_table(f) for f in files]).to_pandas()


def _read_table(path: Path) -> pa.Table:
    """One scores file in SCHEMA; columns added since it was written (ood_score, ood_flag) read as null."""
    table = pq.read_table(path)
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in SCHEMA]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


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


def check_models(models_dir: Path) -> dict:
    """The registry entry of the weights in `models_dir`; DataError when missing or unregistered."""
    missing = [s for s in STAGES if not (Path(models_dir) / f"{s}.safetensors").exists()]
    if missing:
        raise DataError(f"model weights missing for stage(s) {', '.join(missing)}; train them first (`cxr train --stage ...`)",
                        where=str(models_dir))
    return verify(models_dir)


_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(models_dir: Path, digest: str, params: Params, device) -> torch.nn.Module:
    """The AG-CNN of these weights on `device`, loaded once per process (shards reuse it)."""
    key = (str(Path(models_dir).resolve()), digest, str(device), params.model)
    if key not in _MODELS:
        _MODELS.clear()  # one model per process: a new digest replaces the old one
        _MODELS[key] = load_agcnn(models_dir, params).to(device)
    return _MODELS[key]


def _batch_outputs(model, pixels: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """One forward of (B, S, S) uint8 inputs -> what the rows and pictures need, on the CPU.

    probabilities of each branch (B, 14); boxes (B, 4) in input pixels; cams (B, 14, h, w)
    on the feature grid; pooled (B, C) global-branch features (the OOD gate's input);
    crops (B, L, L) uint8, the input pixels the local branch saw.
    """
    with torch.inference_mode():
        out = model(to_input(pixels, device))
        weights = model.global_branch.classifier.weight
        every = torch.arange(weights.shape[0], device=weights.device).expand(pixels.shape[0], -1)
        crops = crop_boxes(pixels.to(device).unsqueeze(1).float(), out.boxes, model.local_size)[:, 0]
        result = {"global": torch.sigmoid(out.global_logits.float()), "local": torch.sigmoid(out.local_logits.float()),
                  "fusion": torch.sigmoid(out.fusion_logits.float()), "boxes": out.boxes,
                  "cams": class_activation_maps(out.global_features, weights, every),
                  "pooled": out.global_features.float().amax((2, 3)),
                  "crops": crops.round_().clamp_(0, 255).to(torch.uint8)}
    return {k: v.cpu() for k, v in result.items()}


class Scorer:
    """Loaded once per process: registry-verified weights, thresholds, OOD gate, device.

    `score(items, run_id)` scores files (nothing written); `write(out_dir, study)` writes a
    study's JSON and pictures. The batch pipeline uses the two halves of `score` separately:
    `prepare` (decode one file, thread-safe) and `infer` (one batched forward).
    """

    def __init__(self, params: Params, models_dir: Path, entry: dict, thresholds: np.ndarray,
                 threshold_entry: dict | None = None):
        self.params = params
        self.models_dir = Path(models_dir)
        self.entry = entry
        self.digest: str = entry["digest"]
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.threshold_entry = threshold_entry
        self.device = pick_device(params.train.device)
        self.model = _model(self.models_dir, self.digest, params, self.device)
        s = params.score
        self.limits = LoaderLimits(max_pixels=s.max_pixels, min_side=s.min_side)
        self.ood_mode: str = getattr(s, "ood", "reject")
        # None when tasks/ood.py is absent or these weights were registered without a gate.
        self.gate = _ood.load_gate(self.models_dir, self.digest) if _ood is not None else None

    @classmethod
    def load(cls, params: Params, *, models_dir: Path | None = None, thresholds_path: Path | None = None) -> "Scorer":
        """Verify the weights against the registry, load them, their thresholds and their gate.

        DataError when the weights are missing or not the registered ones.
        """
        models_dir = Path(models_dir or params.paths.models)
        entry = check_models(models_dir)
        device = pick_device(params.train.device)
        model = _model(models_dir, entry["digest"], params, device)
        th = load_or_compute_thresholds(params, model, device, entry["digest"],
                                        thresholds_path or models_dir / "thresholds.json")
        return cls(params, models_dir, entry, [float(th["classes"][p]["threshold"]) for p in PATHOLOGIES], th)

    # ------------------------------------------------------------------ scoring

    def score(self, items: list[tuple[str, Path]], run_id: str) -> list[ScoredStudy]:
        """Score (study_id, path) items in one batched forward; nothing is written.

        A file the loader, the precheck or the gate refuses is a rejected ScoredStudy.
        """
        studies = []
        for study_id, path in items:
            sha = _sha_or_none(Path(path))
            studies.append(_Study(study_id, Path(path), sha if isinstance(sha, str) else None,
                                  None if isinstance(sha, str) else sha[0]))
        return self.infer([self.prepare(s) for s in studies], run_id)

    def prepare(self, study: _Study) -> _Study:
        """Decode one file (the one loader) into network pixels and a display picture, or a reason."""
        if study.reason is not None:
            return study
        facts: dict = {}
        try:
            image = load_image(study.path, self.limits, facts=facts) if _LOADER_FACTS else load_image(study.path, self.limits)
        except DataError as exc:
            study.reason = _reason(exc)
            return study
        study.shape = image.shape
        if _ood is not None and self.ood_mode != "off":
            # Model-free: is this a chest radiograph at all? Not one is refused under "flag" too:
            # "flag" is for radiographs unlike the training data (the gate), not for a photo.
            why = _ood.precheck(image, facts)
            if why:
                study.reason = why
                return study
        study.pixels = network_pixels(image, self.params.model)
        study.display = resize_gray(image, display_shape(*image.shape, self.params.score.overlay_size))
        return study

    def infer(self, studies: list[_Study], run_id: str) -> list[ScoredStudy]:
        """Prepared studies -> ScoredStudies in the same order: one forward for the decodable ones."""
        good = [s for s in studies if s.reason is None]
        results = {}
        if good:
            outs = _batch_outputs(self.model, torch.from_numpy(np.stack([s.pixels for s in good])), self.device)
            ood = self.gate.score(outs["pooled"]) if self.gate is not None else None
            for i, study in enumerate(good):
                results[id(study)] = self._scored(study, run_id, outs, i, None if ood is None else float(ood[i]))
        return [results.get(id(s)) or self._rejected(s, run_id) for s in studies]

    def _ood_facts(self, value: float | None) -> dict:
        gate = self.gate
        return {"mode": self.ood_mode, "score": value, "threshold": None if gate is None else float(gate.threshold),
                "method": None if gate is None else gate.method}

    def _rejected(self, study: _Study, run_id: str, ood_score: float | None = None) -> ScoredStudy:
        row = _base_row(study, self.digest, run_id, "rejected")
        if study.shape is not None:
            row.update(image_height=study.shape[0], image_width=study.shape[1])
        prechecked = _ood is not None and study.reason is not None and study.reason.startswith(_ood.OOD_PREFIX)
        if study.shape is not None or prechecked:
            row.update(ood_score=ood_score, ood_flag=bool(prechecked or ood_score is not None))
        return ScoredStudy(row, ood=self._ood_facts(ood_score) if study.shape is not None else None)

    def _scored(self, study: _Study, run_id: str, outs: dict, i: int, ood_score: float | None) -> ScoredStudy:
        m, top_n = self.params.model, self.params.score.top_findings
        over = self.gate is not None and ood_score is not None and ood_score > self.gate.threshold
        if over and self.ood_mode == "reject":
            study.reason = self.gate.reason(ood_score)
            return self._rejected(study, run_id, ood_score)
        note = self.gate.reason(ood_score) if over and self.ood_mode == "flag" else None
        prob = outs["fusion"][i].numpy()
        flag = prob >= self.thresholds
        top = np.argsort(-prob, kind="stable")[:top_n]
        box = tuple(int(v) for v in outs["boxes"][i])
        dh, dw = study.display.shape
        flagged = [p for p, f in zip(PATHOLOGIES, flag) if f]
        name = output_name(study.study_id)
        row = _base_row(study, self.digest, run_id, "scored")
        row.update(dict(zip(LABEL_COLUMNS, prob.tolist())), **dict(zip(FLAG_COLUMNS, flag.tolist())),
                   **dict(zip(BOX_COLUMNS, input_box_to_image(box, m, study.shape))),
                   image_height=study.shape[0], image_width=study.shape[1], reason=note,
                   flagged=", ".join(flagged), max_flagged_probability=float(prob[flag].max()) if flagged else None,
                   top_findings=", ".join(PATHOLOGIES[k] for k in top),
                   ood_score=ood_score, ood_flag=None if self.ood_mode == "off" else note is not None,
                   overlay=f"overlays/{name}.png", thumbnail=f"thumbs/{name}.png")
        whole_input = (0, 0, m.image_size - 1, m.image_size - 1)
        return ScoredStudy(row, {b: outs[b][i].numpy() for b in BRANCHES}, study.display,
                           input_box_to_image(box, m, (dh, dw)), outs["crops"][i].numpy(),
                           cam_grid=outs["cams"][i].numpy(),
                           # The maps cover the network input, i.e. the centre crop of the resized
                           # image: that region of the picture (all of it when model.resize is unset).
                           cam_region=input_box_to_image(whole_input, m, (dh, dw)), ood=self._ood_facts(ood_score))

    # ------------------------------------------------------------------ outputs

    def write(self, out_dir: Path, study: ScoredStudy, *, pictures: bool = True) -> None:
        """The per-study JSON (out_dir/<row json>) and, with pictures, the overlay and thumbnail PNGs.

        Each file is written atomically; the JSON comes last, so a study whose JSON exists
        has all its files.
        """
        out_dir, row = Path(out_dir), study.row
        if pictures and row["overlay"] and study.display is not None:
            top = [PATHOLOGIES.index(p) for p in row["top_findings"].split(", ")]
            prob = study.probabilities["fusion"]
            titles = [f"{row['study_id']} (attention box)"] + [
                f"{PATHOLOGIES[k]} {prob[k]:.2f}" + (" FLAGGED" if row[FLAG_COLUMNS[k]] else "") for k in top]
            save_png(render_overlay(study.display, study.display_box, study.cams_for(top, levels=True), titles),
                     out_dir / row["overlay"])
            save_png(thumbnail(study.display, study.display_box), out_dir / row["thumbnail"])
        atomic_write_json(out_dir / row["json"], study_json(study))


def study_json(study: ScoredStudy) -> dict:
    """The per-study JSON: the row's facts, probabilities and flags by finding, each branch's
    probabilities, the attention box in original pixels and the out-of-distribution verdict."""
    facts = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in study.row.items()}
    facts["probabilities"] = {p: facts.pop(c) for p, c in zip(PATHOLOGIES, LABEL_COLUMNS)}
    facts["flags"] = {p: facts.pop(c) for p, c in zip(PATHOLOGIES, FLAG_COLUMNS)}
    facts["branch_probabilities"] = None if study.probabilities is None else {
        b: dict(zip(PATHOLOGIES, study.probabilities[b].astype(float).tolist())) for b in BRANCHES}
    facts["attention_box"] = {"y0": facts.pop("box_y0"), "x0": facts.pop("box_x0"), "y1": facts.pop("box_y1"),
                              "x1": facts.pop("box_x1"), "units": "original image pixels, inclusive"}
    facts["ood"] = {**(study.ood or {}), "score": facts["ood_score"], "flag": facts["ood_flag"]}
    return facts


def _base_row(study: _Study, digest: str, run_id: str, status: str) -> dict:
    row = dict.fromkeys(SCHEMA.names)
    name = output_name(study.study_id)
    row.update(study_id=study.study_id, source_path=str(study.path), sha256=study.sha256, model_digest=digest,
               status=status, reason=study.reason, scored_at=datetime.now(timezone.utc), run_id=run_id,
               json=f"studies/{name}.json")
    return row


# --------------------------------------------------------------------------- the run


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
    entry: dict | None = None  # the registry entry the plan verified


@dataclass
class ScorePlan:
    """A scoring run, decided before any study is read: the new studies in shards of one batch."""

    context: ScoreContext
    shards: list[list[_Study]]
    summary: dict  # counts known from the manifest (files found, already scored, duplicates)
    keys: list[str]  # (sha256, model digest) keys of this input's rows
    scorer: Scorer | None = field(default=None, repr=False, compare=False)  # this process's, when planned here

    def __getstate__(self):  # a plan crosses processes (Prefect results, Dask) without its model
        return {**self.__dict__, "scorer": None}


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
    refused = dict(zip(manifest["path"], manifest["reason"]))
    files = list(manifest["path"])
    with ThreadPoolExecutor(max(1, workers) + 1) as pool:  # hashers + the gate
        # The manifest gate (seconds of Great Expectations set-up in a fresh process) runs while
        # the model loads and the inputs are hashed; nothing is scored until it has passed.
        gate = pool.submit(validate_score_manifest, manifest.assign(path=manifest["path"].map(str)), s.max_bytes,
                           out_dir / "validation", source=str(input_dir), docs=s.data_docs)
        try:
            scorer = _scorer(params, models_dir, registered, thresholds_path=thresholds_path)
            # A refused file is never opened, not even to hash it.
            shas = list(pool.map(lambda p: (refused[p],) if isinstance(refused[p], str) else _sha_or_none(p), files))
        finally:
            gate.exception()  # wait for it either way: its result files are written whole
        gate.result()  # an unkeyable manifest stops the run here
    digest, entry = scorer.digest, scorer.threshold_entry
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(2)

    known = read_scores(out_dir)
    done = set(_row_keys(known[known["model_digest"] == digest]))
    todo, seen, keys, already, duplicates = [], set(), [], 0, 0
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

    context = ScoreContext(params, input_dir, out_dir, models_dir, digest, run_id,
                           tuple(float(t) for t in scorer.thresholds), registered)
    summary = {
        "run_id": run_id, "input_dir": str(input_dir), "out_dir": str(out_dir), "model_digest": digest,
        "backbone": registered["backbone"], "training_data_version": registered["training_data_version"],
        "data_version": entry["data_version"], "threshold_rule": entry["rule"], "files_found": len(files),
        "already_scored": already, "duplicates_in_input": duplicates, "validation": str(out_dir / "validation"),
        "ood": {"mode": scorer.ood_mode, "gate": None if scorer.gate is None else scorer.gate.method,
                "threshold": None if scorer.gate is None else float(scorer.gate.threshold)},
    }
    shards = [todo[i : i + s.batch_size] for i in range(0, len(todo), s.batch_size)]
    return ScorePlan(context, shards, summary, keys, scorer)


_SCORERS: dict[tuple, Scorer] = {}


def _scorer(params: Params, models_dir: Path, registered: dict, *, thresholds_path: Path | None = None,
            thresholds: tuple[float, ...] | None = None) -> Scorer:
    """This process's Scorer of these weights and params (a shard on a worker builds it once).

    The plan has verified the weights already (`registered`), so this does not hash them again.
    """
    key = (str(Path(models_dir).resolve()), registered["digest"], params.model_dump_json(), thresholds)
    if key not in _SCORERS:
        if thresholds is None:
            device = pick_device(params.train.device)
            model = _model(models_dir, registered["digest"], params, device)
            entry = load_or_compute_thresholds(params, model, device, registered["digest"],
                                               thresholds_path or Path(models_dir) / "thresholds.json")
            scorer = Scorer(params, models_dir, registered, [float(entry["classes"][p]["threshold"]) for p in PATHOLOGIES],
                            entry)
        else:
            scorer = Scorer(params, models_dir, registered, np.asarray(thresholds, dtype=np.float32))
        _SCORERS.clear()  # one model per process
        _SCORERS[key] = scorer
    return _SCORERS[key]


def _context_scorer(context: ScoreContext) -> Scorer:
    entry = context.entry or {"digest": context.digest}
    return _scorer(context.params, context.models_dir, entry, thresholds=context.thresholds)


def _commit_batch(out_dir: Path, run_id: str, index: int, scored: list[ScoredStudy]) -> dict:
    """The batch's part file (after every per-study file of it is written); its counts."""
    rows = [s.row for s in scored]
    with atomic_path(_part_path(out_dir, run_id, index)) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    n_scored = sum(r["status"] == "scored" for r in rows)
    written = [str(Path(out_dir) / r[k]) for r in rows for k in ("json", "overlay", "thumbnail") if r[k]]
    return {"shard": index, "scored": n_scored, "rejected": len(rows) - n_scored, "written": written}


def _fresh(studies: list[_Study]) -> list[_Study]:
    # Copies: a shard's studies may be reused by the caller (in-process), pixels must not stick to them.
    return [_Study(st.study_id, st.path, st.sha256, st.reason) for st in studies]


def score_shard(context: ScoreContext, index: int, studies: list[_Study], workers: int = 2) -> dict:
    """Score one shard into `parts/part-<run>-<index>.parquet` plus its per-study files.

    The Dask path's unit of work (in-process runs use the pipelined `run_shards`). The
    part's name is fixed by (run, shard), so a shard run twice (a worker lost mid-shard and
    the shard rescheduled) replaces its own part: no shard is lost or counted twice.
    Returns the shard's counts and the per-study files it wrote.
    """
    scorer = _context_scorer(context)
    out_dir, pictures = context.out_dir, context.params.score.pictures
    with ThreadPoolExecutor(max(1, workers)) as pool:
        scored = scorer.infer(list(pool.map(scorer.prepare, _fresh(studies))), context.run_id)
        list(pool.map(lambda st: scorer.write(out_dir, st, pictures=pictures), scored))
    return _commit_batch(out_dir, context.run_id, index, scored)


def run_shards(plan: ScorePlan, *, workers: int = 2, stop_after_batches: int | None = None, ahead: int = 2) -> list[dict]:
    """Score every shard of `plan` in this process, decode -> forward -> write as a pipeline.

    `workers` decoder threads keep up to `ahead` batches decoded ahead of the forward pass;
    2 x `workers` writer threads render and write the pictures and JSON of up to `ahead`
    batches behind it. A batch's part file is written once all its studies' files are, in
    batch order. The first failure (a write error, say) stops the run: batches before it
    keep their parts, the failing batch gets none, and the error is raised.
    """
    context = plan.context
    scorer = plan.scorer or _context_scorer(context)
    out_dir, run_id, pictures = context.out_dir, context.run_id, context.params.score.pictures
    shards = plan.shards if stop_after_batches is None else plan.shards[:stop_after_batches]
    results: list[dict] = []
    decoding: deque[list[Future]] = deque()
    writing: deque[tuple[int, list[ScoredStudy], list[Future]]] = deque()
    # Twice the writers: each study's three files are fsynced (cxr.atomic), and a writer
    # waiting on the disk holds no core.
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="cxr-decode") as decoders, \
            ThreadPoolExecutor(2 * max(1, workers), thread_name_prefix="cxr-write") as writers:
        try:
            queued = iter(shards)
            for _ in range(ahead):
                _queue_decode(decoders, decoding, queued, scorer)
            for index in range(len(shards)):
                prepared = [f.result() for f in decoding.popleft()]
                _queue_decode(decoders, decoding, queued, scorer)
                scored = scorer.infer(prepared, run_id)
                del prepared
                writing.append((index, scored, [writers.submit(scorer.write, out_dir, st, pictures=pictures)
                                                for st in scored]))
                # Commit finished batches; wait only when `ahead` batches are already being written.
                while writing and (len(writing) > ahead or all(f.done() for f in writing[0][2])):
                    results.append(_commit_written(out_dir, run_id, writing.popleft()))
            while writing:
                results.append(_commit_written(out_dir, run_id, writing.popleft()))
        except BaseException:
            for futures in [*decoding, *(w[2] for w in writing)]:
                for f in futures:
                    f.cancel()
            raise
    return results


def _queue_decode(pool: ThreadPoolExecutor, decoding: deque, shards, scorer: Scorer) -> None:
    batch = next(shards, None)
    if batch is not None:
        decoding.append([pool.submit(scorer.prepare, st) for st in _fresh(batch)])


def _commit_written(out_dir: Path, run_id: str, pending: tuple[int, list[ScoredStudy], list[Future]]) -> dict:
    index, scored, futures = pending
    for f in futures:
        f.result()  # raises the batch's first write error: no part for a batch with a missing file
    return _commit_batch(out_dir, run_id, index, scored)


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
        consolidate(out_dir, gate=lambda df: validate_scores(df.assign(key=_row_keys(df)), out_dir / "validation",
                                                              source=str(out_dir / "scores.parquet"), docs=docs))
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

    plan -> the pipelined shards -> finish; `flows.score` runs the same steps as Prefect
    tasks (or maps the shards over Dask workers). `stop_after_batches` ends the run after
    that many part files, before consolidation (it simulates a killed run). The summary's
    `studies` lists the keys of this input's rows.
    """
    plan = plan_scoring(params, input_dir, out_dir, models_dir=models_dir, thresholds_path=thresholds_path,
                        workers=workers)
    results = run_shards(plan, workers=workers, stop_after_batches=stop_after_batches)
    if stop_after_batches is not None and len(results) < len(plan.shards):
        return {**_run_counts(plan, results), "stopped_after_batches": len(results),
                "message": f"stopped after {len(results)} batches"}
    return finish_scoring(plan, results)


def _sha_or_none(path: Path):
    try:
        return file_sha256(path)
    except DataError as exc:
        return (_reason(exc),)
