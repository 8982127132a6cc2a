"""Helpers for the auth tests: a served app with a token, and websocket handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Iterator
from typing import Any

import websockets

TOKEN = "s3cret-token-for-tests-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def log_of(name: str) -> Iterator[io.StringIO]:
    """What logger ``name`` writes inside the block. Enter it after the server started:
    uvicorn configures its loggers then."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def ws_status(url: str, headers: dict[str, str] | None = None, origin: str | None = None) -> int:
    """The HTTP status of a websocket handshake: 101 when accepted (then closed)."""

    async def attempt() -> int:
        try:
            ws = await websockets.connect(url, additional_headers=headers or {},
                                          origin=origin, open_timeout=5)
        except websockets.InvalidStatus as exc:
            return exc.response.status_code
        hello: Any = await asyncio.wait_for(ws.recv(), 5)
        await ws.close()
        assert '"hello"' in hello
        return 101

    return asyncio.run(asyncio.wait_for(attempt(), 15))
