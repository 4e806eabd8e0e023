"""Great Expectations gates: normalized metadata, the train/valid/test split, and scoring's
input manifest and scores table.

All gates are real GE 1.x expectation suites (built in code from `gx.expectations.*`) run
through a pandas batch definition of one in-process ephemeral context. Each run writes
`<out_dir>/<suite>_validation.json` (GE's own result) and GE Data Docs under
`<out_dir>/data_docs/` (entry point `data_docs/index.html`), on success and on failure alike,
and a failed suite raises `DataError` with one short paragraph naming what failed.

Suite "metadata" (one row per image) checks:
  required columns present; at least one row; required columns not null; image_id unique and
  shaped `NNNNNNNN_NNN.png`; patient_id equal to the first 8 digits of image_id; age in
  0–120; sex in {M, F}; view in {PA, AP}; finding_labels made only of the 15-label vocabulary;
  "No Finding" never combined with a pathology; the 14 label columns and no_finding are 0/1;
  no_finding is 1 exactly when no pathology column is set.

Suite "splits" (columns image_id, patient_id, split) checks:
  split in {train, valid, test}; image_id unique; no patient in more than one split; every
  split has at least one image; each split's image fraction within `tolerance` of its ratio.

Suite "score_manifest" (one row per file found under a scoring input folder) checks:
  stops the run: required columns present; at least one row; study_id present and unique;
  output names unique (two studies must never write the same JSON/overlay files).
  becomes rejected rows (tagged meta on_failure=reject, the run goes on): the file resolves
  inside the input folder; it is present; its size is > 0 and <= `score.max_bytes`.
  One odd file must not hold back a nightly run; a listing that cannot be keyed safely must.

Suite "scores" (the folded scores table about to be published) checks:
  required columns present; status scored/rejected; one row per (study sha256, model
  digest); for scored rows every probability present (no NaN) and within [0, 1]. Any failure
  stops publication.

Expectations tagged `meta={"on_failure": "reject"}` are recorded (JSON, Data Docs) but do not
fail the gate: the caller turns those rows into rejected rows itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pandas as pd

from cxr.atomic import atomic_write_bytes, atomic_write_json
from cxr.errors import DataError
from cxr.labels import LABEL_COLUMNS, NO_FINDING, NO_FINDING_COLUMN, VOCABULARY

# GE phones home (analytics) and draws tqdm bars unless told not to; set before it is imported.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

METADATA_COLUMNS: tuple[str, ...] = (
    "image_id", "finding_labels", "follow_up", "patient_id", "age", "sex", "view",
    "width", "height", "pixel_spacing_x", "pixel_spacing_y",
) + LABEL_COLUMNS + (NO_FINDING_COLUMN,)
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "split")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
MANIFEST_COLUMNS: tuple[str, ...] = ("study_id", "path", "size_bytes", "output_name", "inside")
SCORES_COLUMNS: tuple[str, ...] = ("study_id", "model_digest", "status", "key") + LABEL_COLUMNS
_REJECT = {"on_failure": "reject"}  # recorded, not blocking: the caller rejects those rows

IMAGE_ID_REGEX = r"^\d{8}_\d{3}\.png$"
_LABEL = "(?:" + "|".join(re.escape(label) for label in VOCABULARY) + ")"
LABELS_REGEX = rf"^{_LABEL}(?:\|{_LABEL})*$"
# "No Finding" next to a pipe means it was joined with some other label.
NO_FINDING_COMBINED_REGEX = rf"(?:^|\|){re.escape(NO_FINDING)}\||\|{re.escape(NO_FINDING)}(?:$|\|)"

# SUMMARY keeps results small on 112k rows yet still lists the first offending rows by index.
_RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 20}
_SHOW = 10  # offending values named in an error message before "and N more"

_CTX = None  # the one GE context of this process (created lazily: importing GE takes seconds)
_LOCK = threading.Lock()  # one context and one docs store: serialise runs (Prefect may thread)
_DOCS: dict[str, dict[str, tuple]] = {}  # out_dir -> suite -> (result key, result) for its docs


def _metadata_expectations(gxe) -> list:
    e = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(METADATA_COLUMNS), exact_match=False,
                                         description="missing required columns"),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="table is empty"),
    ]
    e += [gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} missing")
          for c in METADATA_COLUMNS]
    e += [
        gxe.ExpectColumnValuesToBeUnique(column="image_id", description="image_id not unique"),
        gxe.ExpectColumnValuesToMatchRegex(column="image_id", regex=IMAGE_ID_REGEX,
                                           description="image_id not of the form NNNNNNNN_NNN.png"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="patient_id", column_B="id_patient",
                                            description="patient_id contradicts the image name"),
        gxe.ExpectColumnValuesToBeBetween(column="age", min_value=0, max_value=120,
                                          description="age outside 0–120"),
        gxe.ExpectColumnValuesToBeInSet(column="sex", value_set=["M", "F"],
                                        description="sex not M/F"),
        gxe.ExpectColumnValuesToBeInSet(column="view", value_set=["PA", "AP"],
                                        description="view not PA/AP"),
        gxe.ExpectColumnValuesToMatchRegex(column="finding_labels", regex=LABELS_REGEX,
                                           description="finding_labels outside the 15-label vocabulary"),
        gxe.ExpectColumnValuesToNotMatchRegex(column="finding_labels", regex=NO_FINDING_COMBINED_REGEX,
                                              description="No Finding combined with a pathology"),
    ]
    e += [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[0, 1], description=f"{c} not 0/1")
          for c in LABEL_COLUMNS + (NO_FINDING_COLUMN,)]
    e.append(gxe.ExpectColumnPairValuesToBeEqual(
        column_A=NO_FINDING_COLUMN, column_B="no_pathology",
        description="no_finding contradicts the pathology columns (no_finding vs none set)"))
    return e


def _split_expectations(gxe) -> list:
    e = [gxe.ExpectTableColumnsToMatchSet(column_set=list(SPLIT_COLUMNS), exact_match=False,
                                          description="missing required columns"),
         gxe.ExpectTableRowCountToBeBetween(min_value=1, description="table is empty")]
    e += [gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} missing")
          for c in SPLIT_COLUMNS]
    e += [
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS),
                                        description="split not train/valid/test"),
        gxe.ExpectColumnValuesToBeUnique(column="image_id", description="image_id not unique"),
        # One non-null value per patient: the splits it appears in; anything else is leakage.
        gxe.ExpectColumnValuesToBeInSet(column="splits_of_patient", value_set=list(SPLITS),
                                        description="patient leakage"),
        gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=list(SPLITS),
                                                   description="empty split"),
    ]
    # The mean of a 0/1 membership column is that split's fraction of the images; the bounds
    # are suite parameters so one suite serves any ratios/tolerance.
    e += [gxe.ExpectColumnMeanToBeBetween(column=f"in_{s}", min_value={"$PARAMETER": f"{s}_min"},
                                          max_value={"$PARAMETER": f"{s}_max"},
                                          description=f"{s} fraction out of tolerance")
          for s in SPLITS]
    return e


def _manifest_expectations(gxe) -> list:
    from great_expectations.expectations.row_conditions import Column

    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(MANIFEST_COLUMNS), exact_match=False,
                                         description="missing required columns"),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="no files to score"),
        gxe.ExpectColumnValuesToNotBeNull(column="study_id", description="study_id missing"),
        gxe.ExpectColumnValuesToBeUnique(column="study_id", description="study_id not unique"),
        gxe.ExpectColumnValuesToBeUnique(column="output_name",
                                         description="two studies would write the same output files"),
        gxe.ExpectColumnValuesToBeInSet(column="inside", value_set=[True], meta=_REJECT,
                                        description="resolves outside the input folder"),
        gxe.ExpectColumnValuesToNotBeNull(column="size_bytes", row_condition=Column("inside") == True,  # noqa: E712
                                          meta=_REJECT, description="file not present"),
        gxe.ExpectColumnValuesToBeBetween(column="size_bytes", min_value=1, max_value={"$PARAMETER": "max_bytes"},
                                          meta=_REJECT, description="file size not within 1 byte and score.max_bytes"),
    ]


def _scores_expectations(gxe) -> list:
    from great_expectations.expectations.row_conditions import Column

    e = [gxe.ExpectTableColumnsToMatchSet(column_set=list(SCORES_COLUMNS), exact_match=False,
                                          description="missing required columns"),
         gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["scored", "rejected"],
                                         description="status not scored/rejected"),
         gxe.ExpectColumnValuesToBeUnique(column="key",
                                          description="more than one row per (study sha256, model digest)")]
    for c in LABEL_COLUMNS:
        e += [gxe.ExpectColumnValuesToNotBeNull(column=c, row_condition=Column("status") == "scored",
                                                description=f"probability {c} is NaN for a scored study"),
              gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1,
                                                description=f"probability {c} outside [0, 1]")]
    return e


_SUITES = (("metadata", _metadata_expectations), ("splits", _split_expectations),
           ("score_manifest", _manifest_expectations), ("scores", _scores_expectations))


def _context():
    """The process-wide ephemeral GE context with every suite and its validation definition."""
    global _CTX
    if _CTX is None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig)

        ctx = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False)))
        source = ctx.data_sources.add_pandas("cxr")
        for name, build in _SUITES:
            suite = ctx.suites.add(gx.ExpectationSuite(name=name))
            for expectation in build(gx.expectations):
                suite.add_expectation(expectation)
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
            ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        _CTX = ctx
    return _CTX


def validate_metadata(df: pd.DataFrame, out_dir: Path, *, source: str = "metadata") -> dict:
    """Run suite "metadata" on the normalized metadata frame; raise DataError if it fails."""
    frame = df.reset_index(drop=True).copy()
    if "image_id" in frame:
        # Derived column for the pair check: the patient number written in the file name.
        frame["id_patient"] = pd.to_numeric(frame["image_id"].astype(str).str[:8], errors="coerce")
    if all(c in frame for c in LABEL_COLUMNS):
        set_any = frame[list(LABEL_COLUMNS)].apply(pd.to_numeric, errors="coerce").fillna(0).sum(axis=1)
        frame["no_pathology"] = (set_any == 0).astype("int8")
    return _run("metadata", frame, out_dir, source, {})


def validate_split(splits: pd.DataFrame, ratios: dict[str, float], tolerance: float,
                   out_dir: Path, *, source: str = "splits") -> dict:
    """Run suite "splits" on (image_id, patient_id, split); raise DataError if it fails."""
    if set(ratios) != set(SPLITS):
        raise ValueError(f"ratios must have exactly the keys {SPLITS}, got {sorted(ratios)}")
    frame = splits.reset_index(drop=True).copy()
    if "split" in frame:
        for s in SPLITS:
            frame[f"in_{s}"] = (frame["split"] == s).astype("int8")
    if "patient_id" in frame and "split" in frame:
        frame["splits_of_patient"] = _splits_of_patient(frame)
    params = {}
    for s in SPLITS:
        params[f"{s}_min"] = float(ratios[s]) - tolerance
        params[f"{s}_max"] = float(ratios[s]) + tolerance
    return _run("splits", frame, out_dir, source, params)


def validate_score_manifest(manifest: pd.DataFrame, max_bytes: int, out_dir: Path, *,
                            source: str = "input folder", docs: str = "always") -> dict:
    """Run suite "score_manifest" on (study_id, path, size_bytes, output_name, inside).

    Raises DataError only for failures that make the listing unusable as a whole; files
    outside the folder, missing, empty or too large are counted in the result (key
    `rejected`) and left to the caller to reject.
    """
    frame = manifest.reset_index(drop=True).copy()
    return _run("score_manifest", frame, out_dir, source, {"max_bytes": int(max_bytes)}, docs)


def validate_scores(scores: pd.DataFrame, out_dir: Path, *, source: str = "scores", docs: str = "always") -> dict:
    """Run suite "scores" on the table about to be published (with its row `key`); DataError if it fails.

    Only the columns the suite reads are handed to GE: its cost grows with rows, not with
    the width of the scores table.
    """
    frame = scores.reset_index(drop=True)
    frame = frame[[c for c in SCORES_COLUMNS if c in frame.columns]].copy()
    return _run("scores", frame, out_dir, source, {}, docs)


def _splits_of_patient(frame: pd.DataFrame) -> pd.Series:
    """On each patient's first row the splits it appears in ("train, test"); None elsewhere."""
    known = {s: i for i, s in enumerate(SPLITS)}
    pairs = frame[["patient_id", "split"]].dropna().astype({"split": str})
    present = pd.crosstab(pairs["patient_id"], pairs["split"]) > 0
    names = sorted(present.columns, key=lambda s: (known.get(s, len(known)), s))
    # Vectorised: encode each patient's set of splits as a bitmask, spell each mask once.
    masks = present[names].to_numpy().astype("int64") @ (1 << pd.RangeIndex(len(names)).to_numpy())
    spelled = {m: ", ".join(n for b, n in enumerate(names) if m >> b & 1) for m in set(masks.tolist())}
    joined = pd.Series([spelled[m] for m in masks.tolist()], index=present.index)
    first = ~frame["patient_id"].duplicated() & frame["patient_id"].notna()
    out = pd.Series(None, index=frame.index, dtype=object)
    out[first] = frame.loc[first, "patient_id"].map(joined).to_numpy()
    return out


def _run(suite: str, frame: pd.DataFrame, out_dir: Path, source: str, params: dict, docs: str = "always") -> dict:
    """Validate `frame` with `suite`; write its result JSON and Data Docs under `out_dir`.

    docs "always" rebuilds Data Docs every run; "changed" only when the suite's outcome (which
    expectations pass, and the failures' counts) differs from the one its pages show, or they
    are missing: a clean run's outcome rarely changes, and a docs build costs seconds.
    """
    with _LOCK:
        return _run_locked(suite, frame, out_dir, source, params, docs)


def _run_locked(suite: str, frame: pd.DataFrame, out_dir: Path, source: str, params: dict, docs: str = "always") -> dict:
    ctx = _context()
    definition = ctx.validation_definitions.get(suite)
    result = definition.run(batch_parameters={"dataframe": frame}, expectation_parameters=params,
                            result_format=_RESULT_FORMAT)
    out_dir = Path(out_dir).resolve()  # GE site stores insist on absolute paths
    payload = result.to_json_dict()
    atomic_write_json(out_dir / f"{suite}_validation.json", payload)
    _build_docs(ctx, out_dir, suite, result, _outcome(payload) if docs == "changed" else None)
    summary = {
        "suite": suite,
        # GE's own success also counts failures tagged "reject"; the gate does not.
        "success": not any(_blocks(r) for r in payload["results"]),
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


def _build_docs(ctx, out_dir: Path, suite: str, result, outcome: list | None = None) -> None:
    """Render Data Docs for this out_dir's latest result of each suite into out_dir/data_docs.

    With an `outcome`, the build is skipped when the pages already show that outcome for
    this suite (recorded in data_docs/.outcomes.json beside them).
    """
    store = ctx.validation_results_store
    mine = _DOCS.setdefault(str(out_dir.resolve()), {})
    mine[suite] = (next(k for k in store.list_keys() if k.run_id == result.meta["run_id"]
                        and k.expectation_suite_identifier.name == suite), result)
    record = out_dir / "data_docs" / ".outcomes.json"
    shown = json.loads(record.read_text()) if record.exists() else {}
    if outcome is not None and shown.get(suite) == outcome and (out_dir / "data_docs" / "index.html").exists():
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
