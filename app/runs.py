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
import pyarrow as pa
import pyarrow.compute as pc

from tasks.scoring import run_index

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


SORTABLE = run_index.SORTABLE
PAGE_SIZE = 100  # rows on one run page


def _run_summary(run: Run) -> dict:
    if run.summary is None:
        return {}
    try:
        return json.loads(run.summary.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


_ORDERED: dict[tuple, tuple[pa.Table, pa.Table]] = {}  # recent sorts: (index rows they sorted, sorted rows)


def run_index_rows(run: Run) -> pa.Table:
    """The run's index rows (one per study key; a dated folder's: its summary's studies or run id)."""
    index = run_index.load_index(run.folder)
    if run.summary is None:
        return index
    summary = _run_summary(run)
    if summary.get("studies"):
        return run_index.select(index, keys=summary["studies"])
    return run_index.select(index, run_id=summary.get("run_id"))


def run_counts(run: Run) -> dict:
    """studies, scored, rejected, flagged, out_of_distribution, last_scored_at (ISO text or None)."""
    found = run_index.counts(run_index_rows(run))
    return {**found, "last_scored_at": clean({"t": found["last_scored_at"]})["t"]}


def run_page(run: Run, sort: str = "max_flagged_probability", descending: bool = True, offset: int = 0,
             limit: int = PAGE_SIZE, *, whole: bool = True) -> tuple[int, pd.DataFrame]:
    """(the run's number of studies, the rows of studies offset .. offset + limit - 1 in that order):
    sorted on the index, only the page's rows read from the Parquet files; `whole` False: only
    the listed columns (run_index.LISTED), straight from the index."""
    try:
        return _run_page(run, sort, descending, offset, limit, whole)
    except FileNotFoundError:  # the store's parts were folded while the page was read: once more
        run_index.forget(run.folder)
        return _run_page(run, sort, descending, offset, limit, whole)


def _run_page(run: Run, sort: str, descending: bool, offset: int, limit: int, whole: bool) -> tuple[int, pd.DataFrame]:
    rows = run_index_rows(run)
    key = (str(run.folder), run.run_id, sort, descending)
    hit = _ORDERED.get(key)
    if hit is not None and hit[0] is rows:  # same index rows as last time: the sort is still good
        ordered = hit[1]
    else:
        ordered = run_index.order(rows, sort, descending)
        if len(_ORDERED) >= 32:
            _ORDERED.pop(next(iter(_ORDERED)))
        _ORDERED[key] = (rows, ordered)
    page = ordered.slice(offset, limit)
    return ordered.num_rows, (run_index.page_rows(run.folder, page) if whole else run_index.listed_rows(page))


def run_rows(run: Run, sort: str = "max_flagged_probability", descending: bool = True) -> pd.DataFrame:
    """Every row of the run (one per study key), sorted; `top_probability` is each study's highest probability."""
    total, rows = run_page(run, sort, descending, 0, 2**62)
    return rows


def study_name(row) -> str:
    """The study's name in URLs: the stem of its per-study JSON (`studies/<name>.json`)."""
    return Path(row["json"]).stem


def find_study(run: Run, name: str) -> dict | None:
    """The row of the study named `name` in `run` (None when the run holds no such study)."""
    index = run_index_rows(run)
    hit = index.filter(pc.equal(index.column("json"), f"studies/{name}.json"))
    if not hit.num_rows:
        return None
    return clean(run_index.page_rows(run.folder, hit.slice(0, 1)).iloc[0].to_dict())


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
