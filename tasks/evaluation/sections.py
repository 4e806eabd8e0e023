"""The Markdown sections shared by the evaluation report and the model card: calibration,
subgroups, expert labels and the out-of-distribution detector."""

from __future__ import annotations

from cxr.core.labels import PATHOLOGIES


def interval_text(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""


def calibration_markdown(cal: dict | None, figures: dict) -> list[str]:
    if not cal:
        return []
    before, after = cal["ece"]["uncalibrated"], cal["ece"]["calibrated"]
    lines = ["## Calibration", "",
             f"Method: {cal['method']}" + (f" ({cal['note']})" if cal.get("note") else
                                          ", fitted on the validation split at registration (Platt scaling per class)") + ". "
             f"Expected calibration error of the served (fusion) probabilities on the test split, {cal['bins']} bins:", "",
             "| | pooled | mean over classes |", "| --- | --- | --- |",
             f"| before calibration | {before['pooled']:.3f} | {before['mean_over_classes']:.3f} |",
             f"| after calibration | {after['pooled']:.3f} | {after['mean_over_classes']:.3f} |", "",
             "| class | ECE before | ECE after |", "| --- | --- | --- |"]
    lines += [f"| {c} | {before['per_class'][c]:.3f} | {after['per_class'][c]:.3f} |" for c in PATHOLOGIES]
    if "reliability" in figures:
        lines += ["", f"![reliability diagram and ECE per class](figures/{figures['reliability']})"]
    return lines + [""]


def _group_cell(v: dict) -> str:
    return "n/a" if v.get("auroc") is None else f"{v['auroc']:.3f}{interval_text(v.get('ci95'))}"


def subgroup_markdown(groups: list[dict] | None, figures: dict) -> list[str]:
    if not groups:
        return []
    lines = ["## Subgroups (fusion, test split)", "", "| attribute | group | images | with findings | no finding vs any | mean AUROC | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for g in groups:
        lines.append(f"| {g['attribute']} | {g['group']} | {g['images']} | {g['with_findings']} | {_group_cell(g['any_finding'])} | "
                     f"{_group_cell(g['mean'])} | {g.get('note', '')} |")
    if "subgroups" in figures:
        lines += ["", f"![AUROC by subgroup](figures/{figures['subgroups']})"]
    return lines + [""]


def expert_markdown(expert: dict | None) -> list[str]:
    if not expert:
        return []
    lines = ["## Radiologist-adjudicated labels", ""]
    if "error" in expert:
        return lines + [f"Not evaluated: {expert['error']}.", ""]
    lines.append(f"{expert['source']}: {expert['labelled_images']} images; {expert['test_images_with_labels']} of this test split "
                 "have them (matched by Image Index)." + (f" Note: {expert['note']}." if expert.get("note") else ""))
    lines += ["", "| adjudicated label | scored by (max of) | n | positives | AUROC | interval |", "| --- | --- | --- | --- | --- | --- |"]
    for label, v in expert["labels"].items():
        auc = "n/a" if v["auroc"] is None else f"{v['auroc']:.3f}"
        lines.append(f"| {label} | {', '.join(v['classes'])} | {v['images']} | {v['positives']} | {auc} | "
                     f"{interval_text(v.get('ci95')).strip() or v.get('interval', '')} |")
    lines += ["", "Fracture: no ChestX-ray14 class, not scored.", ""]
    return lines


def render_ood(ood: dict | None) -> list[str]:
    if not ood:
        return []
    lines = ["", "## Out-of-distribution detector", ""]
    if "error" in ood:
        return lines + [f"Not evaluated: {ood['error']}"]
    gate = ood.get("gate")
    if gate is None:
        lines.append(f"`score.ood: {ood['mode']}`. No feature gate stored with these weights (precheck only).")
    elif gate.get("two_part"):
        lines.append(f"`score.ood: {ood['mode']}`. Gate: {gate['method']}. Feature distance allowed up to "
                     f"{gate['feature_threshold']}, image-statistics distance up to {gate['stats_threshold']} (each the "
                     f"{1 - gate['target_false_rejection'] / 2:.1%} quantile of the validation split); score threshold "
                     f"{gate['threshold']:g}; {gate['valid_false_rejection']:.1%} of the validation split over it.")
    else:
        lines.append(f"`score.ood: {ood['mode']}`. Feature gate: {gate['method']}, threshold {gate['threshold']} (target "
                     f"{gate['target_false_rejection']:.0%} false rejections on the validation split, achieved "
                     f"{gate['valid_false_rejection']:.1%}).")
    if "honest_mark" in ood:
        h = ood["honest_mark"]
        lines += ["", f"**Marked unlike the training data: {h['real_marked']:.1%} of real NIH films "
                  f"(target at least {h['target_real']:.0%}), {h['test_marked']:.1%} of this model's own test split "
                  f"(target at most {h['target_test']:.0%}): {'met' if h['met'] else 'NOT met'}.**"]
    if "test" in ood:
        t = ood["test"]
        lines += ["", f"Test split: {t['images']} images, {t['refused']} refused (false-rejection rate {t['false_rejection_rate']:.1%}; "
                  f"precheck {t['precheck_refused']}, gate over threshold {t['gate_over_threshold']}, flag rate {t['flag_rate']:.1%}); "
                  f"marked {t.get('marked', '?')} ({t.get('marked_rate', 0):.1%})."
                  + _by_part(t.get("by_part"))]
    corpus = ood.get("corpus", {})
    for kind, title in (("far", "Not a chest radiograph (far)"), ("near", "A radiograph shown the wrong way (near)")):
        if kind in corpus:
            c = corpus[kind]
            lines += ["", f"**{title}**: {c['refused']} of {c['items']} refused (detection rate {c['detection_rate']:.0%}), "
                      f"{c['flagged_or_refused']} refused or flagged.", "", "| file | refused by | gate score | reason |", "| --- | --- | --- | --- |"]
            for name, r in corpus["items"].items():
                if r["kind"] == kind:
                    reason = (r["reason"] or "").replace("|", "/")
                    lines.append(f"| {name} | {r['refused_by'] or '-'} | {r['ood_score'] if r['ood_score'] is not None else '-'} | {reason} |")
    if "near_skipped" in corpus:
        lines += ["", f"Near cases skipped: {corpus['near_skipped']}."]
    if "real_sample" in ood:
        r = ood["real_sample"]
        lines += ["", f"Real NIH radiographs (never seen by this model): {r['images']} images, {r['scored_rate']:.0%} scored, "
                  f"{r['flagged']} flagged by the gate, {r['precheck_refused']} refused by the precheck; marked "
                  f"{r['marked']} ({r['marked_rate']:.1%})." + _by_part(r.get("by_part"))]
    if ood.get("real_studies"):
        lines += ["", "Real studies from other sites: " + ", ".join(
            f"{name} {'marked' if v['marked'] else 'NOT marked'} (score {v['ood_score']})" for name, v in ood["real_studies"].items()) + "."]
    return lines


def _by_part(parts: dict | None) -> str:
    if not parts:
        return ""
    return (f" Each part alone would mark: features {parts['features']:.1%}, image statistics "
            f"{parts['image_statistics']:.1%}.")
