"""`/metrics`: the app in the Prometheus text format (prometheus_client).

One registry per app (two apps in one process, as in the tests, count apart):
  cxr_app_requests_total{route,method,status}      requests, by route template (not raw path)
  cxr_app_request_duration_seconds{route,method}   latency histogram
  cxr_app_batch_size                               uploads per forward pass (histogram)
  cxr_app_batch_duration_seconds                   one batch's forward pass and writes
  cxr_app_refusals_total{reason}                   uploads refused: empty, too_large,
                                                   unreadable, not_a_chest_radiograph,
                                                   out_of_distribution
  cxr_app_ood_flagged_total                        scored, but marked out of distribution
  cxr_app_model_info{digest,backbone,...}          the served bundle (value 1)

A path that matches no route is counted as route "unmatched", so a scanner cannot grow the
label set. With CXR_APP_TOKEN set, /metrics wants the bearer token like the API.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest

from app.security import require_api_token

REFUSAL_REASONS = ("empty", "too_large", "unreadable", "not_a_chest_radiograph", "out_of_distribution")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def refusal_reason(facts: dict) -> str:
    """The class of an upload's refusal, from its per-study facts (status "rejected")."""
    ood = facts.get("ood") if isinstance(facts.get("ood"), dict) else {}
    if (facts.get("reason") or "").strip().lower() == "empty file":
        return "empty"
    if facts.get("ood_score", ood.get("score")) is not None:  # reached the model: its gate refused it
        return "out_of_distribution"
    if facts.get("image_height") is not None:  # decoded, then refused before the model: the precheck
        return "not_a_chest_radiograph"
    return "unreadable"


class AppMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("cxr_app_requests", "HTTP requests by route template, method and status code",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("cxr_app_request_duration_seconds", "Time to answer a request, by route template",
                                 ["route", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cxr_app_batch_size", "Uploads scored together in one forward pass",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("cxr_app_batch_duration_seconds", "One batch's forward pass and writes",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.refusals = Counter("cxr_app_refusals", "Uploads refused, by reason", ["reason"], registry=r)
        for reason in REFUSAL_REASONS:  # every reason listed from the start, at 0
            self.refusals.labels(reason)
        self.ood_flagged = Counter("cxr_app_ood_flagged", "Uploads scored but marked unlike the training data "
                                   "(score.ood flag)", registry=r)
        self.model = Info("cxr_app_model", "The model bundle this app serves", registry=r)

    def describe_model(self, scorer: Any) -> None:
        entry = getattr(scorer, "entry", None) or {}
        self.model.info({"digest": str(scorer.digest), "backbone": str(entry.get("backbone", "")),
                         "training_data_version": str(entry.get("training_data_version", "")),
                         "ood_mode": str(getattr(scorer, "ood_mode", ""))})

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ instruments

    def observe_request(self, request: Request, status: int, seconds: float) -> None:
        route = request.scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        self.requests.labels(template, request.method, str(status)).inc()
        self.latency.labels(template, request.method).observe(seconds)
        if status == 413:
            self.refusals.labels("too_large").inc()

    def batches(self, work: Callable[[list], list]) -> Callable[[list], list]:
        """`work` (the batcher's forward pass) timed and counted by batch size."""

        @functools.wraps(work)
        def measured(items: list) -> list:
            t0 = time.perf_counter()
            try:
                return work(items)
            finally:
                self.batch_size.observe(len(items))
                self.batch_seconds.observe(time.perf_counter() - t0)

        return measured

    def refusals_of(self, score: Callable) -> Callable:
        """`score(upload) -> (facts, from_record)` (the service's), counting refused uploads."""

        @functools.wraps(score)
        async def counted(upload):
            facts, from_record = await score(upload)
            if isinstance(facts, dict) and facts.get("status") == "rejected":
                self.refusals.labels(refusal_reason(facts)).inc()
            elif isinstance(facts, dict) and facts.get("ood_flag"):
                self.ood_flagged.inc()
            return facts, from_record

        return counted


def instrument(app, service) -> AppMetrics:
    """Count `app`'s requests and `service`'s batches and refusals; serve them at /metrics."""
    metrics = AppMetrics()
    metrics.describe_model(service.scorer)
    service.batcher.work = metrics.batches(service.batcher.work)
    service.score = metrics.refusals_of(service.score)
    app.state.metrics = metrics

    @app.middleware("http")
    async def measure(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.observe_request(request, status, time.perf_counter() - t0)

    app.include_router(router)
    return metrics


router = APIRouter()


@router.get("/metrics", dependencies=[Depends(require_api_token)], include_in_schema=False)
def prometheus_metrics(request: Request) -> Response:
    """The app's counters and histograms in the Prometheus text exposition format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
