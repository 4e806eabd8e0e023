"""The FastAPI application and `cxr app`'s server.

`create_app` loads the model once (through `AppService`) before the server listens, so a
missing or unregistered model is a one-paragraph CLI error, not a broken page. Routers per
resource: app/routers/api.py (JSON), app/routers/pages.py (HTML and pictures).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxr.core.config import Params
from app.security import TOKEN_ENV, check_bind
from app.service import AppService
from tasks.scoring.report import NOT_A_DEVICE

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["NOT_A_DEVICE"] = NOT_A_DEVICE

# Pages load scripts from /static only (inline style attributes draw the probability bars);
# /docs (Swagger UI) keeps FastAPI's own policy.
_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def create_app(params: Params, *, token: str | None = None, models_dir: Path | None = None) -> FastAPI:
    """The app for `params`, with the model loaded; `token` guards the API and the pages when set."""
    service = AppService(params, models_dir=models_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="cxr: AG-CNN chest X-ray scoring", version="1", lifespan=lifespan,
                  description="Upload a radiograph (PNG, JPEG or DICOM) and get the 14 ChestX-ray14 findings' "
                              f"probabilities, operating-threshold flags and the out-of-distribution verdict. {NOT_A_DEVICE}")
    app.state.service = service
    app.state.params = params
    app.state.token = token
    app.state.templates = templates

    from app.routers import api, pages

    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    if not token:
        # Without a token the app trusts only this machine: a page elsewhere that rebinds its
        # own DNS name to 127.0.0.1 gets 400 instead of reading results.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]"],
                           www_redirect=False)

    from app.metrics import instrument

    # /metrics (Prometheus): requests and latency by route, batch sizes, refusals, the model digest.
    instrument(app, service)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if not request.url.path.startswith(("/docs", "/redoc")):
            response.headers.setdefault("Content-Security-Policy", _CSP)
        return response

    def _wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/") or request.url.path == "/healthz"

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if _wants_json(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
        return templates.TemplateResponse(request, "error.html", {"status": exc.status_code, "detail": exc.detail},
                                          status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        if _wants_json(request):
            return JSONResponse({"detail": detail}, status_code=422)
        return templates.TemplateResponse(request, "error.html", {"status": 422, "detail": detail}, status_code=422)

    return app


def serve(params: Params, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Check the bind address against the token, load the model, then serve until stopped."""
    import uvicorn

    token = os.environ.get(TOKEN_ENV) or None
    check_bind(host, token)
    app = create_app(params, token=token)
    print(f"cxr app: model {app.state.service.scorer.digest[:12]} loaded; serving http://{host}:{port}/ "
          f"(API docs at /docs){' with token sign-in' if token else ''}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False, proxy_headers=False)
