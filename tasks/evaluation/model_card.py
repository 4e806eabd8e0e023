"""The model card of a bundle (Mitchell et al. 2019, "Model Cards for Model Reporting"), written
by `cxr evaluate` as `model_card.md` into the bundle folder (beside its figures) and into
paths.reports; the app shows it at /models/<digest>. Every figure in it comes from the
evaluation report it is made from: nothing is typed in by hand.
"""

from __future__ import annotations

import html

from cxr.core.labels import BRANCHES
from tasks.evaluation.sections import calibration_markdown, expert_markdown, render_ood, subgroup_markdown
from tasks.scoring.report import NOT_A_DEVICE

INTENDED_USE = (
    "Research and teaching: reproducing the AG-CNN (Guan et al. 2018) training pipeline on ChestX-ray14-style "
    "data, and trying out batch scoring, calibration and out-of-distribution marking on radiographs like the "
    "training data. Not for patient care.")


def _ci(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""


def _auc(v) -> str:
    if isinstance(v, dict) and v.get("auroc") is not None:
        return f"{v['auroc']:.3f}{_ci(v.get('ci95'))}"
    return "n/a"


def model_card(report: dict, manifest: dict | None) -> str:
    """The card as Markdown from an evaluation report and the bundle's manifest (None: the
    evaluated weights are not registered; the card says so)."""
    m = manifest or {}
    figures = report.get("figures", {})
    data = m.get("training_data") or {}
    digest = report["model_digest"]
    lines = [f"# Model card: AG-CNN `{digest[:12]}`", "", f"**{NOT_A_DEVICE}**", ""]
    if manifest is None:
        lines += ["These weights are not registered as a bundle: no thresholds, calibration or gate are stored with them.", ""]
    lines += ["## Intended use", "", INTENDED_USE, ""]
    lines += ["## Model", "", f"- digest: `{digest}`", f"- backbone: {m.get('backbone', 'unknown')}; input "
              f"{(m.get('model') or {}).get('image_size', '?')} px", "- three stages (global, local, fusion); the fusion "
              "branch is served"]
    for stage, facts in (m.get("stages") or {}).items():
        best = facts.get("best_valid_mean_auroc")
        lines.append(f"- {stage}: best epoch {facts.get('best_epoch')}, validation mean AUROC "
                     f"{best:.3f}" if isinstance(best, (int, float)) else f"- {stage}: best epoch {facts.get('best_epoch')}")
    lines += ["", "## Training data", "",
              f"- kind: **{data.get('kind', 'not recorded')}** ({data.get('source', 'not recorded')})",
              f"- data version: `{m.get('training_data_version', 'unknown')}` (digest of the metadata, split and class weights)",
              f"- split (images): {', '.join(f'{k} {v}' for k, v in (data.get('split') or {}).items()) or 'not recorded'}; "
              f"evaluated on the test split ({report['test_images']} images)", ""]
    lines += ["## Metrics (test split)", "", f"Intervals: {report.get('intervals', '95% bootstrap')}.", "",
              "| branch | mean AUROC | no finding vs any finding |", "| --- | --- | --- |"]
    for b in BRANCHES:
        v = report["branches"][b]
        mean = "n/a" if v["mean_auroc"] is None else f"{v['mean_auroc']:.3f}{_ci(v.get('mean_auroc_ci95'))}"
        lines.append(f"| {b}{' (served)' if b == 'fusion' else ''} | {mean} | {_auc(v['any_finding'])} |")
    lines += ["", "| class | test positives | fusion AUROC |", "| --- | --- | --- |"]
    for c, v in report["branches"]["fusion"]["per_class"].items():
        lines.append(f"| {c} | {report.get('test_positives', {}).get(c, '?')} | {_auc(v) if isinstance(v, dict) else 'n/a'} |")
    lines += [""] + [f"![{alt}](figures/{figures[k]})" for k, alt in
                     (("roc", "ROC curves"), ("auroc", "AUROC per class"), ("training", "training curves")) if k in figures]
    lines += [""]
    thresholds = m.get("thresholds") or {}
    if thresholds:
        lines += ["## Operating points", ""]
        for rule, entry in thresholds.items():
            lines.append(f"- rule `{rule}`: per-class thresholds chosen on the validation split ({entry.get('valid_images')} "
                         f"images), on the {entry.get('scale', 'raw')} probability scale")
        lines.append("")
    lines += subgroup_markdown(report.get("subgroups"), figures)
    lines += calibration_markdown(report.get("calibration"), figures)
    lines += expert_markdown(report.get("expert_labels"))
    lines += render_ood(report.get("ood")) + ([f"", f"![gate scores](figures/{figures['ood']})"] if "ood" in figures else [])
    lines += ["", "## Known limits", ""] + [f"- {text}" for text in known_limits(report, m)]
    return "\n".join(lines) + "\n"


def known_limits(report: dict, manifest: dict) -> list[str]:
    """The limits in plain words, from what the report measured."""
    out = []
    kind = (manifest.get("training_data") or {}).get("kind")
    if kind == "synthetic":
        out.append("This model learned from synthetic renderings, not from real radiographs: its scores for a real film "
                   "are not meaningful, and its figures say nothing about real patients.")
    few = [c for c, n in (report.get("test_positives") or {}).items() if n < 5]
    if few:
        out.append(f"{len(few)} of 14 classes have fewer than 5 positives in the test split ({', '.join(few)}): their "
                   "AUROC is shown without an interval and may be far from the truth.")
    out.append(f"The test split has {report['test_images']} images; the figures change with the seed and the machine "
               "(CPU kernels differ between hosts), within their intervals.")
    out.append("Labels are text-mined from reports (ChestX-ray14) and themselves wrong for a share of images; the "
               "radiologist-adjudicated labels cover only four findings and few images here.")
    cal = report.get("calibration") or {}
    if cal.get("method") not in (None, "identity"):
        out.append("Calibration is fitted on the validation split: on data from another site or population the "
                   "probabilities are not frequencies any more, and the thresholds need refitting.")
    out.append("The out-of-distribution mark compares a film with this model's own training images; it is not a "
               "diagnosis of image quality, and an unusual but valid film may be marked.")
    return out


_CSS = """body{font-family:sans-serif;margin:1.5em auto;max-width:1100px;color:#222;line-height:1.4}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px}
th{background:#eee}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}code{background:#f4f4f4}"""


def markdown_html(text: str, title: str, *, standalone: bool = True) -> str:
    """The Markdown of a report or card as HTML (tables; raw HTML in the text escaped)."""
    import markdown

    body = markdown.markdown(html.escape(text, quote=False), extensions=["tables"], output_format="html")
    if not standalone:
        return body
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")
