"""Running the app with uvicorn: in the foreground (CLI) or in a background thread (Dashboard).

The listening socket is bound before uvicorn starts, so ``port=0`` picks a
free port and the URL is known at once.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

from ..core.sockets import bind_socket, url_of
from ..settings import Settings
from .connections import ConnectionLimits, protocols

logger = logging.getLogger(__name__)



def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    # Header and idle timeouts and a cap per client address (connections.py).
    http, ws = protocols(ConnectionLimits.from_settings(settings))
    return uvicorn.Config(
        app,
        http=http,
        ws=ws,
        log_level=settings.log_level,
        # One cap for every websocket, sized for publishers' frames; the browser
        # endpoint answers messages over max_message_bytes with an `error` itself.
        ws_max_size=max(settings.max_publish_bytes, settings.max_message_bytes),
        ws_per_message_deflate=settings.ws_compression,
        timeout_graceful_shutdown=3,
        lifespan="on",
    )


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread; :meth:`stop` shuts it down."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.sock = bind_socket(settings.host, settings.port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn_config(app, settings))
        self.thread = threading.Thread(target=self._serve, name="attnscope-server", daemon=True)
        self._error: BaseException | None = None

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # reported by start()
            self._error = exc
            logger.exception("dashboard server failed")

    def start(self, timeout: float = 15.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.sock.close()
                raise RuntimeError(f"the dashboard server did not start: {self._error!r}")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()
