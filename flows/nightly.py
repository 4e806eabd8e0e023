"""The nightly deployment: score what arrived in the incoming folder, one dated report a night.

Scores accumulate in one store (`paths.reports/nightly`), so a study scored on Monday is not
scored again on Tuesday by the same model; each night's report is also kept in a dated folder
(`paths.reports/nightly/YYYY-MM-DD/report.html`) beside the store's per-run pages.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from prefect import flow

from cxr.core.atomic import atomic_path, atomic_write_json
from cxr.core.config import load_params
from flows.score import score

DEPLOYMENT = "nightly-scoring"


@flow(name="nightly-scoring", log_prints=True)
def nightly_scoring_flow(params_file: str = "params.yaml", day: str | None = None) -> dict:
    params = load_params(params_file)
    store = Path(params.paths.reports) / "nightly"
    day = day or dt.date.today().isoformat()
    if params.nightly.source == "dicomweb":
        # A PACS: what is newer than the store's watermark (less source.lookback_days), results stored back.
        from flows.pacs import pacs_scoring_flow

        summary = pacs_scoring_flow(params, params.nightly.dicomweb_url, store)
    else:
        incoming = Path(params.paths.incoming)
        incoming.mkdir(parents=True, exist_ok=True)
        summary = score(params, incoming, store)
    dated = store / day
    # The run's page sits at the same depth as the dated folder, so its relative links hold.
    if summary.get("run_id") and (store / "reports" / f"{summary['run_id']}.html").exists():
        with atomic_path(dated / "report.html") as tmp:
            shutil.copyfile(store / "reports" / f"{summary['run_id']}.html", tmp)
    atomic_write_json(dated / "summary.json", summary)
    print(f"nightly scoring {day}: {summary['message']}; report {dated / 'report.html'}")
    return {**summary, "dated_report": str(dated / "report.html")}


def nightly_deployment(params_file: str):
    """The deployment `cxr serve` serves: params nightly.cron read in nightly.timezone (the
    rule prefect.yaml follows too), the params file resolved for the runs."""
    from prefect.schedules import Cron

    params = load_params(params_file)
    return nightly_scoring_flow.to_deployment(
        name=DEPLOYMENT,
        schedule=Cron(params.nightly.cron, timezone=params.nightly.timezone),
        parameters={"params_file": str(Path(params_file).resolve())},
        description="Score new studies in paths.incoming into a dated report folder.",
        tags=["cxr", "scoring"],
    )


def serve(params_file: str) -> None:
    """Serve the deployment on this process until interrupted (runs happen here, no worker);
    with params nightly.alert_webhook set, first make or update the failure alert."""
    from prefect import serve as prefect_serve

    params = load_params(params_file)
    deployment = nightly_deployment(params_file)
    if params.nightly.alert_webhook:
        from flows.alerts import ensure_nightly_alert

        setup = ensure_nightly_alert(params.nightly.alert_webhook)
        print(f"alert: automation {setup.summary()['automation']} {setup.summary()['action']}", flush=True)
    print(f"serving {nightly_scoring_flow.name}/{DEPLOYMENT}: cron '{params.nightly.cron}' ({params.nightly.timezone})",
          flush=True)
    prefect_serve(deployment)
