"""HTTP connections that cost nothing when held open (docs/security.md).

uvicorn closes a keep-alive connection that idles between requests, but waits for
ever for a request's headers, or for a body that stops arriving: a thousand
connections that send nothing held a thousand file descriptors. The protocol
classes of :func:`protocols` (uvicorn's own httptools and websockets protocols,
the ones it picks by default, given to it as ``http`` and ``ws``):

- close a connection whose request headers are not complete ``header_timeout`` s
  after it opened (or after the response to its previous request);
- close one whose request body stops arriving for ``idle_timeout`` s (time the
  server itself stopped reading, to apply back-pressure, does not count);
- answer 503 and close at once a connection from a client address that already
  holds ``max_per_client`` connections, websockets included, so that one client
  cannot take every descriptor while others (a health probe) still get in.

One :class:`ClientConnections` per server, used from the event loop's thread only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

logger = logging.getLogger(__name__)

# A refused address is logged at most this often (an attack opens thousands).
LOG_EVERY_S = 60.0
_BUSY_BODY = json.dumps({"detail": "too many connections from this address; try again "
                                   "later"}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"connection: close\r\nretry-after: 1\r\ncontent-length: "
        + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


@dataclass(frozen=True)
class ConnectionLimits:
    """``Settings.http_header_timeout_s``, ``http_idle_timeout_s``,
    ``max_connections_per_client``."""

    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    max_per_client: int = 128

    @classmethod
    def from_settings(cls, settings: Any) -> ConnectionLimits:
        return cls(settings.http_header_timeout_s, settings.http_idle_timeout_s,
                   settings.max_connections_per_client)


class ClientConnections:
    """Open connections per client address.

    A connection is its transport: the HTTP protocol that upgrades to a websocket
    hands the same transport on, and it stays counted once until it closes.

    >>> counts = ClientConnections(limit=1)
    >>> a, b = object(), object()
    >>> counts.admit(a, "10.0.0.1"), counts.admit(b, "10.0.0.1"), counts.admit(a, "10.0.0.1")
    (True, False, True)
    >>> counts.release(a); counts.admit(b, "10.0.0.1")
    True
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}
        self._owner: dict[int, str] = {}  # id(transport) -> its client address
        self._logged: dict[str, float] = {}  # address -> when its refusal was last logged

    def admit(self, transport: object, address: str) -> bool:
        """Count ``transport`` for ``address``; False (not counted) when it is full."""
        if id(transport) in self._owner:
            return True
        if self.open.get(address, 0) >= self.limit:
            self._log_refusal(address)
            return False
        self._owner[id(transport)] = address
        self.open[address] = self.open.get(address, 0) + 1
        return True

    def release(self, transport: object) -> None:
        address = self._owner.pop(id(transport), None)
        if address is None:
            return
        self.open[address] -= 1
        if not self.open[address]:
            del self.open[address]

    def _log_refusal(self, address: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(address, -LOG_EVERY_S) < LOG_EVERY_S:
            return
        if len(self._logged) > 1024:
            self._logged.clear()
        self._logged[address] = now
        logger.warning("refused connections from %s: it holds %d already "
                       "(ATTNSCOPE_MAX_CONNECTIONS_PER_CLIENT; logged once a minute)",
                       address, self.limit)


def protocols(limits: ConnectionLimits) -> tuple[type[HttpToolsProtocol],
                                                 type[WebSocketsSansIOProtocol]]:
    """uvicorn's HTTP and websocket protocols with ``limits``, sharing one count."""
    counts = ClientConnections(limits.max_per_client)

    class GuardedWebSockets(WebSocketsSansIOProtocol):
        def connection_lost(self, exc: Exception | None) -> None:
            counts.release(self.transport)
            super().connection_lost(exc)

    class GuardedHTTP(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None  # until a request's headers are in
        _idle_timer: asyncio.TimerHandle | None = None  # while its body is coming

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if not counts.admit(transport, self.client[0] if self.client else "?"):
                transport.write(BUSY)
                transport.close()
                return
            self._header_timer = self._later(limits.header_timeout, "headers")

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            counts.release(self.transport)
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._cancel()
            self._idle_timer = self._later(limits.idle_timeout, "body")
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._cancel()
            self._idle_timer = self._later(limits.idle_timeout, "body")
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._cancel()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # the next request's headers, in time
                self._cancel()
                self._header_timer = self._later(limits.header_timeout, "headers")

        def handle_websocket_upgrade(self) -> None:
            self._cancel()  # a websocket has its own keepalive pings
            super().handle_websocket_upgrade()

        def _later(self, seconds: float, waiting_for: str) -> asyncio.TimerHandle:
            return self.loop.call_later(seconds, self._timed_out, waiting_for)

        def _timed_out(self, waiting_for: str) -> None:
            if self.transport.is_closing():
                return
            if waiting_for == "body" and self.flow.read_paused:  # our back-pressure
                self._idle_timer = self._later(limits.idle_timeout, "body")
                return
            logger.debug("closed a connection from %s: no %s in time", self.client,
                         waiting_for)
            self.transport.close()

        def _cancel(self) -> None:
            for timer in (self._header_timer, self._idle_timer):
                if timer is not None:
                    timer.cancel()
            self._header_timer = self._idle_timer = None

    return GuardedHTTP, GuardedWebSockets


__all__ = ["ClientConnections", "ConnectionLimits", "protocols"]
