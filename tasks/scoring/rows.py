"""The rows of a scoring run: the scores schema, one study's result and its JSON, and the
Parquet parts folded into `scores.parquet`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cxr.core.atomic import atomic_path
from cxr.core.labels import BRANCHES, LABEL_COLUMNS, PATHOLOGIES
from tasks.scoring.overlay import upsample_maps
from tasks.scoring.studies import Study, output_name, row_keys
from tasks.scoring.verdict import OODVerdict

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
     # In plain words, when the study is out of distribution: what its scores are worth (the
     # training data's kind decides the wording); null otherwise. For reports and the SR's text.
     ("ood_statement", pa.string()),
     ("overlay", pa.string()), ("thumbnail", pa.string()), ("json", pa.string())]
)


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
    # The out-of-distribution verdict (None when the file was never decoded).
    verdict: OODVerdict | None = field(default=None, repr=False)
    # The model's facts for reading the figures: probability_meaning, operating_point, thresholds.
    meaning: dict | None = field(default=None, repr=False)

    def cams_for(self, classes, *, levels: bool = False) -> np.ndarray | None:
        """(T, h, w) float32 maps of the class indices `classes` on `display`'s grid; with
        `levels`, as uint8 0..255 (what the overlay colours, at a quarter of the memory)."""
        if self.cam_grid is None:
            return None
        dh, dw = self.display.shape
        y0, x0, y1, x1 = self.cam_region
        grid = self.cam_grid[list(classes)]
        # Bilinear with half-pixel centres, as torch's interpolate (`upsample_maps`).
        up = upsample_maps(grid, (y1 - y0 + 1, x1 - x0 + 1), levels=levels)
        if up.shape[1:] == (dh, dw):  # the maps cover the whole picture (no centre crop)
            return up
        out = np.zeros((grid.shape[0], dh, dw), dtype=np.uint8 if levels else np.float32)
        out[:, y0 : y1 + 1, x0 : x1 + 1] = up
        return out

    @cached_property
    def cams(self) -> np.ndarray | None:
        return self.cams_for(range(len(PATHOLOGIES)))


def study_json(study: ScoredStudy) -> dict:
    """The per-study JSON: the row's facts, probabilities and flags by finding, each branch's
    probabilities, the attention box in original pixels, the out-of-distribution verdict (with
    its plain-words `statement`), and what a probability means (`probability_meaning`), when a
    finding is flagged (`operating_point`) and each finding's threshold (`thresholds`)."""
    facts = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in study.row.items()}
    facts["probabilities"] = {p: facts.pop(c) for p, c in zip(PATHOLOGIES, LABEL_COLUMNS)}
    facts["flags"] = {p: facts.pop(c) for p, c in zip(PATHOLOGIES, FLAG_COLUMNS)}
    facts["branch_probabilities"] = None if study.probabilities is None else {
        b: dict(zip(PATHOLOGIES, study.probabilities[b].astype(float).tolist())) for b in BRANCHES}
    facts["attention_box"] = {"y0": facts.pop("box_y0"), "x0": facts.pop("box_x0"), "y1": facts.pop("box_y1"),
                              "x1": facts.pop("box_x1"), "units": "original image pixels, inclusive"}
    facts["ood"] = {**(study.ood or {}), "score": facts["ood_score"], "flag": facts["ood_flag"]}
    facts.update(study.meaning or {})
    return facts


# Indented as before; numpy scalars as numbers; a NaN or infinity (no number) is written as
# null, which JSON has, where the standard library wrote NaN, which it has not.
_JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


def study_json_bytes(study: ScoredStudy) -> bytes:
    """`study_json` encoded: what out_dir/<row json> holds. orjson (C), not the standard
    library, whose indented encoding runs in Python: 0.45 ms a study, a tenth of the run's
    non-model work per study (benchmarks/bench_score.py), against about 0.03 ms."""
    return orjson.dumps(study_json(study), option=_JSON_OPTIONS)


def base_row(study: Study, digest: str, run_id: str, status: str) -> dict:
    row = dict.fromkeys(SCHEMA.names)
    name = output_name(study.study_id)
    row.update(study_id=study.study_id, source_path=str(study.path), sha256=study.sha256, model_digest=digest,
               status=status, reason=study.reason, scored_at=datetime.now(timezone.utc), run_id=run_id,
               json=f"studies/{name}.json")
    return row


def read_scores(out_dir: Path) -> pd.DataFrame:
    """All rows known in `out_dir`: scores.parquet plus parts not yet folded in (may hold duplicates)."""
    out_dir = Path(out_dir)
    files = [out_dir / "scores.parquet"] if (out_dir / "scores.parquet").exists() else []
    files += sorted((out_dir / "parts").glob("part-*.parquet"))
    if not files:
        return SCHEMA.empty_table().to_pandas()
    try:
        # One scan of every file in SCHEMA (columns a file lacks read as null): a run's parts
        # are many small files, and a file at a time took four times as long (63 parts: 0.2 s).
        table = ds.dataset(files, schema=SCHEMA, format="parquet").to_table()
    except pa.ArrowException:  # a column whose type the scan does not cast: file by file
        table = pa.concat_tables([_read_table(f) for f in files])
    return table.to_pandas()


def _read_table(path: Path) -> pa.Table:
    """One scores file in SCHEMA; columns added since it was written (ood_score, ood_flag,
    ood_statement) read as null."""
    table = pq.read_table(path)
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in SCHEMA]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def consolidate(out_dir: Path, gate=None) -> pd.DataFrame:
    """Fold the part files into scores.parquet (first row per (sha256, model digest) wins), then remove them.

    `gate(df)` sees the folded table first; when it raises, nothing is replaced or removed.
    """
    out_dir = Path(out_dir)
    parts = sorted((out_dir / "parts").glob("part-*.parquet"))
    df = read_scores(out_dir)
    df = df.loc[~row_keys(df).duplicated()].reset_index(drop=True)
    if gate is not None:
        gate(df)
    if parts or not (out_dir / "scores.parquet").exists():
        with atomic_path(out_dir / "scores.parquet") as tmp:
            pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), tmp)
        for part in parts:  # only after scores.parquet holds their rows
            part.unlink(missing_ok=True)
    return df
