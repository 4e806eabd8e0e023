"""The HTML report of one scoring run, for people; Parquet and per-study JSON are for machines.

An index page per run (`out/reports/<run id>.html`, copied to `out/report.html`): a summary and
counts, the model and data versions, the top flagged studies with thumbnails, the first
rejected files with reasons, links to the pages, and the statement that this is not a
diagnostic device. Pages (`out/reports/<run id>/studies-0001.html`, ..., `rejected-0001.html`,
...) hold every scored study (highest flagged probability first) and every rejected file, 500
to a page, with previous/next links. Built from the run index a page at a time, so a run of
any size is reported in flat memory.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cxr.core.atomic import atomic_write_text
from cxr.core.labels import LABEL_COLUMNS, PATHOLOGIES
from tasks.scoring.run_index import counts as index_counts, load_index, order, page_rows, select

NOT_A_DEVICE = ("This report is not a diagnostic device. The scores come from a research model (AG-CNN, Guan et al. 2018) "
                "and must not be used to diagnose, treat or triage patients; every finding needs review by a qualified clinician.")

_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}th{background:#eee}.flag{color:#b00;font-weight:bold}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:.6em 1em;margin:1em 0}img{display:block}"""


PAGE_ROWS = 500  # studies per page of the report
TOP_FLAGGED = 50  # flagged studies on the run's index page
INDEX_REJECTED = 100  # rejected files listed on the index page (all of them on the rejected pages)


def _run_index(out_dir: Path, summary: dict) -> pa.Table:
    """The run index rows of this run's input studies (new and previously scored)."""
    return select(load_index(out_dir), keys=summary.get("studies", []))


def run_rows(out_dir: Path, summary: dict, limit: int | None = None) -> pd.DataFrame:
    """This run's input studies (new and previously scored), highest flagged probability first;
    the first `limit` only (read from the Parquet files: that many rows, not the whole table)."""
    ordered = order(_run_index(out_dir, summary))
    df = page_rows(out_dir, ordered if limit is None else ordered.slice(0, limit))
    return df.drop(columns="top_probability").reset_index(drop=True)


def _e(value) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else html.escape(str(value))


def _head(title: str) -> list[str]:
    return [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>",
            f"<style>{_CSS}</style></head><body>"]


def _studies_table(scored: pd.DataFrame, base: str) -> list[str]:
    """Scored studies as table rows with their thumbnails; `base` prefixes links to the study files."""
    out = ["<table><tr><th>study</th><th>picture</th><th>flagged</th><th>top probabilities</th>"
           "<th>attention box (y0, x0, y1, x1)</th><th>scored at</th></tr>"]
    for row in scored.itertuples(index=False):
        probs = sorted(((getattr(row, c), p) for p, c in zip(PATHOLOGIES, LABEL_COLUMNS)), reverse=True)[:3]
        flags = _e(row.flagged) or "none"
        if pd.notna(row.ood_flag) and bool(row.ood_flag):  # score.ood "flag": scored, but unlike the training data
            flags += f"<br><em title='{_e(row.reason)}'>out of distribution (score {row.ood_score:.1f})</em>"
        box = ", ".join(str(int(getattr(row, c))) for c in ("box_y0", "box_x0", "box_y1", "box_x1"))
        out.append(
            f"<tr><td><a href='{base}{_e(row.json)}'>{_e(row.study_id)}</a></td>"
            f"<td><a href='{base}{_e(row.overlay)}'><img src='{base}{_e(row.thumbnail)}' alt='thumbnail' loading='lazy'></a></td>"
            f"<td class='{'flag' if row.flagged else ''}'>{flags}</td>"
            f"<td>{'<br>'.join(f'{_e(p)} {v:.3f}' for v, p in probs)}</td><td>{box}</td><td>{_e(row.scored_at)}</td></tr>")
    out.append("</table>")
    return out


def _rejected_table(rejected: pd.DataFrame) -> list[str]:
    return (["<table><tr><th>file</th><th>reason</th></tr>"]
            + [f"<tr><td>{_e(r.study_id)}</td><td>{_e(r.reason)}</td></tr>" for r in rejected.itertuples(index=False)]
            + ["</table>"])


def _pages(n: int) -> int:
    return (n + PAGE_ROWS - 1) // PAGE_ROWS


def _page_name(kind: str, i: int) -> str:
    return f"{kind}-{i + 1:04d}.html"


def render_html(summary: dict, rows: pd.DataFrame | None = None, base: str = "", *, counts: dict | None = None,
                top: pd.DataFrame | None = None, rejected: pd.DataFrame | None = None) -> str:
    """The run's index page: summary, counts, the top flagged studies, the first rejected files
    and links to the pages of every study. `base` prefixes links to the study files ("../" for
    the copy under reports/); from `rows` (all of them, small runs) or the counts and parts given."""
    run_id = summary["run_id"]
    if rows is not None:
        scored_rows = rows[rows["status"] == "scored"]
        counts = {"scored": len(scored_rows), "rejected": int((rows["status"] == "rejected").sum()),
                  "flagged": int((scored_rows["flagged"].fillna("") != "").sum()),
                  "out_of_distribution": int(scored_rows["ood_flag"].fillna(False).astype(bool).sum())}
        top = scored_rows[scored_rows["flagged"].fillna("") != ""].head(TOP_FLAGGED)
        rejected = rows[rows["status"] == "rejected"].head(INDEX_REJECTED)
    ood = summary.get("ood") or {}
    pages = f"{base}reports/{run_id}/"
    out = _head(f"cxr scoring run {run_id}") + [
           f"<h1>Chest X-ray scoring run {_e(run_id)}</h1>",
           f"<p class='warn'><strong>{_e(NOT_A_DEVICE)}</strong></p>", "<h2>Summary</h2>",
           f"<p><strong>{_e(summary['message'])}.</strong></p><ul>",
           f"<li>input folder: <code>{_e(summary['input_dir'])}</code> ({summary['files_found']} files"
           + (f", {summary['duplicates_in_input']} duplicate contents" if summary.get("duplicates_in_input") else "") + ")</li>",
           f"<li>this run: {summary['scored']} scored, {summary['rejected']} rejected; "
           f"{summary['already_scored']} already scored by this model (not rescored)</li>",
           f"<li>studies in this report: {counts['scored']} scored, {counts['flagged']} with at least one flag, "
           f"{counts['rejected']} rejected</li>",
           f"<li>model digest: <code>{_e(summary['model_digest'])}</code></li>",
           f"<li>model: AG-CNN, backbone {_e(summary.get('backbone'))}; training data version (registry: metadata, "
           f"split and class weights) <code>{_e(summary.get('training_data_version'))}</code></li>",
           f"<li>thresholds' data version (sha256 of splits.parquet): <code>{_e(summary['data_version'])}</code></li>",
           f"<li>operating thresholds: {_e(summary['threshold_rule'])}, chosen on the validation split</li>",
           f"<li>out-of-distribution check (score.ood {_e(ood.get('mode'))}): "
           + (f"{_e(ood['gate'])}, threshold {ood['threshold']:.2f}" if ood.get("gate") else "no feature gate for these weights")
           + f"; {counts['out_of_distribution']} scored studies marked out of distribution</li></ul>"]
    n_pages = _pages(counts["scored"])
    if n_pages:
        out.append("<p class='pages'>Every scored study, highest flagged probability first, "
                   f"{PAGE_ROWS} to a page: " + " ".join(
                       f"<a href='{pages}{_page_name('studies', i)}'>{i + 1}</a>" for i in range(n_pages)) + "</p>")
    out.append(f"<h2>Top flagged studies (the {TOP_FLAGGED} highest flagged probabilities)</h2>")
    if top is None or top.empty:
        out.append("<p>No scored study is flagged.</p>" if counts["scored"] else "<p>No scored studies.</p>")
    else:
        out += _studies_table(top, base)
    out.append("<h2>Rejected files</h2>")
    if not counts["rejected"]:
        out.append("<p>None.</p>")
    else:
        out += _rejected_table(rejected)
        if counts["rejected"] > len(rejected):
            out.append(f"<p>The first {len(rejected)} of {counts['rejected']}; all of them: " + " ".join(
                f"<a href='{pages}{_page_name('rejected', i)}'>{i + 1}</a>" for i in range(_pages(counts["rejected"]))) + "</p>")
    out.append(f"<p class='warn'>{_e(NOT_A_DEVICE)}</p></body></html>")
    return "\n".join(out) + "\n"


def _page_html(summary: dict, kind: str, i: int, n_pages: int, rows: pd.DataFrame) -> str:
    """Page i of the run's scored studies or rejected files, under reports/<run id>/."""
    run_id = summary["run_id"]
    nav = [f"<a href='../{_e(run_id)}.html'>run {_e(run_id)}</a>"]
    if i > 0:
        nav.append(f"<a rel='prev' href='{_page_name(kind, i - 1)}'>&larr; page {i}</a>")
    nav.append(f"page {i + 1} of {n_pages}")
    if i + 1 < n_pages:
        nav.append(f"<a rel='next' href='{_page_name(kind, i + 1)}'>page {i + 2} &rarr;</a>")
    what = "scored studies, highest flagged probability first" if kind == "studies" else "rejected files"
    body = _studies_table(rows, "../../") if kind == "studies" else _rejected_table(rows)
    return "\n".join(_head(f"cxr scoring run {run_id}: {what}, page {i + 1}") + [
        f"<h1>Run {_e(run_id)}: {what}</h1>", f"<p class='warn'><strong>{_e(NOT_A_DEVICE)}</strong></p>",
        f"<p class='nav'>{' | '.join(nav)}</p>", *body, f"<p class='nav'>{' | '.join(nav)}</p>",
        "</body></html>"]) + "\n"


def write_report(out_dir: Path, summary: dict) -> Path:
    """Write the run's index page `out/reports/<run id>.html` (the same page as `out/report.html`)
    and its pages `out/reports/<run id>/studies-NNNN.html` and `rejected-NNNN.html`; return
    out/report.html. Rows are read a page at a time through the run index."""
    out_dir = Path(out_dir)
    run_id = summary["run_id"]
    index = _run_index(out_dir, summary)
    found = index_counts(index)
    ordered = order(index)
    status = ordered.column("status")
    scored = ordered.filter(pc.equal(status, "scored"))
    rejected = ordered.filter(pc.equal(status, "rejected"))
    flagged = scored.filter(scored.column("has_flag"))
    top = page_rows(out_dir, flagged.slice(0, TOP_FLAGGED))
    first_rejected = page_rows(out_dir, rejected.slice(0, INDEX_REJECTED))
    folder = out_dir / "reports" / run_id
    for kind, table in (("studies", scored), ("rejected", rejected)):
        n_pages = _pages(table.num_rows)
        for i in range(n_pages):
            rows = page_rows(out_dir, table.slice(i * PAGE_ROWS, PAGE_ROWS))
            atomic_write_text(folder / _page_name(kind, i), _page_html(summary, kind, i, n_pages, rows))
    parts = {"counts": found, "top": top, "rejected": first_rejected}
    atomic_write_text(out_dir / "reports" / f"{run_id}.html", render_html(summary, base="../", **parts))
    atomic_write_text(out_dir / "report.html", render_html(summary, **parts))
    return out_dir / "report.html"
