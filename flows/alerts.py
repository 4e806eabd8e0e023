"""The nightly alert: a Prefect automation that calls a webhook when a nightly run fails.

`cxr alerts` (and `cxr serve`, when params `nightly.alert_webhook` is set) makes, or brings
up to date, one automation named `cxr-nightly-scoring-failed`:

    trigger  a `prefect.flow-run.Failed` or `prefect.flow-run.Crashed` event of a run of the
             flow `nightly-scoring` (served by `cxr serve` or deployed from prefect.yaml);
    action   CallWebhook: POST a JSON notice (flow run name and id, state, its message, a link
             to the run in the UI) to the URL, held in the Webhook block `cxr-nightly-alert`.

The URL lives in the block's secret field, so the UI and the API show it masked; nothing
here prints it. The server's triggers and actions services deliver the call (they run with
`prefect server start`, as `scripts/prefect-server.sh` starts it), within seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cxr.core.errors import DataError

log = logging.getLogger("cxr.alerts")

AUTOMATION = "cxr-nightly-scoring-failed"
BLOCK = "cxr-nightly-alert"
FLOW = "nightly-scoring"
STATES = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")

# Jinja, rendered by the server per event into a JSON body (`tojson` quotes and escapes each
# value). `flow_run` is the run the event is about; the state is the event's last word.
PAYLOAD = ("{"
           '"alert": "cxr nightly scoring run did not complete", '
           f'"flow": "{FLOW}", '
           '"flow_run_name": {{ flow_run.name | tojson }}, '
           '"flow_run_id": "{{ flow_run.id }}", '
           '"state": {{ event.event | replace("prefect.flow-run.", "") | tojson }}, '
           '"message": {{ (flow_run.state.message or "") | tojson }}, '
           '"url": {{ flow_run | ui_url | tojson }}'
           "}")


@dataclass(frozen=True)
class AlertSetup:
    automation_id: str
    created: bool  # False: an existing automation of the same name was updated

    def summary(self) -> dict:
        return {"automation": AUTOMATION, "automation_id": self.automation_id, "webhook_block": BLOCK,
                "flow": FLOW, "on": [s.rsplit(".", 1)[1] for s in STATES],
                "action": "created" if self.created else "updated"}


def _automation(block_id):
    from prefect.automations import Automation, CallWebhook, EventTrigger, Posture

    return Automation(
        name=AUTOMATION,
        description=f"POST a notice to the webhook in block {BLOCK} when a {FLOW} run fails or crashes (cxr alerts).",
        enabled=True,
        trigger=EventTrigger(
            expect=set(STATES),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[CallWebhook(block_document_id=block_id, payload=PAYLOAD)],
    )


def ensure_nightly_alert(webhook_url: str) -> AlertSetup:
    """Create or update the webhook block and the automation (idempotent: one of each by name)."""
    if not webhook_url:
        raise DataError("params nightly.alert_webhook is empty: set it to the URL that should hear about a failed "
                        "nightly run (for example a chat incoming-webhook or an on-call endpoint)")
    from prefect.automations import Automation
    from prefect.blocks.webhook import Webhook
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # Without a server Prefect would start a temporary one, and the automation would go with it.
        raise DataError("no Prefect server is configured: set PREFECT_API_URL to the server that runs the nightly "
                        "deployment (for a local one: scripts/prefect-server.sh start prints it)")

    try:
        block_id = Webhook(method="POST", url=webhook_url, headers={"Content-Type": "application/json"}).save(
            BLOCK, overwrite=True)
    except Exception as exc:  # no server answering: say so without the URL (it may hold a token)
        raise DataError(f"could not save the webhook block {BLOCK} on the Prefect server ({type(exc).__name__}); "
                        "is PREFECT_API_URL set and the server up (`make ui` or scripts/prefect-server.sh start)?") from None
    wanted = _automation(block_id)
    try:
        existing = Automation.read(name=AUTOMATION)
    except (ObjectNotFound, ValueError):
        existing = None
    if existing is None:
        made = wanted.create()
        log.info("alert automation %s created (webhook block %s)", AUTOMATION, BLOCK)
        return AlertSetup(str(made.id), True)
    wanted.id = existing.id
    wanted.update()
    log.info("alert automation %s updated (webhook block %s)", AUTOMATION, BLOCK)
    return AlertSetup(str(existing.id), False)
