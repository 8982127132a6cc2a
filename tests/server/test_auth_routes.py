"""Every route needs the token but health: enumerated, so a new route cannot forget it."""

from __future__ import annotations

import re

import pytest
from auth_support import BEARER, TOKEN, ws_status
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import Mount, Route, WebSocketRoute
from stream_support import Served

from attnscope.backend.auth import PUBLIC_PATHS
from attnscope.training.run import RunRegistry


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path) or "/"


def _walk(routes, prefix: str = ""):
    """(full path, route) of every route, through included routers (FastAPI >= 0.165 keeps
    them as ``_IncludedRouter`` entries holding the original router and its prefix)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _walk(inner.routes, prefix + route.include_context.prefix)
        else:
            yield prefix + route.path, route


def _endpoints(app) -> tuple[list[tuple[str, str]], list[str]]:
    """(method, path) of every HTTP route and mount, and the path of every websocket route."""
    http, ws = [], []
    for path, route in _walk(app.routes):
        if isinstance(route, (APIWebSocketRoute, WebSocketRoute)):
            ws.append(_concrete(path))
        elif isinstance(route, (APIRoute, Route)):
            for method in sorted(route.methods or {"GET"}):
                http.append((method, _concrete(path)))
        elif isinstance(route, Mount):
            http.append(("GET", _concrete(path).rstrip("/") + "/"))
        else:  # pragma: no cover - a new kind of route: decide how to check it
            raise AssertionError(f"unknown route type {type(route).__name__}")
    return http, ws


@pytest.fixture(scope="module")
def served() -> Served:
    with Served(RunRegistry(), token=TOKEN) as s:
        yield s


def test_every_http_route_needs_the_token(served: Served) -> None:
    http, _ = _endpoints(served.app)
    paths = {path for _, path in http}
    assert {"/api/v1/runs", "/api/v1/runs/x/scalars", "/api/v1/captures", "/docs",
            "/openapi.json", "/"} <= paths
    assert len(http) >= 12
    for method, path in http:
        bare = served.http.request(method, path)
        if path in PUBLIC_PATHS:
            assert bare.status_code == 200, (method, path)
            continue
        assert bare.status_code == 401, (method, path, bare.status_code)
        if method != "HEAD":
            assert bare.json() == {"detail": "authentication required"}
        authed = served.http.request(method, path, headers=BEARER)
        assert authed.status_code != 401, (method, path)


def test_every_websocket_route_needs_the_token(served: Served) -> None:
    _, ws = _endpoints(served.app)
    assert "/ws" in ws
    base = served.url.replace("http://", "ws://")
    for path in ws:
        assert ws_status(base + path) == 401, path
