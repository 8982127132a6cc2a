"""``create_app(settings, registry)``: the FastAPI application.

Routes: ``/api/v1/...`` (REST, see :mod:`attnscope.backend.api`), ``/ws`` (the stream,
docs/protocol.md), ``/vendor/plotly.min.js`` (from the installed ``plotly``
package: no CDN), ``/export/standalone.html`` (the standalone page without data, for
the page's HTML export) and the page at ``/``: package data ``attnscope.frontend``, found
with :mod:`importlib.resources` (in the wheel, or ``frontend/`` of a checkout).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..core.assets import frontend_dir, plotly_js_path
from ..core.run_base import RunRegistry
from ..core.standalone import shell as standalone_shell
from ..settings import Settings
from .alerts.router import router as alerts_router
from .api import api_router
from .api.errors import validation_error
from .auth import AuthMiddleware
from .captures.pinned import PinnedCaptures
from .captures.pins_router import router as pins_router
from .captures.requests import CaptureLimits
from .captures.router import build_router as build_captures_router
from .captures.store import CaptureStore, StoreLocked, open_store
from .guard import RequestGuard
from .history import writer as history_writer
from .history.browse import restore_recorded_runs
from .history.heads import router as heads_router
from .history.router import router as history_router
from .hub import Hub
from .remote.endpoint import router as publish_router
from .ws import router as ws_router

logger = logging.getLogger(__name__)



def _open_capture_store(settings: Settings) -> CaptureStore | None:
    """The capture store, or None (captures answer 503) when another process owns it."""
    try:
        return open_store(settings)
    except StoreLocked as exc:
        logger.warning("captures disabled: %s (set ATTNSCOPE_DATA_DIR to a folder of its own)",
                       exc)
        return None


def create_app(settings: Settings | None = None, registry: RunRegistry | None = None) -> FastAPI:
    """The app serving ``registry``'s runs (an empty registry if None)."""
    settings = settings if settings is not None else Settings()
    registry = registry if registry is not None else RunRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub = Hub(registry, settings)
        await hub.start()
        app.state.hub = hub
        app.state.capture_store = _open_capture_store(settings)
        # Pinned inputs, captured again every k steps (None without a store: pins answer 503).
        app.state.pins = None if app.state.capture_store is None else \
            PinnedCaptures.from_settings(registry, app.state.capture_store, settings).start()
        app.state.history = history_writer.start(settings, registry)  # None: off, or dir in use
        if app.state.history is not None:  # runs of earlier processes, browsable as they were
            restore_recorded_runs(registry, app.state.history)
        hub.heads_feed.history = app.state.history
        try:
            yield
        finally:
            await hub.stop()
            if app.state.pins is not None:
                app.state.pins.close()
            if app.state.capture_store is not None:
                app.state.capture_store.close()
            if app.state.history is not None:
                app.state.history.close()

    app = FastAPI(title="attnscope", version=__version__, lifespan=lifespan,
                  summary="A live window into a transformer while it trains.")
    app.state.settings = settings
    app.state.runs = registry
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(history_router)  # before api_router: its /runs/{id:path} takes all
    app.include_router(heads_router)  # /runs/{id}/heads: the same
    app.include_router(alerts_router)  # /runs/{id}/alerts: the same
    app.include_router(api_router)
    app.include_router(build_captures_router(CaptureLimits.from_settings(settings)))
    app.include_router(pins_router)  # /api/v1/pins: inputs captured every k steps
    app.include_router(ws_router)
    app.include_router(publish_router)  # /ws/publish: Dashboard.connect publishers
    # Outermost: every route (REST, websockets, the page) needs the token but health.
    app.add_middleware(AuthMiddleware, token=settings.token_value,
                       allowed_origins=settings.allowed_origins)
    # Outside auth: Host allow-list, Origin and JSON-only on state-changing requests.
    app.add_middleware(RequestGuard, bind=settings.host, allowed_hosts=settings.allowed_hosts,
                       allowed_origins=settings.allowed_origins)

    plotly_js = plotly_js_path()

    @app.api_route("/vendor/plotly.min.js", methods=["GET", "HEAD"], include_in_schema=False)
    def vendor_plotly() -> FileResponse:
        if plotly_js is None:
            raise HTTPException(404, detail="plotly.min.js not found in the installed plotly")
        return FileResponse(plotly_js, media_type="text/javascript")

    @app.get("/export/standalone.html", include_in_schema=False)
    def export_shell() -> HTMLResponse:
        # The page's "HTML" export fills this in with the data on screen (docs/standalone.md).
        return HTMLResponse(standalone_shell())

    page = frontend_dir()
    if page is not None:
        app.mount("/", StaticFiles(directory=page, html=True), name="frontend")
    else:  # pragma: no cover - an install without the page
        logger.warning("the page (package attnscope.frontend) is not installed; "
                       "serving the API only")
    return app
