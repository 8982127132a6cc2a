"""Browser-borne attacks on a server the user can reach: DNS rebinding and cross-site requests.

:class:`RequestGuard` wraps the whole app (outside :class:`~attnscope.backend.auth.AuthMiddleware`)
and refuses, before any route runs:

- a ``Host`` header that is not a loopback name, the bound address or one of
  ``allowed_hosts`` (400; a websocket upgrade gets 403): a page on a rebound
  domain reaches the server under its own name, so it is refused (as Starlette's
  ``TrustedHostMiddleware`` and Jupyter do). Off on a non-loopback bind unless
  ``allowed_hosts`` is set, and with ``["*"]``. A request with two ``Host``
  headers, or one that is not ``name[:port]`` (``127.0.0.1:80@evil.example``), is
  refused wherever it goes: no browser sends one;
- a state-changing request (POST, PUT, PATCH, DELETE) whose ``Origin`` is not the
  server's own or allowed (403): a form or ``fetch`` from another site;
- a state-changing request with a body or ``Content-Type`` other than
  ``application/json`` (415): what a browser may send cross-site without a
  preflight (``text/plain``, forms) never reaches a route.

Scripts send no ``Origin`` and are unaffected. Health is exempt from the Host
check (load balancers probe it by IP). Threat model: docs/security.md.

>>> host_name("[::1]:8000"), host_name("Example.org:80"), host_name("localhost")
('::1', 'example.org', 'localhost')
>>> host_name("127.0.0.1:8000@evil.example"), host_name("a b"), host_name("::1")
(None, None, None)
>>> allowed_host("127.0.0.2", frozenset()), allowed_host("evil.example", frozenset())
(True, False)
>>> allowed_host("a.dash.example", frozenset({"*.dash.example"}))
True
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import PUBLIC_PATHS, deny_websocket, same_origin

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


# RFC 9110 Host: a DNS name or IPv4 address, or an IPv6 address in brackets; an optional port.
_HOST = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_](?:[a-z0-9_.-]{0,252})))"
                   r"(?::[0-9]{1,5})?")


def host_name(header: str) -> str | None:
    """The name part of a Host header, lower case, without port or IPv6 brackets; None
    when the header is not ``name[:port]``."""
    match = _HOST.fullmatch(header.strip().lower())
    if match is None:
        return None
    return match["ip6"] or match["name"]


def _bind_name(bind: str) -> str:
    """An address to bind (``127.0.0.1``, ``::1``, ``[::1]``) as :func:`host_name` gives it."""
    bind = bind.strip().lower()
    return bind[1:-1] if bind.startswith("[") else bind


def allowed_host(name: str, allowed: frozenset[str]) -> bool:
    """True for loopback names, 127.x.y.z and ``allowed`` (``*.domain`` patterns included)."""
    if name in LOOPBACK_NAMES or name in allowed or name.endswith(".localhost"):
        return True
    if name.startswith("127.") and name.replace(".", "").isdigit():
        return True
    return any(p.startswith("*.") and name.endswith(p[1:]) for p in allowed)


def host_allow_list(bind: str, extra: Iterable[str]) -> frozenset[str] | None:
    """The names accepted besides loopback ones, or None when the Host check is off.

    Off a loopback bind the check is off unless ``extra`` is given, as Jupyter's
    ``allow_remote_access``: clients there use any name of the machine, and the
    token (required off loopback) is what a rebound page cannot have.
    """
    extra = [h.strip().lower() for h in extra]
    loopback = allowed_host(_bind_name(bind), frozenset())
    if "*" in extra or (not loopback and not extra):
        return None
    names = {h if h.startswith("*.") else host_name(h) or h for h in extra}
    if bind not in WILDCARD_BINDS:
        names.add(_bind_name(bind))
    return frozenset(names)


class RequestGuard:
    """ASGI middleware: Host allow-list; Origin and JSON-only checks on state-changing HTTP."""

    def __init__(self, app: ASGIApp, bind: str, allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.hosts = host_allow_list(bind, allowed_hosts)
        self.allowed_origins = tuple(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        name = host_name(host)
        count = sum(k.lower() == b"host" for k, _ in scope["headers"])
        if count > 1 or (name is None and host != ""):
            logger.warning("refused a request with %s", f"{count} Host headers" if count > 1
                           else f"a malformed Host header {host[:100]!r}")
            await self._refuse(scope, receive, send, "malformed host header")
            return
        if self.hosts is not None and scope["path"] not in PUBLIC_PATHS \
                and (name is None or not allowed_host(name, self.hosts)):
            logger.warning("refused a request for host %r (not in the allowed hosts; "
                           "see ATTNSCOPE_ALLOWED_HOSTS)", host[:100])
            await self._refuse(scope, receive, send, "invalid host header")
            return
        if scope["type"] == "http" and scope["method"] in STATE_CHANGING:
            origin = headers.get("origin")
            if origin is not None and not same_origin(origin, host, self.allowed_origins):
                logger.warning("refused a cross-origin %s %s from %r", scope["method"],
                               scope["path"], origin[:100])
                await _deny(send, 403, "cross-origin request refused")
                return
            kind = headers.get("content-type", "").partition(";")[0].strip().lower()
            has_body = headers.get("content-length", "0") not in ("", "0") \
                or "transfer-encoding" in headers
            if (kind or has_body) and kind != "application/json":
                await _deny(send, 415, "state-changing requests take application/json bodies "
                                       "only")
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, detail: str) -> None:
        if scope["type"] == "websocket":
            await deny_websocket(scope, receive, send, 403)
        else:
            await _deny(send, 400, detail)


async def _deny(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
