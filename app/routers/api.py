"""The JSON API: score one upload, list runs and their studies, health."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from app.runs import APP_RUN, clean, discover_runs, run_counts, run_page
from app.security import require_api_token, signed_in, valid_id
from app.uploads import UploadError, discard, receive_files
from app.views import public_facts

router = APIRouter()

_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "one radiograph: PNG, JPEG or DICOM (at most score.max_bytes)"}}}}}}}


def runs_of(request: Request) -> dict:
    params = request.app.state.params
    return discover_runs(params.app_runs(), params.app_store())


def run_or_404(request: Request, run_id: str):
    """The run `run_id` names; HTTP 404 when there is none."""
    run = runs_of(request).get(valid_id(run_id, "run"))
    if run is None:
        raise HTTPException(404, "no such run")
    return run


@router.post("/api/v1/studies", dependencies=[Depends(require_api_token)], openapi_extra=_UPLOAD_BODY,
             responses={200: {"description": "scored: the per-study JSON plus `page`, the study page's path"},
                        413: {"description": "the file is over score.max_bytes (refused while streaming)"},
                        422: {"description": "rejected: unreadable, not a chest radiograph or out of distribution; "
                                             "`status` is \"rejected\" and `reason` says why"}})
async def score_study(request: Request):
    """Score one radiograph (multipart field `file`); a repeated upload answers from the app's record."""
    service = request.app.state.service
    try:
        uploads = await receive_files(request, service.tmp_dir, request.app.state.params.score.max_bytes)
    except UploadError as exc:
        return JSONResponse({"status": "rejected", "reason": exc.reason}, status_code=exc.status)
    if len(uploads) > 1:
        discard(uploads)
        return JSONResponse({"status": "rejected", "reason": "send one file per request in the field 'file'"},
                            status_code=422)
    facts, from_record = await service.score(uploads[0])
    body = public_facts(facts, APP_RUN)
    return JSONResponse(body, status_code=200 if body.get("status") == "scored" else 422,
                        headers={"X-Cxr-Record": "hit" if from_record else "new"})


@router.get("/api/v1/runs", dependencies=[Depends(require_api_token)])
def list_runs(request: Request) -> list[dict]:
    """Every scoring run found: batch outputs, the nightly store and its dated folders, the app's uploads."""
    out = []
    for run in runs_of(request).values():
        # Counted on the run's index (kept beside its scores), never by reading its whole table.
        c = run_counts(run)
        out.append({"run_id": run.run_id, "kind": run.kind, "studies": c["studies"], "scored": c["scored"],
                    "rejected": c["rejected"], "flagged": c["flagged"], "last_scored_at": c["last_scored_at"],
                    "studies_url": f"/api/v1/runs/{run.run_id}/studies", "page": f"/runs/{run.run_id}"})
    return out


@router.get("/api/v1/runs/{run_id}/studies", dependencies=[Depends(require_api_token)])
def run_studies(request: Request, run_id: str, sort: str = "max_flagged_probability",
                order: str = Query("desc", pattern="^(asc|desc)$"), offset: int = Query(0, ge=0),
                limit: int = Query(1000, ge=1, le=10000)) -> dict:
    """The run's studies as rows (highest flagged probability first by default), each with its page:
    sorted and paged on the server, only this page's rows read."""
    run = run_or_404(request, run_id)
    total, page = run_page(run, sort, order == "desc", offset, limit)
    return {"run_id": run.run_id, "kind": run.kind, "total": total, "offset": offset, "limit": limit,
            "studies": [public_facts(clean(r), run.run_id) for r in page.to_dict("records")]}


@router.get("/healthz")
def healthz(request: Request) -> dict:
    """Liveness, and (when signed in, or without a token) which model answers."""
    service = request.app.state.service
    if not signed_in(request):
        return {"status": "ok"}
    scorer = service.scorer
    gate = getattr(scorer, "gate", None)
    return {"status": "ok", "model_digest": scorer.digest, "backbone": scorer.entry.get("backbone"),
            "training_data_version": scorer.entry.get("training_data_version"),
            "ood": {"mode": getattr(scorer, "ood_mode", None), "method": getattr(gate, "method", None)},
            "forward_passes": service.batcher.batches, "uploads_scored": service.batcher.items,
            "recorded_studies": len(service.record)}
