"""``/ws/publish``: where ``Dashboard.connect`` publishers deliver their runs (docs/teams.md).

One websocket per training process. The first message is an ``announce``; then
``steps`` batches, binary stream frames and capture results flow in, and
``plan`` messages (whenever what the run's viewers subscribe to changes) and
``capture`` requests flow out. Close codes: 1008 for a run id that belongs to a
local run or an announce that does not validate, 1003 for a message that is not
part of the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..api.deps import RegistryDep
from ..run_base import UnknownRunError
from ..stream.plan import Plan
from .history import HistoryInbox, config_message
from .run import RemoteRun
from .wire import WIRE_VERSION, decode_capture, plan_to_message, unpack_binary

logger = logging.getLogger(__name__)
router = APIRouter()

ANNOUNCE_TIMEOUT_S = 10.0


class Announce(BaseModel):
    """The first message of a publisher."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(pattern="^announce$")
    wire: int = Field(ge=1, le=WIRE_VERSION)
    run: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}$")
    name: str = Field(max_length=256)
    host: str = Field("", max_length=256)
    model: dict[str, Any]
    config: dict[str, Any] = Field(default_factory=dict)
    capture: dict[str, Any] | None = None  # what captures need (remote.captures); None: no captures
    records_history: bool = False  # the publisher records history when the server does
    history: dict[str, Any] | None = None


class _Link:
    """The server's end of one publisher connection: messages go out through a queue."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def send_plan(self, plan: Plan) -> None:
        self.queue.put_nowait(plan_to_message(plan))

    def send_threadsafe(self, message: dict[str, Any]) -> None:
        """Queue ``message`` from any thread (capture requests come from request threads)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, message)

    async def sender(self) -> None:
        while True:
            message = await self.queue.get()
            await self.websocket.send_text(json.dumps(message, separators=(",", ":")))


def _attach_run(registry: Any, hello: Announce) -> RemoteRun:
    try:
        run = registry.get(hello.run)
    except UnknownRunError:
        run = None
    if run is None:
        run = RemoteRun(hello.run, hello.name, hello.model, hello.host, hello.config)
        run.set_capture_info(hello.capture)
        registry.add(run)
    elif not isinstance(run, RemoteRun):
        raise ValueError(f"run: {hello.run!r} is a run of this server, not a remote one; "
                         "choose another run name")
    else:
        run.name, run.host, run.config = hello.name, hello.host, hello.config
        run.set_capture_info(hello.capture)
    return run


@router.websocket("/ws/publish")
async def publish(websocket: WebSocket, registry: RegistryDep) -> None:
    await websocket.accept()
    try:
        raw = await asyncio.wait_for(websocket.receive_text(), ANNOUNCE_TIMEOUT_S)
        hello = Announce.model_validate_json(raw)
        run = _attach_run(registry, hello)
    except (ValidationError, ValueError, KeyError, TimeoutError) as exc:
        message = str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else \
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        with contextlib.suppress(Exception):
            await websocket.send_text(json.dumps({"type": "error", "message": message}))
            await websocket.close(1008, "invalid announce")
        return
    except WebSocketDisconnect:
        return
    link = _Link(websocket)
    ended = False
    run.attach(link, hello.history)
    service = getattr(websocket.app.state, "history", None)
    if service is None or not hello.records_history:
        run.history_inbox = None
    elif run.history_inbox is None:
        run.history_inbox = HistoryInbox(service, run)
    settings = websocket.app.state.settings
    welcome = {"type": "welcome", "run": run.id, "history": config_message(
        None if service is None else service.config, settings.max_publish_bytes)}
    sender = asyncio.create_task(link.sender())
    logger.info("publisher connected: run %r from %s", run.id, hello.host or "?")
    try:
        await websocket.send_text(json.dumps(welcome))
        link.send_plan(run.plan)  # viewers may be waiting already
        ended = await _receive_loop(websocket, run)
    except WebSocketDisconnect:
        pass
    except Exception:
        logger.exception("publisher connection failed (run %r)", run.id)
        with contextlib.suppress(Exception):
            await websocket.close(1011, "internal error")
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        run.detach_link(link, ended)


async def _receive_loop(websocket: WebSocket, run: RemoteRun) -> bool:
    """Feed ``run`` until the publisher leaves; True when it said ``close``."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return False
        data = message.get("bytes")
        if data is not None:
            header, payload = unpack_binary(data)
            if header["kind"] == "capture_result":
                run.captures.receive_chunk(header, payload)
            elif header["kind"] in ("history_stats", "history_snapshot"):
                if run.history_inbox is not None:
                    run.history_inbox.on_binary(header, payload)
            else:
                run.deliver(*decode_capture(header, payload))
            continue
        body = json.loads(message.get("text") or "null")
        kind = body.get("type") if isinstance(body, dict) else None
        if kind == "steps":
            run.apply_steps(body["steps"])
        elif kind == "capture_result":
            run.captures.receive_error(body)
        elif kind == "history_session":
            if run.history_inbox is not None:
                run.history_inbox.on_session(body)
        elif kind == "close":
            await websocket.close(1000)
            return True
        else:
            await websocket.close(1003, "unknown message type")
            return False
