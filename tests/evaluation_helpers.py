"""One evaluated copy of the session's trained model, shared by the evaluation tests and the
browser test of the model page (the same weights give the same digest, so its card and
figures are those of any registered copy of them)."""

from __future__ import annotations

from pathlib import Path

_CACHE: dict[str, tuple] = {}


def evaluated(trained) -> tuple["Params", dict]:
    """(params, report) of `cxr evaluate` run once on a registered copy of `trained`, with its
    own metrics and reports folders (the stages' epoch histories copied in)."""
    key = str(Path(trained.paths.models).resolve())
    if key not in _CACHE:
        import shutil

        from tasks.evaluation.evaluate import evaluate
        from tests.conftest import registered_copy

        params = registered_copy(trained, "models-card")
        root = Path(params.paths.models).parent
        metrics, reports = root / "metrics-card", root / "reports-card"
        metrics.mkdir(exist_ok=True)
        for stage in ("global", "local", "fusion"):
            shutil.copy(Path(trained.paths.metrics) / f"train_{stage}.json", metrics)
        params = params.model_copy(update={"paths": params.paths.model_copy(update={"metrics": metrics, "reports": reports})})
        _CACHE[key] = (params, evaluate(params, truth_boxes=[]))
    return _CACHE[key]
