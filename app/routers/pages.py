"""The pages: upload, study, runs browser, sign-in; and the pictures a study page shows."""

from __future__ import annotations

import asyncio
import hmac
import re
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from cxr.core.labels import PATHOLOGIES
from app.routers.api import run_or_404
from app.runs import APP_RUN, PAGE_SIZE, SORTABLE, clean, find_study
from app.runs import run_page as run_page_rows
from app.security import SESSION_COOKIE, safe_next, session_value, signed_in, valid_id
from app.uploads import UploadError, receive_files
from app.pacs_link import pacs_facts
from app.views import CAM_PICTURE, cam_png, findings, page_path, picture_file, picture_type, public_facts, study_facts

router = APIRouter(include_in_schema=False)


def _page(request: Request, name: str, context: dict, status_code: int = 200):
    return request.app.state.templates.TemplateResponse(request, name, context, status_code=status_code)


def _signin_redirect(request: Request):
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/signin?next={quote(target, safe='')}", status_code=303)


@router.get("/signin")
def signin_form(request: Request, next: str = "/"):
    return _page(request, "signin.html", {"next": safe_next(next), "error": None})


@router.post("/signin")
def signin(request: Request, token: str = Form(...), next: str = Form("/")):
    expected = request.app.state.token
    if not expected or not hmac.compare_digest(session_value(token), session_value(expected)):
        return _page(request, "signin.html", {"next": safe_next(next), "error": "That token is not the app's token."},
                     status_code=401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, session_value(expected), httponly=True, samesite="strict")
    return response


@router.get("/")
def upload_page(request: Request):
    if not signed_in(request):
        return _signin_redirect(request)
    return _page(request, "upload.html", {"max_bytes": request.app.state.params.score.max_bytes})


@router.post("/upload")
async def upload(request: Request):
    """The upload form (one or several files): one result per file; a single scored file opens its page."""
    if not signed_in(request):
        return _signin_redirect(request)
    service = request.app.state.service
    try:
        uploads = await receive_files(request, service.tmp_dir, request.app.state.params.score.max_bytes)
    except UploadError as exc:
        return _page(request, "results.html", {"results": [], "error": exc.reason}, status_code=exc.status)
    # Scored concurrently: the files of one form share a forward pass.
    answers = await asyncio.gather(*(service.score(u) for u in uploads))
    results = [{"filename": u.filename, **public_facts(facts, APP_RUN)} for u, (facts, _) in zip(uploads, answers)]
    if len(results) == 1 and results[0].get("status") == "scored":
        return RedirectResponse(results[0]["page"], status_code=303)
    status = 200 if any(r.get("status") == "scored" for r in results) else 422
    return _page(request, "results.html", {"results": results, "error": None}, status_code=status)


@router.get("/runs")
def runs_page(request: Request):
    if not signed_in(request):
        return _signin_redirect(request)
    from app.routers.api import list_runs

    return _page(request, "runs.html", {"runs": list_runs(request)})


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: str, sort: str = "max_flagged_probability",
             order: str = Query("desc", pattern="^(asc|desc)$"), offset: int = Query(0, ge=0),
             limit: int = Query(PAGE_SIZE, ge=1, le=1000)):
    """One page of the run's studies, sorted on the server; previous/next links page on."""
    if not signed_in(request):
        return _signin_redirect(request)
    run = run_or_404(request, run_id)
    sort = sort if sort in SORTABLE else "max_flagged_probability"
    total, page = run_page_rows(run, sort, order == "desc", offset, limit, whole=False)
    rows = [public_facts(clean(r), run.run_id) for r in page.to_dict("records")]
    return _page(request, "run.html", {"run": run, "rows": rows, "sort": sort, "order": order, "total": total,
                                       "offset": offset, "limit": limit})


@router.get("/runs/{run_id}/studies/{name}")
def study_page(request: Request, run_id: str, name: str, cam: int | None = Query(None, ge=0, lt=len(PATHOLOGIES))):
    if not signed_in(request):
        return _signin_redirect(request)
    run, row = _study(request, run_id, name)
    facts = public_facts(study_facts(run, row), run.run_id)
    scorer = request.app.state.service.scorer
    same_model = facts.get("model_digest") == scorer.digest
    items = findings(facts, scorer.thresholds if same_model else None)
    if cam is None:  # the highest-probability finding's map first
        scored = [f for f in items if f["probability"] is not None]
        cam = max(scored, key=lambda f: f["probability"])["index"] if scored else 0
    base = page_path(run.run_id, name)
    has = {p: picture_file(run, name, row, p) is not None for p in ("radiograph.png", "crop.png", "overlay")}
    return _page(request, "study.html", {
        "run": run, "name": name, "facts": facts, "findings": items, "cam": cam, "base": base, "has": has,
        "cam_available": has["radiograph.png"], "same_model": same_model,
        "training_data_version": scorer.entry.get("training_data_version") if same_model else None,
        "backbone": scorer.entry.get("backbone") if same_model else None,
        "store_pixels": request.app.state.params.app.store_pixels,
        # Scored from a PACS: its StudyInstanceUID and a link into the viewer (app.viewer_url).
        "pacs": pacs_facts(run, row, request.app.state.params.app.viewer_url),
        # What a probability means and when a finding is flagged (older study JSONs lack them).
        "meaning": scorer.meaning if same_model else None})


@router.get("/runs/{run_id}/studies/{name}/{picture}")
def study_picture(request: Request, run_id: str, name: str, picture: str):
    if not signed_in(request):
        raise HTTPException(401, "sign in first")
    run, row = _study(request, run_id, name)
    match = CAM_PICTURE.fullmatch(picture)
    if match:
        data = cam_png(run, name, int(match.group(1)))
        if data is None:
            raise HTTPException(404, "no such picture")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
    path = picture_file(run, name, row, picture)
    if path is None:
        raise HTTPException(404, "no such picture")
    return FileResponse(path, media_type=picture_type(path), headers={"Cache-Control": "private, max-age=3600"})


def _study(request: Request, run_id: str, name: str):
    run = run_or_404(request, run_id)
    row = find_study(run, valid_id(name, "study"))
    if row is None:
        raise HTTPException(404, "no such study in this run")
    return run, row


# --------------------------------------------------------------------------- the model card

_DIGEST = re.compile(r"^[0-9a-f]{6,64}$")
_FIGURE = re.compile(r"^[a-z0-9_]{1,64}\.png$")


def _bundle(request: Request, digest: str):
    """The registered bundle `digest` (or a unique prefix) names, beside the served one; 404 otherwise."""
    from cxr.core.errors import DataError
    from tasks.bundle.bundle import open_bundle
    from tasks.bundle.registry import resolve_digest

    if not _DIGEST.fullmatch(digest):
        raise HTTPException(404, "no such model")
    models_dir = request.app.state.service.scorer.bundle.folder.parent
    try:
        return open_bundle(models_dir / resolve_digest(models_dir, digest), verify=False)
    except DataError:
        raise HTTPException(404, "no such model") from None


@router.get("/model")
def current_model(request: Request):
    """The model card of the model this app serves."""
    if not signed_in(request):
        return _signin_redirect(request)
    return RedirectResponse(f"/models/{request.app.state.service.scorer.digest}", status_code=303)


@router.get("/models/{digest}")
def model_page(request: Request, digest: str):
    """A bundle's model card (written by `cxr evaluate`) with its figures, and its manifest's facts."""
    if not signed_in(request):
        return _signin_redirect(request)
    from tasks.bundle.bundle import MODEL_CARD
    from tasks.evaluation.model_card import markdown_html

    bundle = _bundle(request, digest)
    card = bundle.folder / MODEL_CARD
    body = None
    if card.is_file():
        body = markdown_html(card.read_text(), "model card", standalone=False).replace(
            'src="figures/', f'src="/models/{bundle.digest}/figures/')
    scorer = request.app.state.service.scorer
    return _page(request, "model.html", {"bundle": bundle, "summary": bundle.summary(), "card": body,
                                         "served": bundle.digest == scorer.digest,
                                         "meaning": scorer.meaning if bundle.digest == scorer.digest else None})


@router.get("/models/{digest}/figures/{name}")
def model_figure(request: Request, digest: str, name: str):
    if not signed_in(request):
        raise HTTPException(401, "sign in first")
    from tasks.bundle.bundle import FIGURES

    if not _FIGURE.fullmatch(name):
        raise HTTPException(404, "no such figure")
    bundle = _bundle(request, digest)
    path = (bundle.folder / FIGURES / name).resolve()
    if not path.is_relative_to(bundle.folder.resolve()) or not path.is_file():
        raise HTTPException(404, "no such figure")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
