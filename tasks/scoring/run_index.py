"""The run index: a scoring store's row counts and sort keys beside it, so a run of any size is
listed, counted, sorted and paged without reading its whole table.

`<store>/scores_index.parquet` holds one row per study key (the first row of a key wins, as in
`read_scores` + dedupe): where the row is (`file`, `row`: its Parquet file below the store and
its position there), the key, and the few columns the pages sort, filter and count by. Its
schema metadata lists the files it covers (name, size, mtime). `load_index` returns it when
the store's files are those; when parts were added it reads only the new parts' few columns
and appends; when a covered file changed (parts folded into scores.parquet) it rebuilds from
the files' few columns. `page_rows` then reads the whole rows of one page only: per file, the
row groups that hold them.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr.core.atomic import atomic_path
from cxr.core.labels import LABEL_COLUMNS
from tasks.scoring.rows import SCHEMA

INDEX_FILE = "scores_index.parquet"
FORMAT = 1
_META = b"cxr_run_index"
# Sortable columns; ties are broken by the highest flagged probability, the highest probability,
# then the study id (ascending), empty values last whatever the order.
SORTABLE = ("max_flagged_probability", "top_probability", "study_id", "status", "scored_at", "ood_score")
_TIES = ("max_flagged_probability", "top_probability", "study_id")
_READ = ["sha256", "source_path", "model_digest", "run_id", "status", "reason", "study_id", "flagged",
         "max_flagged_probability", "scored_at", "ood_score", "ood_flag", "json", *LABEL_COLUMNS]
# Beside where each row is and its key: what the run page shows (so a page of the list needs
# no row read at all) and what the counts and sorts need.
LISTED = ("study_id", "source_path", "status", "reason", "flagged", "max_flagged_probability", "top_probability",
          "ood_score", "ood_flag", "scored_at", "json", "run_id")
INDEX_SCHEMA = pa.schema([
    ("file", pa.string()), ("row", pa.int32()), ("key", pa.string()), ("run_id", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("study_id", pa.string()), ("source_path", pa.string()), ("json", pa.string()),
    ("flagged", pa.string()), ("has_flag", pa.bool_()), ("max_flagged_probability", pa.float32()),
    ("top_probability", pa.float32()), ("scored_at", pa.timestamp("us", tz="UTC")), ("ood_score", pa.float32()),
    ("ood_flag", pa.bool_())])

_MEMO: dict[str, tuple[tuple, pa.Table]] = {}  # this process's indexes by store, with their files' signature


def store_files(folder: Path) -> list[tuple[str, int, int]]:
    """(name below the store, size, mtime_ns) of its scores files, in `read_scores` order."""
    folder = Path(folder)
    names = ["scores.parquet"] if (folder / "scores.parquet").is_file() else []
    parts = folder / "parts"
    if parts.is_dir():
        names += sorted(f"parts/{e.name}" for e in os.scandir(parts)
                        if e.name.startswith("part-") and e.name.endswith(".parquet"))
    out = []
    for name in names:
        try:
            st = (folder / name).stat()
        except FileNotFoundError:  # a part folded away while listing
            continue
        out.append((name, st.st_size, st.st_mtime_ns))
    return out


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    if name in table.column_names:
        return table.column(name).cast(type_).combine_chunks()
    return pa.nulls(table.num_rows, type_)


def _file_index(folder: Path, name: str) -> pa.Table:
    """The index rows of one scores file (every row, duplicates not yet removed)."""
    types = {f.name: f.type for f in SCHEMA}
    present = set(pq.read_schema(folder / name).names)
    table = pq.read_table(folder / name, columns=[c for c in _READ if c in present])
    col = {c: _column(table, c, types[c]) for c in _READ}
    n = table.num_rows
    # row_key: (content sha256 | "path:" + source path) + "|" + model digest
    ident = pc.if_else(pc.is_null(col["sha256"]), pc.binary_join_element_wise("path:", col["source_path"], ""),
                       col["sha256"])
    key = pc.binary_join_element_wise(ident, col["model_digest"], "|")
    top = col[LABEL_COLUMNS[0]]
    for c in LABEL_COLUMNS[1:]:
        top = pc.max_element_wise(top, col[c])
    has_flag = pc.fill_null(pc.greater(pc.utf8_length(pc.fill_null(col["flagged"], "")), 0), False)
    return pa.Table.from_arrays([
        pa.array([name] * n, pa.string()), pa.array(np.arange(n, dtype=np.int32)), key, col["run_id"], col["status"],
        col["reason"], col["study_id"], col["source_path"], col["json"], col["flagged"], has_flag,
        col["max_flagged_probability"], top.cast(pa.float32()), col["scored_at"], col["ood_score"], col["ood_flag"]],
        schema=INDEX_SCHEMA)


def _first_per_key(table: pa.Table) -> pa.Table:
    """Rows in order, keeping the first of each key (what `read_scores` + dedupe shows)."""
    keys = table.column("key").to_pandas()
    keep = ~keys.duplicated().to_numpy()
    return table if keep.all() else table.filter(pa.array(keep))


def _read_saved(folder: Path) -> tuple[list, pa.Table] | None:
    path = folder / INDEX_FILE
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[_META])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return None
    if meta.get("format") != FORMAT or table.schema.remove_metadata() != INDEX_SCHEMA:
        return None
    return [tuple(f) for f in meta["files"]], table.replace_schema_metadata(None)


def write_index(folder: Path, files: list, table: pa.Table) -> bool:
    """Save the index beside the store (atomically); False when the store is not writable."""
    meta = {"format": FORMAT, "files": [list(f) for f in files], "rows": table.num_rows}
    try:
        with atomic_path(Path(folder) / INDEX_FILE) as tmp:
            pq.write_table(table.replace_schema_metadata({_META: json.dumps(meta).encode()}), tmp)
    except OSError:
        return False
    return True


def load_index(folder: Path, *, save: bool = True) -> pa.Table:
    """The store's index (one row per study key), current with its files; saved back when it changed."""
    for attempt in range(3):
        try:
            return _load_index(Path(folder), save)
        except FileNotFoundError:  # a part folded into scores.parquet while it was read: list again
            forget(folder)
            if attempt == 2:
                raise


def forget(folder: Path) -> None:
    """Drop this process's copy of the store's index (the next load checks the files again)."""
    _MEMO.pop(str(Path(folder)), None)


def _load_index(folder: Path, save: bool) -> pa.Table:
    files = store_files(folder)
    signature = tuple(files)
    memo = _MEMO.get(str(folder))
    if memo is not None and memo[0] == signature:
        return memo[1]
    saved = _read_saved(folder) if memo is None else (list(memo[0]), memo[1])
    if saved is not None and saved[0] == files:
        table = saved[1]
    else:
        old = saved[0] if saved is not None else None
        current = {f[0]: f for f in files}
        if old is not None and all(current.get(f[0]) == f for f in old):  # only new parts: append them
            known = {f[0] for f in old}
            pieces = [saved[1]] + [_file_index(folder, f[0]) for f in files if f[0] not in known]
        else:
            pieces = [_file_index(folder, f[0]) for f in files]
        table = _first_per_key(pa.concat_tables(pieces)) if pieces else INDEX_SCHEMA.empty_table()
        if save and files:
            write_index(folder, files, table)
    _MEMO[str(folder)] = (signature, table)
    return table


def update_index(folder: Path) -> pa.Table:
    """Bring the saved index up to date (a run's finish calls it after folding its parts)."""
    forget(folder)
    return load_index(folder)


def select(index: pa.Table, *, keys=None, run_id: str | None = None) -> pa.Table:
    """The index rows of one run: those whose key is in `keys`, or (keys None) of `run_id` (None: all)."""
    if keys is not None:
        return index.filter(pc.is_in(index.column("key"), value_set=pa.array(list(keys), pa.string())))
    if run_id is not None:
        return index.filter(pc.equal(index.column("run_id"), run_id))
    return index


def counts(index: pa.Table) -> dict:
    """studies, scored, rejected, flagged (scored with a flag), out_of_distribution (scored), last_scored_at."""
    status = index.column("status")
    scored = pc.equal(status, "scored")
    last = pc.max(index.column("scored_at")).as_py() if index.num_rows else None
    return {"studies": index.num_rows, "scored": int(pc.sum(scored).as_py() or 0),
            "rejected": int(pc.sum(pc.equal(status, "rejected")).as_py() or 0),
            "flagged": int(pc.sum(pc.and_(scored, index.column("has_flag"))).as_py() or 0),
            "out_of_distribution": int(pc.sum(pc.and_(scored, pc.fill_null(index.column("ood_flag"), False))).as_py() or 0),
            "last_scored_at": last}


def order(index: pa.Table, sort: str = "max_flagged_probability", descending: bool = True) -> pa.Table:
    """The index sorted for a page: `sort` (a SORTABLE name) then the ties, empty values last."""
    sort = sort if sort in SORTABLE else "max_flagged_probability"
    keys = [(sort, "descending" if descending else "ascending", "at_end")]
    keys += [(k, "ascending" if k == "study_id" else "descending", "at_end") for k in _TIES if k != sort]
    if not index.num_rows:
        return index
    return index.take(pc.sort_indices(index, sort_keys=keys))


def _conform(table: pa.Table) -> pa.Table:
    """A scores file's rows in SCHEMA; columns added since it was written read as null."""
    return pa.Table.from_arrays([_column(table, f.name, f.type) for f in SCHEMA], schema=SCHEMA)


def _take_rows(path: Path, rows: np.ndarray) -> pa.Table:
    """Rows `rows` (positions in the file, any order) of one Parquet file, reading only their row groups."""
    pf = pq.ParquetFile(path)
    sizes = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
    table = pf.read_row_groups(groups.tolist()) if len(groups) else pf.schema_arrow.empty_table()
    # positions within the read groups
    offset = np.concatenate([[0], np.cumsum(sizes[groups])])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    local = offset[np.searchsorted(groups, group_of)] + rows - starts[group_of]
    return _conform(table.take(pa.array(local, pa.int64())))


def listed_rows(page: pa.Table) -> pd.DataFrame:
    """What the run page lists of the index rows `page`, from the index alone (no row read)."""
    return page.select(list(LISTED)).to_pandas()


def page_rows(folder: Path, page: pa.Table) -> pd.DataFrame:
    """The whole rows of the index rows `page`, in its order, with `top_probability`."""
    folder = Path(folder)
    if not page.num_rows:
        df = SCHEMA.empty_table().to_pandas()
        df["top_probability"] = pd.Series(dtype="float32")
        return df
    files = page.column("file").to_numpy(zero_copy_only=False)
    rows = page.column("row").to_numpy()
    names = list(dict.fromkeys(files.tolist()))
    where = [np.flatnonzero(files == name) for name in names]
    # A page of a run still in parts touches many files: read them side by side (Parquet
    # decoding releases the GIL).
    with ThreadPoolExecutor(min(8, len(names))) as pool:
        pieces = list(pool.map(lambda i: _take_rows(folder / names[i], rows[where[i]].astype(np.int64)), range(len(names))))
    table = pa.concat_tables(pieces)
    table = table.take(pa.array(np.argsort(np.concatenate(where), kind="stable")))
    df = table.to_pandas()
    df["top_probability"] = page.column("top_probability").to_numpy(zero_copy_only=False)
    return df
