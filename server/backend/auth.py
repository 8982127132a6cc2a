"""Access control, as Jupyter does it: a token for every route but health, checked in one place.

:class:`AuthMiddleware` wraps the whole ASGI app, so every REST route, the
websockets and the page are covered, including routes added later (see
``tests/server/test_auth_routes.py``). A request is let in when it carries the
token as

- an ``Authorization: Bearer <token>`` header (scripts, publishers),
- a ``?token=<token>`` query parameter (the printed URL): the response then
  sets an HttpOnly, SameSite=Strict cookie, and the parameter is removed from
  the request before anything downstream (access logs included) sees it,
- that cookie (the page's own fetches and websocket, after the first visit).

A browser (a GET asking for HTML) is answered as a person: without the token it gets
a login page (paste the token) instead of JSON; with a right ``?token=`` it is sent
on to the same address without it (303 and the cookie), so the token leaves the
address bar and the history.

Without a token configured (the loopback default) every request is let in.
Whatever the token, a websocket upgrade whose ``Origin`` is not the server's
own (or one of ``allowed_origins``) is refused: a web page elsewhere cannot
drive the server through the visitor's browser. Tokens are compared in
constant time and never logged; a refusal says nothing about why.

>>> cookie_value("secret-token-0123456789") == cookie_value("secret-token-0123456789")
True
>>> cookie_value("secret-token-0123456789") == "secret-token-0123456789"
False
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
from collections.abc import Iterable
from contextvars import ContextVar
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

COOKIE_NAME = "attnscope_token"
# Paths reachable without a token: liveness for compose healthchecks and load balancers.
PUBLIC_PATHS = frozenset({"/api/v1/health"})
_UNAUTHORIZED = json.dumps({"detail": "authentication required"}).encode()
# Set in the connection's task when this middleware refuses an upgrade (see _QuietRefusals).
_refused_upgrade: ContextVar[bool] = ContextVar("attnscope_refused_upgrade", default=False)


class _QuietRefusals(logging.Filter):
    """Drops uvicorn's "ASGI callable returned without completing handshake" error for
    upgrades this middleware refused on purpose with an HTTP response: uvicorn (0.30+)
    logs it after every ``websocket.http.response`` although the 401/403 went out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_refused_upgrade.get() and
                    record.getMessage().startswith("ASGI callable returned without completing"))


_QUIET_REFUSALS = _QuietRefusals()


def cookie_value(token: str) -> str:
    """What the cookie holds: an HMAC of the token, so a leaked cookie is not the token."""
    return hmac.new(token.encode(), b"attnscope-session-v1", hashlib.sha256).hexdigest()


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _cookie(headers: dict[str, str]) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # a malformed Cookie header is just not a session
        return None
    morsel = jar.get(COOKIE_NAME)
    return None if morsel is None else morsel.value


def same_origin(origin: str, host: str | None, allowed: Iterable[str] = ()) -> bool:
    """True when ``origin`` (an Origin header) names this server (its Host header) or is allowed.

    >>> same_origin("http://10.0.0.5:8000", "10.0.0.5:8000")
    True
    >>> same_origin("https://evil.example", "10.0.0.5:8000")
    False
    """
    if origin.rstrip("/") in {a.rstrip("/") for a in allowed}:
        return True
    parts = urlsplit(origin)
    return bool(host) and parts.scheme in ("http", "https") and parts.netloc == host


class AuthMiddleware:
    """ASGI middleware: token check on HTTP and websocket scopes, Origin check on websockets.

    ``token`` None lets every request in (the Origin check stays).
    ``allowed_origins``: extra websocket origins, e.g. a reverse proxy's public URL.
    """

    def __init__(self, app: ASGIApp, token: str | None,
                 allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.token = token
        self.cookie = None if token is None else cookie_value(token)
        self.allowed_origins = tuple(allowed_origins)
        logging.getLogger("uvicorn.error").addFilter(_QUIET_REFUSALS)  # once: same object

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if scope["type"] == "websocket":
            origin = headers.get("origin")
            if origin is not None and not same_origin(origin, headers.get("host"),
                                                      self.allowed_origins):
                logger.warning("refused a websocket from foreign origin %r", origin)
                await deny_websocket(scope, receive, send, 403)
                return
        if self.token is None or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        tried = "token=" in scope.get("query_string", b"").decode("latin-1")
        verdict = self._check(scope, headers)
        browser = _wants_html(scope, headers)
        if verdict is None:
            if scope["type"] == "websocket":
                await deny_websocket(scope, receive, send, 401)
            elif browser:
                await _login_page(scope, send, wrong=tried)
            else:
                await _deny_http(send)
            return
        if verdict == "query" and scope["type"] == "http":
            send = self._setting_cookie(scope, send)
            if browser:  # the same address without the token, now that the cookie holds it
                await _see_other(scope, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope, headers: dict[str, str]) -> str | None:
        """How the request proved it has the token ("header", "query", "cookie"), or None."""
        assert self.token is not None and self.cookie is not None
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and _equal(value.strip(), self.token):
            return "header"
        query = scope.get("query_string", b"").decode("latin-1")
        if "token=" in query:
            pairs = parse_qsl(query, keep_blank_values=True)
            given = [v for k, v in pairs if k == "token"]
            # Downstream (routes, uvicorn's access log) never sees the token.
            scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "token"]).encode()
            if given and _equal(given[-1], self.token):
                return "query"
        cookie = _cookie(headers)
        if cookie is not None and _equal(cookie, self.cookie):
            return "cookie"
        return None

    def _setting_cookie(self, scope: Scope, send: Send) -> Send:
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        header = (f"{COOKIE_NAME}={self.cookie}; Path=/; HttpOnly; SameSite=Strict"
                  f"{secure}").encode("latin-1")

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"set-cookie", header)]}
            await send(message)

        return send_with_cookie


def _wants_html(scope: Scope, headers: dict[str, str]) -> bool:
    """A browser navigating: a GET (or HEAD) that accepts HTML."""
    return scope["type"] == "http" and scope.get("method") in ("GET", "HEAD") \
        and "text/html" in headers.get("accept", "")


def _address(scope: Scope) -> str:
    """The request's path and query (the token already removed by ``_check``)."""
    query = scope.get("query_string", b"").decode("latin-1")
    return scope.get("path", "/") + (f"?{query}" if query else "")


async def _see_other(scope: Scope, send: Send) -> None:
    location = _address(scope).encode("latin-1", "replace")
    await send({"type": "http.response.start", "status": 303, "headers": [
        (b"location", location), (b"cache-control", b"no-store"),
        (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attnscope: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body {{ margin: 0; min-height: 100vh; display: grid; place-items: center; background: #0f1117;
  color: #d7dae0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; }}
form {{ background: #171a22; border: 1px solid #2a2f3a; border-radius: 10px; padding: 28px 32px;
  width: min(30em, 90vw); }}
h1 {{ font-size: 20px; margin: 0 0 8px; }} h1 span {{ color: #21918c; }}
p {{ color: #8a93a6; margin: 0 0 16px; }} .wrong {{ color: #ff4d6d; }}
input, button {{ font: inherit; color: inherit; background: #222733; border: 1px solid #2a2f3a;
  border-radius: 6px; padding: 6px 10px; }}
input[type=password] {{ width: 100%; margin-bottom: 12px; }}
button {{ border-color: #21918c; }} code {{ color: #d7dae0; }}
</style></head><body>
<form method="get" action="{action}">
<h1>attn<span>scope</span></h1>
<p>This dashboard needs its access token: the one in the URL the server printed
(<code>?token=...</code>), or <code>$ATTNSCOPE_TOKEN</code>.</p>
{wrong}<input type="password" name="token" aria-label="access token" placeholder="access token"
 autocomplete="current-password" autofocus required>
{hidden}<button type="submit">Open the dashboard</button>
</form></body></html>
"""


async def _login_page(scope: Scope, send: Send, wrong: bool) -> None:
    """401 with a page that asks for the token (and keeps the address's other parameters)."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">\n'
                     for k, v in pairs if k != "token")
    body = _LOGIN.format(
        action=html.escape(scope.get("path", "/")), hidden=hidden,
        wrong='<p class="wrong" role="alert">That token is not right.</p>\n' if wrong else "",
    ).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"text/html; charset=utf-8"), (b"www-authenticate", b"Bearer"),
        (b"cache-control", b"no-store"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _deny_http(send: Send) -> None:
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
        (b"content-length", str(len(_UNAUTHORIZED)).encode())]})
    await send({"type": "http.response.body", "body": _UNAUTHORIZED})


async def deny_websocket(scope: Scope, receive: Receive, send: Send, status: int) -> None:
    """Refuse an upgrade with an HTTP status where the server can, else close with 1008."""
    _refused_upgrade.set(True)
    await receive()  # websocket.connect
    extensions: dict[str, Any] = scope.get("extensions") or {}
    if "websocket.http.response" in extensions:
        body = _UNAUTHORIZED if status == 401 else b'{"detail": "forbidden"}'
        await send({"type": "websocket.http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "websocket.close", "code": 1008, "reason": ""})
