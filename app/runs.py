"""The scoring runs the app can show: `cxr score` outputs, the nightly store, its dated folders
and the app's own record, found under the folders in `app.runs` (default: paths.reports).

A run is addressed by an id the app made (the folder's path below its root, "/" written as
"~"); a request's id is only ever looked up in the table found here, never joined onto a path,
so no URL can name a folder the app did not find itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxr.core.labels import LABEL_COLUMNS
from tasks.scoring.studies import row_keys as _row_keys
from tasks.scoring.rows import read_scores

# A nightly dated folder: the night's report and summary beside the store's scores.
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MAX_DEPTH = 4
APP_RUN = "app"


@dataclass(frozen=True)
class Run:
    run_id: str
    folder: Path  # the store holding scores.parquet / parts and the per-study files
    kind: str  # "app", "batch" or "nightly"
    summary: Path | None = None  # a dated folder's summary.json: its studies are the run


def _slug(parts: tuple[str, ...]) -> str:
    return "~".join(re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in parts) or "reports"


def discover_runs(roots: tuple[Path, ...], app_store: Path) -> dict[str, Run]:
    """Every scoring store under `roots` (a folder with scores.parquet or parts) and dated folder."""
    runs: dict[str, Run] = {}
    app_store = Path(app_store).resolve()
    if (app_store / "parts").is_dir() or (app_store / "scores.parquet").exists():
        runs[APP_RUN] = Run(APP_RUN, app_store, "app")
    for n, root in enumerate(roots):
        root = Path(root)
        if not root.is_dir():
            continue
        prefix = (root.name,) if len(roots) > 1 else ()
        for folder in _stores(root):
            if folder.resolve() == app_store:
                continue
            rel = folder.relative_to(root).parts
            base = _slug(prefix + rel)
            dated = sorted((d for d in folder.iterdir() if _DAY.match(d.name) and (d / "summary.json").is_file()),
                           reverse=True)
            runs.setdefault(base, Run(base, folder.resolve(), "nightly" if dated else "batch"))
            for day in dated:
                runs.setdefault(f"{base}~{day.name}", Run(f"{base}~{day.name}", folder.resolve(), "nightly",
                                                          (day / "summary.json").resolve()))
    return runs


def _stores(root: Path):
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        if (folder / "scores.parquet").is_file() or (folder / "parts").is_dir():
            yield folder
        if depth < MAX_DEPTH:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()
                                  and not p.name.startswith(".") and p.name not in ("studies", "overlays", "thumbs",
                                                                                     "pictures", "parts", "validation"))
            except OSError:
                continue
            stack.extend((c, depth + 1) for c in reversed(children))


SORTABLE = ("max_flagged_probability", "top_probability", "study_id", "status", "scored_at", "ood_score")


def run_rows(run: Run, sort: str = "max_flagged_probability", descending: bool = True) -> pd.DataFrame:
    """The run's rows (one per study key), sorted; `top_probability` is each study's highest probability."""
    df = read_scores(run.folder)
    df = df.loc[~_row_keys(df).duplicated()]
    if run.summary is not None:
        try:
            summary = json.loads(run.summary.read_text())
        except (OSError, json.JSONDecodeError):
            summary = {}
        if summary.get("studies"):
            df = df.loc[_row_keys(df).isin(set(summary["studies"]))]
        else:
            df = df.loc[df["run_id"] == summary.get("run_id")]
    df = df.copy()
    df["top_probability"] = df[list(LABEL_COLUMNS)].max(axis=1)
    sort = sort if sort in SORTABLE else "max_flagged_probability"
    keys = [sort] + [k for k in ("max_flagged_probability", "top_probability", "study_id") if k != sort]
    order = [not descending] + [k == "study_id" for k in keys[1:]]
    return df.sort_values(keys, ascending=order, na_position="last").reset_index(drop=True)


def study_name(row) -> str:
    """The study's name in URLs: the stem of its per-study JSON (`studies/<name>.json`)."""
    return Path(row["json"]).stem


def find_study(run: Run, name: str) -> dict | None:
    """The row of the study named `name` in `run` (None when the run holds no such study)."""
    df = run_rows(run)
    hit = df.loc[df["json"] == f"studies/{name}.json"]
    return None if hit.empty else clean(hit.iloc[0].to_dict())


def clean(row: dict) -> dict:
    """A row as JSON-able Python values (NaN/NaT -> None, timestamps as ISO text)."""
    out = {}
    for key, value in row.items():
        if value is None or (not isinstance(value, (list, dict, tuple)) and pd.isna(value)):
            out[key] = None
        elif hasattr(value, "isoformat"):
            out[key] = value.isoformat()
        elif hasattr(value, "item"):
            out[key] = value.item()
        else:
            out[key] = value
    return out
