"""The HTML report of one scoring run, for people; Parquet and per-study JSON are for machines.

One self-describing page per run (`out/reports/<run id>.html`, copied to `out/report.html`):
a summary, the studies sorted by their highest flagged probability with thumbnails, the
rejected files with reasons, the model and data versions, and the statement that this is
not a diagnostic device.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from cxr.core.atomic import atomic_write_text
from cxr.core.labels import LABEL_COLUMNS, PATHOLOGIES
from tasks.scoring.studies import row_keys as _row_keys
from tasks.scoring.rows import read_scores

NOT_A_DEVICE = ("This report is not a diagnostic device. The scores come from a research model (AG-CNN, Guan et al. 2018) "
                "and must not be used to diagnose, treat or triage patients; every finding needs review by a qualified clinician.")

_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}th{background:#eee}.flag{color:#b00;font-weight:bold}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:.6em 1em;margin:1em 0}img{display:block}"""


def run_rows(out_dir: Path, summary: dict) -> pd.DataFrame:
    """This run's input studies (new and previously scored), highest flagged probability first."""
    df = read_scores(out_dir)
    df = df.loc[~_row_keys(df).duplicated()]
    df = df.loc[_row_keys(df).isin(set(summary.get("studies", [])))].copy()
    df["_top"] = df[list(LABEL_COLUMNS)].max(axis=1)
    return df.sort_values(["max_flagged_probability", "_top", "study_id"], ascending=[False, False, True],
                          na_position="last").drop(columns="_top").reset_index(drop=True)


def _e(value) -> str:
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else html.escape(str(value))


def render_html(summary: dict, rows: pd.DataFrame, base: str = "") -> str:
    """The page; `base` prefixes links to the study files ("../" for a page under reports/)."""
    scored = rows[rows["status"] == "scored"]
    rejected = rows[rows["status"] == "rejected"]
    flagged = scored[scored["flagged"].fillna("") != ""]
    unusual = scored[scored["ood_flag"].fillna(False).astype(bool)]
    ood = summary.get("ood") or {}
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>cxr scoring run {_e(summary['run_id'])}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>Chest X-ray scoring run {_e(summary['run_id'])}</h1>",
           f"<p class='warn'><strong>{_e(NOT_A_DEVICE)}</strong></p>", "<h2>Summary</h2>",
           f"<p><strong>{_e(summary['message'])}.</strong></p><ul>",
           f"<li>input folder: <code>{_e(summary['input_dir'])}</code> ({summary['files_found']} files"
           + (f", {summary['duplicates_in_input']} duplicate contents" if summary.get("duplicates_in_input") else "") + ")</li>",
           f"<li>this run: {summary['scored']} scored, {summary['rejected']} rejected; "
           f"{summary['already_scored']} already scored by this model (not rescored)</li>",
           f"<li>studies in this report: {len(scored)} scored, {len(flagged)} with at least one flag, {len(rejected)} rejected</li>",
           f"<li>model digest: <code>{_e(summary['model_digest'])}</code></li>",
           f"<li>model: AG-CNN, backbone {_e(summary.get('backbone'))}; training data version (registry: metadata, "
           f"split and class weights) <code>{_e(summary.get('training_data_version'))}</code></li>",
           f"<li>thresholds' data version (sha256 of splits.parquet): <code>{_e(summary['data_version'])}</code></li>",
           f"<li>operating thresholds: {_e(summary['threshold_rule'])}, chosen on the validation split</li>",
           f"<li>out-of-distribution check (score.ood {_e(ood.get('mode'))}): "
           + (f"{_e(ood['gate'])}, threshold {ood['threshold']:.2f}" if ood.get("gate") else "no feature gate for these weights")
           + f"; {len(unusual)} scored studies marked out of distribution</li></ul>",
           "<h2>Studies, highest flagged probability first</h2>"]
    if scored.empty:
        out.append("<p>No scored studies.</p>")
    else:
        out.append("<table><tr><th>study</th><th>picture</th><th>flagged</th><th>top probabilities</th>"
                   "<th>attention box (y0, x0, y1, x1)</th><th>scored at</th></tr>")
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
    out.append("<h2>Rejected files</h2>")
    if rejected.empty:
        out.append("<p>None.</p>")
    else:
        out.append("<table><tr><th>file</th><th>reason</th></tr>")
        out += [f"<tr><td>{_e(r.study_id)}</td><td>{_e(r.reason)}</td></tr>" for r in rejected.itertuples(index=False)]
        out.append("</table>")
    out.append(f"<p class='warn'>{_e(NOT_A_DEVICE)}</p></body></html>")
    return "\n".join(out) + "\n"


def write_report(out_dir: Path, summary: dict) -> Path:
    """Write `out/reports/<run id>.html` and the same page as `out/report.html`; return the latter."""
    out_dir = Path(out_dir)
    rows = run_rows(out_dir, summary)
    atomic_write_text(out_dir / "reports" / f"{summary['run_id']}.html", render_html(summary, rows, base="../"))
    atomic_write_text(out_dir / "report.html", render_html(summary, rows))
    return out_dir / "report.html"
