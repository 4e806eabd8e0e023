"""Great Expectations, run the one way every gate of the workflow runs it.

Each gate is a real GE 1.x expectation suite (built in code from `gx.expectations.*`) run
through a pandas batch definition of one in-process ephemeral context. A run writes
`<out_dir>/<suite>_validation.json` (GE's own result) and GE Data Docs under
`<out_dir>/data_docs/` (entry point `data_docs/index.html`), on success and on failure alike,
and a failed suite raises `DataError` with one short paragraph naming what failed.

The suites themselves live beside the data they check: "metadata" and "splits" in
`tasks/metadata/suites.py`, "score_manifest" and "scores" in `tasks/scoring/gates.py`.
Expectations tagged `meta={"on_failure": "reject"}` are recorded (JSON, Data Docs) but do not
fail the gate: the caller turns those rows into rejected rows itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

import pandas as pd

from cxr.core.atomic import atomic_write_bytes, atomic_write_json
from cxr.core.errors import DataError

# GE phones home (analytics) and draws tqdm bars unless told not to; set before it is imported.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


# "No Finding" next to a pipe means it was joined with some other label.

# A gate runs with BASIC first: counts and the first offending values, what a passing gate's
# result and Data Docs show (rows a gate rejects included). A blocking failure runs it again
# with SUMMARY, which also lists the first offending rows by index, for the error message.
# SUMMARY's extra metrics cost GE more than the checks themselves (the scores suite on 1,000
# rows: 0.33 s against 0.21 s), and nearly every run passes.
_RESULT_FORMAT_FIRST = {"result_format": "BASIC", "partial_unexpected_count": 20}
_RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 20}
_SHOW = 10  # offending values named in an error message before "and N more"

_CTX = None  # the one GE context of this process (created lazily: importing GE takes seconds)
_LOCK = threading.Lock()  # one context and one docs store: serialise runs (Prefect may thread)
_DOCS: dict[str, dict[str, tuple]] = {}  # out_dir -> suite -> (result key, result) for its docs












_SUITES: dict[str, Callable] = {}  # suite name -> builder(gx.expectations) -> [expectations]


def register_suite(name: str, build: Callable) -> None:
    """Declare suite `name`, built from `build(gx.expectations)` the first time it runs.

    Suites live beside the data they check (tasks/metadata/suites.py, tasks/scoring/gates.py);
    this module only runs them.
    """
    _SUITES[name] = build


def _context():
    """The process-wide ephemeral GE context, with a suite and validation definition for every
    registered suite (added on first use: a suite module may be imported after the first run)."""
    global _CTX
    import great_expectations as gx

    if _CTX is None:
        from great_expectations.data_context.types.base import (
            DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig)

        ctx = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False)))
        ctx.data_sources.add_pandas("cxr")
        _share_compiled_templates()
        _CTX = ctx
    ctx = _CTX
    source = ctx.data_sources.get("cxr")
    known = {d.name for d in ctx.validation_definitions.all()}
    for name, build in _SUITES.items():
        if name in known:
            continue
        suite = ctx.suites.add(gx.ExpectationSuite(name=name))
        for expectation in build(gx.expectations):
            suite.add_expectation(expectation)
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    return ctx


def _share_compiled_templates() -> None:
    """Data Docs pages from compiled templates kept between builds and processes.

    GE renders each page through a new Jinja environment (`DefaultJinjaView.__init__`), and a
    new environment compiles every template again: half of a build's time (0.23 -> 0.11 s for
    a run's pages, in every scoring run's finish). Jinja's own bytecode cache (a per-user
    folder under the temp dir, keyed by each template's source checksum, so a GE upgrade
    recompiles) is set on every environment GE makes. A cache that cannot be made or written
    (no usable temp dir, a full disk) costs only the compile time, never a build."""
    from great_expectations.render.view.view import DefaultJinjaView
    from jinja2 import FileSystemBytecodeCache

    class QuietCache(FileSystemBytecodeCache):
        def dump_bytecode(self, bucket) -> None:
            with contextlib.suppress(OSError):
                super().dump_bytecode(bucket)

    if getattr(DefaultJinjaView.__init__, "_cxr_cached", False):
        return
    try:
        cache = QuietCache()
    except (OSError, RuntimeError):  # jinja refuses a temp dir it cannot make or own
        return
    make = DefaultJinjaView.__init__

    def init(self, *args, **kwargs):
        make(self, *args, **kwargs)
        self.env.bytecode_cache = cache

    init._cxr_cached = True
    DefaultJinjaView.__init__ = init


def run_suite(suite: str, frame: pd.DataFrame, out_dir: Path, source: str, params: dict, docs: str = "always") -> dict:
    """Validate `frame` with `suite`; write its result JSON and Data Docs under `out_dir`.

    docs "always" rebuilds Data Docs every run; "changed" only when the suite's outcome (which
    expectations pass, and the failures' counts) differs from the one its pages show, or they
    are missing: a clean run's outcome rarely changes, and a docs build costs seconds.
    "deferred" (a gate that another gate of the same folder follows in this process, as the
    score manifest's is followed by the scores'): a passing result's pages are left to that
    gate's build, which renders every suite of the folder (one build a run, not two); a
    failing one is built now, as it stops the run.
    """
    with _LOCK:
        return _run_locked(suite, frame, out_dir, source, params, docs)


def _run_locked(suite: str, frame: pd.DataFrame, out_dir: Path, source: str, params: dict, docs: str = "always") -> dict:
    ctx = _context()
    definition = ctx.validation_definitions.get(suite)
    for result_format in (_RESULT_FORMAT_FIRST, _RESULT_FORMAT):
        result = definition.run(batch_parameters={"dataframe": frame}, expectation_parameters=params,
                                result_format=result_format)
        payload = result.to_json_dict()
        # GE's own success also counts failures tagged "reject"; the gate does not.
        success = not any(_blocks(r) for r in payload["results"])
        if success:
            break
    out_dir = Path(out_dir).resolve()  # GE site stores insist on absolute paths
    atomic_write_json(out_dir / f"{suite}_validation.json", payload)
    _remember(ctx, out_dir, suite, result)
    if not (docs == "deferred" and success):
        _build_docs(ctx, out_dir, docs == "always")
    summary = {
        "suite": suite,
        "success": success,
        "statistics": payload["statistics"],
        "results": [{"expectation": r["expectation_config"]["type"],
                     "description": r["expectation_config"].get("description"),
                     "kwargs": {k: v for k, v in r["expectation_config"]["kwargs"].items()
                                if k != "batch_id"},
                     "success": r["success"],
                     **{k: r["result"][k] for k in ("observed_value", "unexpected_count")
                        if k in r["result"]}} for r in payload["results"]],
        "validation_json": str(out_dir / f"{suite}_validation.json"),
        "data_docs": str(out_dir / "data_docs" / "index.html"),
    }
    rejected = {r["expectation_config"].get("description"): r["result"].get("unexpected_count", 0)
                for r in payload["results"] if not r["success"] and not _blocks(r)}
    if rejected:
        summary["rejected"] = rejected
    if not summary["success"]:
        # Report in suite order (GE returns results in metric-resolution order).
        order = {e.id: i for i, e in enumerate(definition.suite.expectations)}
        error = DataError(_explain(payload, frame, params, order), where=source)
        error.summary = summary  # callers (CLI, flow) can still record what was checked
        raise error
    return summary


def _outcome(payload: dict) -> list:
    """What a suite's Data Docs page says, less run ids and timings: each expectation's verdict
    and, for a failure, how many rows failed it."""
    return sorted([r["expectation_config"]["type"], r["expectation_config"].get("description") or "",
                   r["success"], None if r["success"] else r["result"].get("unexpected_count")]
                  for r in payload["results"])


def _remember(ctx, out_dir: Path, suite: str, result) -> None:
    """Record `result` as this out_dir's latest of `suite` (what its next Data Docs build shows)."""
    store = ctx.validation_results_store
    mine = _DOCS.setdefault(str(out_dir.resolve()), {})
    mine[suite] = (next(k for k in store.list_keys() if k.run_id == result.meta["run_id"]
                        and k.expectation_suite_identifier.name == suite), result)


def _build_docs(ctx, out_dir: Path, always: bool = True) -> None:
    """Render Data Docs for this out_dir's latest result of each suite into out_dir/data_docs.

    Unless `always`, the build is skipped when the pages already show every one of those
    results' outcomes (recorded in data_docs/.outcomes.json beside them).
    """
    store = ctx.validation_results_store
    mine = _DOCS.setdefault(str(out_dir.resolve()), {})
    record = out_dir / "data_docs" / ".outcomes.json"
    shown = json.loads(record.read_text()) if record.exists() else {}
    if not always and (out_dir / "data_docs" / "index.html").exists() and all(
            shown.get(name) == _outcome(res.to_json_dict()) for name, (_, res) in mine.items()):
        return
    # The store is shared by the process; keep only this out_dir's results so the index
    # lists exactly the validations whose pages are in this folder.
    for key in store.list_keys():
        store.store_backend.remove_key(key.to_tuple())
    for key, res in mine.values():
        store.set(key, res)
    out_dir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".data_docs.", dir=out_dir))
    try:
        site = {"class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(build)}}
        if "cxr" in ctx.list_data_docs_sites():
            ctx.update_data_docs_site("cxr", site)
        else:
            ctx.add_data_docs_site("cxr", site)
        ctx.build_data_docs(site_names=["cxr"])
        target = out_dir / "data_docs"
        written = set()
        for path in sorted(p for p in build.rglob("*") if p.is_file()):
            rel = path.relative_to(build)
            atomic_write_bytes(target / rel, path.read_bytes())
            written.add(rel)
        # Drop pages of earlier runs so the folder is exactly this build.
        for path in [p for p in target.rglob("*") if p.is_file()]:
            if path.relative_to(target) not in written:
                path.unlink()
        # The pages now show every suite's latest result in `mine`; "always" runs record none.
        atomic_write_json(record, {name: _outcome(res.to_json_dict()) for name, (_, res) in mine.items()})
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _explain(payload: dict, frame: pd.DataFrame, params: dict, order: dict) -> str:
    """One paragraph naming each failed expectation with a few offending values and rows."""
    missing = set()
    parts = []
    for r in sorted(payload["results"], key=lambda r: order.get(r["expectation_config"].get("id"), 0)):
        if not _blocks(r):
            continue
        cfg, res = r["expectation_config"], r["result"]
        kind, kw, what = cfg["type"], cfg["kwargs"], cfg.get("description") or cfg["type"]
        if kind == "expect_table_columns_to_match_set":
            missing = set(res.get("details", {}).get("mismatched", {}).get("missing", []))
            parts.append(f"{what}: {', '.join(sorted(missing))}")
        elif kind == "expect_table_row_count_to_be_between":
            parts.append(f"{what} (0 rows)")
        elif _raised(r):
            columns = {kw.get("column"), kw.get("column_A"), kw.get("column_B")} - {None}
            if frame.empty or columns & missing or not columns <= set(frame.columns):
                continue  # already reported as a missing column / empty table
            parts.append(f"could not check {what}: {r['exception_info'].get('exception_message')}")
        elif kind == "expect_column_distinct_values_to_contain_set":
            absent = res.get("partial_missing_list") or [
                s for s in kw["value_set"] if s not in set(frame.get("split", []))]
            parts.append(f"{what}: {', '.join(absent)} has no images")
        elif kind == "expect_column_mean_to_be_between":
            split = kw["column"].removeprefix("in_")
            lo, hi = params[f"{split}_min"], params[f"{split}_max"]
            parts.append(f"{what}: {res.get('observed_value', float('nan')):.3f} not within "
                         f"{lo:.3f}–{hi:.3f}")
        elif kw.get("column") == "splits_of_patient":
            n = res.get("unexpected_count", 0)
            shown = [f"{frame.at[i, 'patient_id']} ({v})" for i, v in
                     zip(res.get("partial_unexpected_index_list", []), res.get("partial_unexpected_list", []))]
            parts.append(f"{what}: {n} patients in more than one split: " + _listing(shown, n))
        else:
            parts.append(f"{what}: " + _unexpected(res, frame, kw.get("column")))
    return "; ".join(parts) + "." if parts else "validation failed."


def _blocks(r: dict) -> bool:
    """A failed expectation that fails the gate (not one whose rows the caller rejects)."""
    return not r["success"] and (r["expectation_config"].get("meta") or {}).get("on_failure") != "reject"


def _raised(r: dict) -> bool:
    # exception_info is either one {raised_exception: ...} or a dict of them keyed by metric.
    info = r.get("exception_info") or {}
    if "raised_exception" in info:
        return bool(info["raised_exception"])
    return any(isinstance(v, dict) and v.get("raised_exception") for v in info.values())


def _unexpected(res: dict, frame: pd.DataFrame, column: str | None) -> str:
    """'value (where, where), ...' for the first offending values, then 'and N more rows'."""
    by_value: dict[str, list[str]] = {}
    ident = next((c for c in ("image_id", "study_id") if c in frame), None)
    rows = ident is None or column == ident  # name rows by their id when we can
    for i, v in zip(res.get("partial_unexpected_index_list", []), res.get("partial_unexpected_list", [])):
        if isinstance(v, (list, tuple)):
            v = " vs ".join(map(str, v))
        by_value.setdefault(str(v), []).append(str(i) if rows else str(frame.at[i, ident]))
    shown = [f"{v} ({('rows ' if len(w) > 1 else 'row ') if rows else ''}{', '.join(w)})"
             for v, w in by_value.items()]
    n = res.get("unexpected_count", len(shown))
    text = _listing(shown, len(shown))
    shown_rows = sum(len(w) for w in by_value.values())
    return text + (f" ({n} rows in all)" if n > shown_rows else "")


def _listing(items: list[str], total: int) -> str:
    head = ", ".join(items[:_SHOW])
    rest = total - min(len(items), _SHOW)
    return head + (f", and {rest} more" if rest > 0 else "")


# --------------------------------------------------------------------------- the quick look


class _QuickExpectations:
    """Stands in for `gx.expectations` when a suite's builder runs for the quick look: each
    `Expect...(**kwargs)` records its kind and arguments, so the one suite definition serves
    both the quick look and the Great Expectations gate."""

    def __getattr__(self, kind: str):
        if not kind.startswith("Expect"):
            raise AttributeError(kind)
        return lambda **kwargs: (kind, kwargs)


def _quick_failure(kind: str, kw: dict, frame: pd.DataFrame, params: dict) -> str | None:
    """What fails of one recorded expectation on `frame`, or None (also None for a kind the
    quick look does not judge: Great Expectations still does)."""
    def value(v):
        return params[v["$PARAMETER"]] if isinstance(v, dict) and "$PARAMETER" in v else v

    ident = next((c for c in ("image_id", "study_id") if c in frame), None)
    column = kw.get("column")
    if kind == "ExpectTableColumnsToMatchSet":
        missing = sorted(set(kw["column_set"]) - set(frame.columns))
        return ", ".join(missing) if missing else None
    if kind == "ExpectTableRowCountToBeBetween":
        return "0 rows" if len(frame) < (kw.get("min_value") or 0) else None
    if kw.get("row_condition") is not None or kw.get("meta"):
        return None  # conditional or non-blocking expectations are left to the gate
    names = [c for c in (column, kw.get("column_A"), kw.get("column_B")) if c]
    if any(c not in frame for c in names):
        return None  # reported as a missing column
    s = frame[column] if column else None
    if kind == "ExpectColumnValuesToNotBeNull":
        bad = s.isna()
    elif kind == "ExpectColumnValuesToBeUnique":
        bad = s.duplicated(keep=False) & s.notna()
    elif kind in ("ExpectColumnValuesToMatchRegex", "ExpectColumnValuesToNotMatchRegex"):
        hit = s.astype(str).str.contains(kw["regex"], regex=True) & s.notna()
        bad = (~hit & s.notna()) if kind == "ExpectColumnValuesToMatchRegex" else hit
    elif kind == "ExpectColumnValuesToBeBetween":
        x = pd.to_numeric(s, errors="coerce")
        lo, hi = value(kw.get("min_value")), value(kw.get("max_value"))
        bad = s.notna() & (x.isna() | (x < lo if lo is not None else False) | (x > hi if hi is not None else False))
    elif kind == "ExpectColumnValuesToBeInSet":
        bad = s.notna() & ~s.isin(kw["value_set"])
    elif kind == "ExpectColumnPairValuesToBeEqual":
        a, b = frame[kw["column_A"]], frame[kw["column_B"]]
        bad = a.notna() & b.notna() & (a.astype(str) != b.astype(str))
        s = a.astype(str) + " vs " + b.astype(str)
    elif kind == "ExpectColumnDistinctValuesToContainSet":
        absent = [v for v in kw["value_set"] if v not in set(s.dropna())]
        return f"{', '.join(map(str, absent))} has no images" if absent else None
    elif kind == "ExpectColumnMeanToBeBetween":
        mean = float(pd.to_numeric(s, errors="coerce").mean())
        lo, hi = value(kw.get("min_value")), value(kw.get("max_value"))
        return None if lo <= mean <= hi else f"{mean:.3f} not within {lo:.3f}–{hi:.3f}"
    else:
        return None
    if not bad.any():
        return None
    where = frame.loc[bad, ident] if ident and column != ident else pd.Series(frame.index[bad], index=frame.index[bad])
    shown = [f"{v} ({w})" for v, w in zip(s[bad].head(_SHOW), where.head(_SHOW))]
    return _listing(shown, int(bad.sum()))


def quick_check(build: Callable, frame: pd.DataFrame, source: str, params: dict | None = None) -> None:
    """A look at `frame` with the suite that `build` defines, in pandas, in well under a second
    and without importing Great Expectations (seconds): DataError naming what fails, in the
    gate's words. The gate itself (`run_suite`) still runs, writes its results and Data Docs,
    and has the last word; this only lets a command refuse plainly bad input at once."""
    parts = []
    for kind, kw in build(_QuickExpectations()):
        failure = _quick_failure(kind, kw, frame, params or {})
        if failure:
            what = kw.get("description") or kind
            # The gate's own wording: "table is empty (0 rows)".
            parts.append(f"{what} ({failure})" if kind == "ExpectTableRowCountToBeBetween" else f"{what}: {failure}")
    if parts:
        raise DataError("; ".join(parts) + ".", where=source)
