"""The evaluation's figures as PNG files (matplotlib, Agg backend: no display needed).

Each function draws one figure from the evaluation's numbers and writes it atomically;
`savefig` is told to leave out the Software/date metadata, so the same numbers give the
same bytes. The DVC plot data is written beside by `write_plot_data`: long-format JSON with a
`class` (ROC) or `curve` (reliability) column that the templates in .dvc/plots/ colour by, so
`dvc plots show` draws one line per class, and one CSV per stage's epochs.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cxr.core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from cxr.core.labels import BRANCHES, PATHOLOGIES

FIGURES = {
    "roc": "roc_fusion.png",
    "auroc": "auroc_per_class.png",
    "reliability": "reliability.png",
    "training": "training_curves.png",
    "subgroups": "subgroups.png",
    "ood": "ood_scores.png",
}
_BRANCH_COLOURS = {"global": "#1f77b4", "local": "#ff7f0e", "fusion": "#2ca02c"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path).name


def roc_figure(y: np.ndarray, p: np.ndarray, aurocs: dict, any_auc: float | None, path: Path, title: str) -> str:
    """ROC curve of every class with positives and negatives, plus No Finding vs any finding."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    cmap = plt.get_cmap("tab20")
    for k, name in enumerate(PATHOLOGIES):
        if 0 < y[:, k].sum() < len(y):
            fpr, tpr, _ = roc_curve(y[:, k], p[:, k])
            ax.plot(fpr, tpr, color=cmap(k), lw=1.2,
                    label=f"{name} {aurocs.get(name, float('nan')):.2f} (n+={int(y[:, k].sum())})")
    anyf = y.max(1)
    if 0 < anyf.sum() < len(y):
        fpr, tpr, _ = roc_curve(anyf, p.max(1))
        ax.plot(fpr, tpr, color="black", lw=2.6, label=f"any finding {any_auc:.2f} (n+={int(anyf.sum())})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(fontsize=7, loc="lower right", title="class AUROC (test positives)", title_fontsize=7)
    return _save(fig, path)


def auroc_figure(per_branch: dict[str, dict], positives: dict[str, int], path: Path, title: str) -> str:
    """Per-class AUROC with 95% intervals for each branch; a class without positives shows its
    n and no point, one with too few cases its point and no interval."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 7))
    rows = list(PATHOLOGIES)[::-1]
    for j, branch in enumerate(BRANCHES):
        offset = (j - 1) * 0.25
        for i, name in enumerate(rows):
            cell = per_branch[branch].get(name)
            if not isinstance(cell, dict) or cell.get("auroc") is None:
                continue
            v, ci = cell["auroc"], cell.get("ci95")
            if ci:
                ax.errorbar(v, i + offset, xerr=[[v - ci[0]], [ci[1] - v]], fmt="o", ms=4, capsize=2,
                            color=_BRANCH_COLOURS[branch], label=branch if i == 0 else None)
            else:
                ax.plot(v, i + offset, marker="o", ms=4, mfc="white", color=_BRANCH_COLOURS[branch],
                        label=branch if i == 0 else None)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{n} (n+={positives.get(n, 0)})" + ("  no positives" if not positives.get(n) else "")
                        for n in rows], fontsize=8)
    ax.axvline(0.5, ls=":", color="grey", lw=1)
    ax.set(xlim=(0, 1.02), xlabel="test AUROC (95% interval; open marker: too few cases for an interval)", title=title)
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    ax.legend(seen.values(), seen.keys(), fontsize=8, loc="lower left")
    return _save(fig, path)


def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], ece: dict[str, dict[str, float]],
                       path: Path, title: str) -> str:
    """Left: the reliability diagram (all classes pooled) before and after calibration.
    Right: the expected calibration error of each class before and after."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [1, 1.2]})
    left.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfectly calibrated")
    for (name, (mean_p, frac)), colour in zip(curves.items(), ("#d62728", "#2ca02c")):
        left.plot(mean_p, frac, marker="o", color=colour, label=f"{name} (pooled ECE {ece[name]['pooled']:.3f})")
    left.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed frequency",
             title="reliability (fusion, test split, 14 classes pooled)")
    left.legend(fontsize=8, loc="upper left")
    names = list(PATHOLOGIES)
    x = np.arange(len(names))
    for j, (name, colour) in enumerate(zip(ece, ("#d62728", "#2ca02c"))):
        right.bar(x + (j - 0.5) * 0.4, [ece[name]["per_class"][c] for c in names], width=0.4, color=colour, label=name)
    right.set_xticks(x)
    right.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    right.set(ylabel="expected calibration error (10 bins)", title="ECE per class (test split)")
    right.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def training_figure(histories: dict[str, list[dict]], path: Path, title: str) -> str:
    """Loss and validation mean AUROC per epoch, one column per stage."""
    plt = _plt()
    stages = [s for s in histories if histories[s]]
    fig, axes = plt.subplots(2, max(len(stages), 1), figsize=(4 * max(len(stages), 1), 6), squeeze=False)
    for j, stage in enumerate(stages):
        epochs = [h["epoch"] for h in histories[stage]]
        axes[0, j].plot(epochs, [h.get("loss") for h in histories[stage]], marker="o", color="#1f77b4")
        axes[0, j].set(title=f"{stage}: training loss", xlabel="epoch")
        axes[1, j].plot(epochs, [h.get("valid_mean_auroc") for h in histories[stage]], marker="o", color="#2ca02c")
        axes[1, j].set(title=f"{stage}: validation mean AUROC", xlabel="epoch", ylim=(0, 1))
        for ax in axes[:, j]:
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def subgroup_figure(groups: list[dict], path: Path, title: str) -> str:
    """Any-finding and mean AUROC by subgroup, with intervals where the group is large enough."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(groups) + 1.5))
    for i, g in enumerate(groups[::-1]):
        for key, colour, dy in (("any_finding", "#9467bd", 0.12), ("mean", "#2ca02c", -0.12)):
            v, ci = g[key]["auroc"], g[key]["ci95"]
            if v is None:
                continue
            if ci:
                ax.errorbar(v, i + dy, xerr=[[v - ci[0]], [ci[1] - v]], fmt="o", ms=4, capsize=2, color=colour)
            else:
                ax.plot(v, i + dy, marker="o", mfc="white", ms=4, color=colour)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([f"{g['attribute']}: {g['group']} (n={g['images']})" for g in groups[::-1]], fontsize=8)
    ax.plot([], [], "o", color="#9467bd", label="no finding vs any finding")
    ax.plot([], [], "o", color="#2ca02c", label="mean over classes")
    ax.axvline(0.5, ls=":", color="grey", lw=1)
    ax.set(xlim=(0, 1.02), xlabel="test AUROC, fusion (95% interval; open marker: group too small)", title=title)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def ood_figure(groups: dict[str, list[float]], threshold: float, path: Path, title: str) -> str:
    """The gate's score of each group of inputs (log scale), with the threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    values = [np.asarray([v for v in vs if v is not None and np.isfinite(v) and v > 0]) for vs in groups.values()]
    finite = np.concatenate([v for v in values if len(v)] or [np.array([threshold])])
    bins = np.geomspace(max(finite.min(), 1e-3) * 0.9, max(finite.max(), threshold) * 1.1, 40)
    for (name, _), v in zip(groups.items(), values):
        if len(v):
            ax.hist(v, bins=bins, alpha=0.55, label=f"{name} (n={len(v)}, {np.mean(v > threshold):.0%} over)")
    ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold {threshold:g}")
    ax.set(xscale="log", xlabel="out-of-distribution gate score", ylabel="images", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def roc_long(y: np.ndarray, p: np.ndarray, max_points: int = 200) -> list[dict]:
    """ROC points (class, fpr, tpr) of every computable class and of any finding, for DVC plots."""
    from sklearn.metrics import roc_curve

    series = [(name, y[:, k], p[:, k]) for k, name in enumerate(PATHOLOGIES)] + [("any finding", y.max(1), p.max(1))]
    rows = []
    for name, yy, pp in series:
        if not 0 < yy.sum() < len(yy):
            continue
        fpr, tpr, _ = roc_curve(yy, pp)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).round().astype(int))
        rows += [{"class": name, "point": j, "fpr": round(float(fpr[i]), 5), "tpr": round(float(tpr[i]), 5)}
                 for j, i in enumerate(keep)]
    return rows


def write_plot_data(folder: Path, roc: list[dict], reliability: dict[str, tuple[np.ndarray, np.ndarray]],
                    histories: dict[str, list[dict]]) -> dict[str, str]:
    """The DVC plots' data files in `folder`: roc_by_class.json, reliability.json and
    train_<stage>.csv (epoch, loss, valid_mean_auroc)."""
    folder = Path(folder)
    atomic_write_json(folder / "roc_by_class.json", roc)
    atomic_write_json(folder / "reliability.json", [
        {"curve": name, "point": j, "mean_predicted": round(float(a), 5), "observed": round(float(b), 5)}
        for name, (xs, ys) in reliability.items() for j, (a, b) in enumerate(zip(xs, ys))])
    written = {"roc": "roc_by_class.json", "reliability": "reliability.json"}
    for stage, history in histories.items():
        lines = ["epoch,loss,valid_mean_auroc"] + [f"{h['epoch']},{h.get('loss')},{h.get('valid_mean_auroc')}"
                                                   for h in history]
        atomic_write_text(folder / f"train_{stage}.csv", "\n".join(lines) + "\n")
        written[f"train_{stage}"] = f"train_{stage}.csv"
    return written
