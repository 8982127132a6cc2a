"""``GET /ws``: the live stream (docs/protocol.md).

The receive loop parses client messages and answers them; a per-socket sender
task (see :mod:`attnscope.backend.hub`) pushes data. Close codes: 1003 for data the
protocol does not accept (non-JSON text, JSON nested too deep, binary), sent
after an ``error`` message saying why; 1013 when the server has its maximum
number of sockets; 1011 only on a fault of the server itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ..contract.protocol import ProtocolError, parse_subscribe
from .api.deps import HubDep
from .hub import Connection, Hub

logger = logging.getLogger(__name__)
router = APIRouter()


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@router.websocket("/ws")
async def stream(websocket: WebSocket, hub: HubDep) -> None:
    await websocket.accept()
    if hub.full:
        await websocket.close(1013, "too many connections; try again later")
        return
    conn = hub.connect(websocket)
    try:
        await conn.send_json(hub.hello())
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            reply = _handle(hub, conn, message)
            if reply is not None:
                await conn.send_json(reply)
    except _Close as close:
        logger.info("closed a viewer websocket with %d: %s", close.code, close.reason)
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await conn.send_json(ProtocolError(None, close.reason).to_message())
        await conn.close(close.code, close.reason)
    except WebSocketDisconnect:
        pass
    except Exception:
        logger.exception("websocket failed")
        await conn.close(1011, "internal error")
    finally:
        await hub.disconnect(conn)


def _handle(hub: Hub, conn: Connection, message: dict[str, Any]) -> dict[str, Any] | None:
    """The reply to one client message, or None; raises _Close for fatal input."""
    text = message.get("text")
    if text is None:
        raise _Close(1003, "binary messages are not accepted; send JSON text")
    limit = hub.settings.max_message_bytes
    if len(text) > limit // 4 and len(text.encode()) > limit:
        return ProtocolError(None, f"message of {len(text.encode())} bytes is over the "
                                   f"{limit}-byte limit").to_message()
    try:
        data = json.loads(text)
    except ValueError:
        raise _Close(1003, "messages must be JSON text") from None
    except RecursionError:  # the C parser's guard against deep nesting: input, not a fault
        raise _Close(1003, "JSON nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return ProtocolError("type", "every message must be a JSON object with a string "
                                     "'type' field").to_message()
    kind = data["type"]
    try:
        if kind == "subscribe":
            return hub.subscribe(conn, parse_subscribe(data)).to_message()
        if kind == "unsubscribe":
            hub.unsubscribe(conn)
            return {"type": "unsubscribed"}
        if kind == "ping":
            return {"type": "pong"}
    except ProtocolError as exc:
        return exc.to_message()
    return ProtocolError("type", f"unknown message type {kind!r}; expected subscribe, "
                                 "unsubscribe or ping").to_message()
