"""The app factory: settings in, a wired FastAPI app out.

Configuration flows one way: :class:`Settings` → :func:`create_app` → app
state → dependencies injected into thin routers. Nothing lives at module
level, so tests build as many independent apps as they like.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline

from app import __version__
from app.api import changes, presets, runs, stream
from app.hub import Hub
from app.limits import BodyLimitMiddleware
from app.manager import RunError, RunManager
from app.security import SecurityMiddleware
from app.settings import Settings
from app.store import Store
from app.web import assets, guide, pages

#: Liveness for a container's health check; the one path besides assets that needs no token.
HEALTH_PATH = "/healthz"


def worker_url(settings: Settings) -> str:
    """Where local workers reach this server: loopback unless bound to one specific address."""
    host = {"0.0.0.0": "127.0.0.1", "localhost": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    return f"ws://{host}:{settings.port}"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.data_dir / "gradwatch.db")
        store.start()
        hub = Hub(store)
        manager = RunManager(settings, store, hub, server_url=lambda: worker_url(settings))
        app.state.store, app.state.hub, app.state.manager = store, hub, manager
        await manager.start()
        try:
            yield
        finally:
            await manager.shutdown()
            store.close()

    app = FastAPIOffline(
        static_url="/static/docs",
        title="gradwatch",
        version=__version__,
        summary="Live GAN and VAE training: watch the saturating generator gradient vanish.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    # Autoescaping is on for every template: run names and errors are user text.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(assets.TEMPLATES_DIR), autoescape=True)
    env.globals["assets"] = assets.ASSETS_URL
    # Every page says what is missing and how to install it (base.html), rather than failing silently.
    env.globals["missing_assets"] = assets.missing_vendor_files
    app.state.templates = Jinja2Templates(env=env)
    # Added first, so it runs inside the security checks: a refused request's body is never read at all.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    # Worker routes skip the user's token: they take the run's own token instead.
    # Static files hold no data, and the login page needs its CSS before there is a cookie. A container's health
    # check has no token: /healthz answers it and says nothing else.
    app.add_middleware(SecurityMiddleware, settings=settings,
                       exempt_prefixes=("/ws/worker/", "/worker/", "/static/", assets.ASSETS_URL + "/", HEALTH_PATH))
    app.include_router(presets.router)
    app.include_router(changes.router)  # before runs: /api/runs/changes is not a run id
    app.include_router(runs.router)
    app.include_router(stream.router)
    app.include_router(assets.vendor_router())
    app.include_router(pages.router)
    app.include_router(guide.router)
    app.mount(assets.ASSETS_URL, StaticFiles(directory=assets.STATIC_DIR), name="assets")

    @app.exception_handler(RunError)
    async def run_error(request: Request, exc: RunError) -> Response:
        if _wants_html(request):
            return app.state.templates.TemplateResponse(
                request, "error.html", {"status": exc.status, "detail": exc.detail}, status_code=exc.status)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each bad input back; a NaN input would then make the
        # error response itself invalid JSON (a 500). Field, message and type are what a client needs.
        errors = [{"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
                  for err in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get(HEALTH_PATH, include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """Up and serving (for a container's HEALTHCHECK): no token needed, so nothing but that is said."""
        return {"status": "ok"}

    @app.get("/api", include_in_schema=False)
    async def index() -> dict[str, Any]:
        return {"name": "gradwatch", "version": __version__, "api": "/api/runs", "docs": "/docs"}

    return app


def _wants_html(request: Request) -> bool:
    """A page navigation (not an API call, not an htmx swap) gets its errors as a page."""
    path = request.url.path
    return (not path.startswith(("/api/", "/ui/")) and "text/html" in request.headers.get("accept", "")
            and "hx-request" not in request.headers)
