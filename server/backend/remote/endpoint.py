"""``/ws/publish``: where ``Dashboard.connect`` publishers deliver their runs (docs/teams.md).

One websocket per training process. The first message is an ``announce``; then
``steps`` batches, binary stream frames, history records and capture results flow
in, and ``plan`` messages (whenever what the run's viewers subscribe to changes)
and ``capture`` requests flow out. Close codes: 1000 after the publisher's
``close``; 1008 for a run id that belongs to a local run or to another publisher,
an announce that does not validate or too many bad messages; 1003 for a message
that is not part of the protocol (not JSON, an unknown type); 1013 when the server
has ``max_publishers`` or ``max_remote_runs`` already, or the run is live on
another connection (the publisher retries). A frame or history record that does
not fit the run's announced layout is answered with an ``error`` and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnected

from ...contract.plan import Plan
from ...contract.wire import WIRE_VERSION, decode_capture, plan_to_message, unpack_binary
from ...core.history_config import HistoryConfig
from ...core.limits import check_numbers
from ...core.run_base import ScalarHistory, UnknownRunError
from ..api.deps import RegistryDep
from .checks import (
    AnnounceLimits,
    FrameError,
    RunBounds,
    check_announce,
    check_frame_header,
    check_steps,
)
from .history import HistoryInbox, config_message
from .run import RemoteRun

logger = logging.getLogger(__name__)
router = APIRouter()

ANNOUNCE_TIMEOUT_S = 10.0
# A publisher sending this many bad messages is broken or hostile: closed with 1008.
MAX_BAD_MESSAGES = 100
# Announced scalar history points at most (a publisher keeps 2048 after thinning).
MAX_HISTORY_POINTS = 100_000
# JSON text from a publisher (announce, steps, ...) is small: 4 MiB holds 1024 layers,
# a 2048-point history and a 50k-token vocabulary. Only binary frames are bigger;
# text past this is refused (1009) before it is parsed.
MAX_TEXT_BYTES = 4 << 20


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
    # The run's secret from an earlier welcome: proves a reconnecting publisher owns the run.
    secret: str | None = Field(None, max_length=256)


class RunTaken(ValueError):
    """The run id belongs to another publisher (live, or dropped and not yet back)."""


class RetryLater(FrameError):
    """Refused for now, not for good: the publisher retries with backoff."""


class RunsFull(RetryLater):
    """Every remote run slot holds a live run."""


class RunLive(RetryLater):
    """The run is live on another connection (its publisher's old one, not yet known to
    be gone: the server notices within its websocket ping timeout, 40 s at most)."""


# Closing a socket the publisher has already closed: what Starlette raises then.
_GONE = (WebSocketDisconnect, WebSocketDisconnected, OSError)


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


def _owns(run: RemoteRun, secret: str | None) -> bool:
    return run.secret is not None and secret is not None and hmac.compare_digest(
        run.secret.encode(), secret.encode())


def _attach_run(registry: Any, hello: Announce, limits: AnnounceLimits,
                max_runs: int) -> RemoteRun:
    """The run ``hello`` publishes, created or taken back (``run.bounds`` from its
    announce); raises ValueError, RunTaken, RetryLater."""
    bounds = check_announce(hello.model, hello.config, hello.capture, limits)
    steps = (hello.history or {}).get("steps")
    if steps is not None and (not isinstance(steps, list) or len(steps) > MAX_HISTORY_POINTS):
        raise FrameError("history.steps", f"at most {MAX_HISTORY_POINTS} points")
    if hello.history is not None:
        check_numbers("history", hello.history)  # steps int64, times and values finite
        try:  # what attach() will read: refuse a malformed history here, not mid-attach
            ScalarHistory.from_dict(hello.history)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise FrameError("history", f"malformed scalar history: {exc}") from None
    try:
        run = registry.get(hello.run)
    except UnknownRunError:
        run = None
    if run is None:
        _make_room(registry, max_runs)
        run = RemoteRun(hello.run, hello.name, hello.model, hello.host, hello.config)
        run.bounds = bounds
        run.set_capture_info(hello.capture)
        # A publisher back after a server restart keeps its secret; a new one gets one.
        run.secret = hello.secret or secrets.token_urlsafe(32)
        registry.add(run)
        return run
    if not isinstance(run, RemoteRun):
        raise ValueError(f"run: {hello.run!r} is a run of this server, not a remote one; "
                         "choose another run name")
    if not _owns(run, hello.secret):
        if run.status != "ended":  # live, or idle: its publisher may come back
            raise RunTaken(f"run: {hello.run!r} belongs to another publisher "
                           f"({run.host or 'unknown host'}, {run.status}); choose another run "
                           "name, or delete the run once it has ended")
        run.secret = secrets.token_urlsafe(32)  # an ended run id is free to reuse
    elif run.link is not None:  # one live connection per run: the newest waits its turn
        raise RunLive("run", f"run {hello.run!r} is live on another connection of its "
                      "publisher; retry once that one is gone")
    run.name, run.host, run.config = hello.name, hello.host, hello.config
    run.bounds = bounds
    run.set_capture_info(hello.capture)
    return run


class _Count:
    """Publisher connections held now (one per app)."""

    def __init__(self) -> None:
        self.value = 0


@router.websocket("/ws/publish")
async def publish(websocket: WebSocket, registry: RegistryDep) -> None:
    await websocket.accept()
    state = websocket.app.state
    settings = state.settings
    count = getattr(state, "publisher_count", None)
    if count is None:
        count = state.publisher_count = _Count()
    if count.value >= settings.max_publishers:
        logger.warning("refused a publisher: %d connected (ATTNSCOPE_MAX_PUBLISHERS)",
                       count.value)
        await websocket.close(1013, "too many publishers; try again later")
        return
    count.value += 1
    try:
        await _publish(websocket, registry, settings)
    finally:
        count.value -= 1


async def _publish(websocket: WebSocket, registry: Any, settings: Any) -> None:
    try:
        raw = await asyncio.wait_for(websocket.receive_text(), ANNOUNCE_TIMEOUT_S)
        if len(raw) > MAX_TEXT_BYTES:
            await _refuse_large(websocket, "announce", len(raw))
            return
        hello = Announce.model_validate_json(raw)
        run = _attach_run(registry, hello, AnnounceLimits.from_settings(settings),
                          settings.max_remote_runs)
    except (ValidationError, ValueError, KeyError, TypeError, AttributeError,
            TimeoutError) as exc:
        message = (str(exc).splitlines() or [f"no announce ({type(exc).__name__})"])[0] \
            if not isinstance(exc, ValidationError) else \
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        logger.warning("refused a publisher: %s", message[:300])
        reason = "run taken" if isinstance(exc, RunTaken) else "invalid announce"
        answer = {"type": "error", "message": message}
        if isinstance(exc, RetryLater):  # not final: the publisher retries with backoff
            answer["retry"] = True
            reason = "run live elsewhere" if isinstance(exc, RunLive) else "too many runs"
        with contextlib.suppress(*_GONE):
            await websocket.send_text(json.dumps(answer))
            await websocket.close(1013 if isinstance(exc, RetryLater) else 1008, reason)
        return
    except WebSocketDisconnect:
        return
    link = _Link(websocket)
    ended = False
    run.attach(link, hello.history)
    service = getattr(websocket.app.state, "history", None)
    if service is None or not hello.records_history:
        run.history_inbox = None
    else:
        bounds = _history_bounds(run.bounds, service.config)
        if run.history_inbox is None:
            run.history_inbox = HistoryInbox(service, run, bounds)
        run.history_inbox.bounds = bounds
    welcome = {"type": "welcome", "run": run.id, "secret": run.secret,
               "history": config_message(None if service is None else service.config,
                                         settings.max_publish_bytes)}
    sender = asyncio.create_task(link.sender())
    logger.info("publisher connected: run %r from %s", run.id, hello.host or "?")
    alerts = None if service is None else getattr(service, "alerts", None)

    def alert(message: dict[str, Any]) -> None:
        """An alert of this run (the history writer's thread): to its publisher, whose
        training script's ``on_alert`` callbacks get it."""
        if message.get("run") == run.id:
            link.send_threadsafe(message)  # its "type" is "alert"

    if alerts is not None:
        alerts.listeners.append(alert)
    try:
        await websocket.send_text(json.dumps(welcome))
        link.send_plan(run.plan)  # viewers may be waiting already
        ended = await _receive_loop(websocket, run, link)
        if ended:
            logger.info("publisher of run %r closed the run", run.id)
            with contextlib.suppress(*_GONE):  # it may have closed its socket already
                await websocket.close(1000)
    except _GONE:  # the publisher's socket went away: its run is idle
        pass
    except Exception:
        logger.exception("publisher connection failed (run %r)", run.id)
        with contextlib.suppress(*_GONE):
            await websocket.close(1011, "internal error")
    finally:
        if alerts is not None and alert in alerts.listeners:
            alerts.listeners.remove(alert)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        run.detach_link(link, ended)


def _history_bounds(bounds: RunBounds, config: HistoryConfig) -> RunBounds:
    """The run's bounds with what its history records may hold: the server's probe
    samples and metadata limit; snapshots pooled to the server's side, or to the
    publishers' default when larger (the welcome does not tell publishers the side)."""
    side = max(config.snapshot_max_side, HistoryConfig.snapshot_max_side)
    return bounds.with_history(config.probe_samples, side, config.max_meta_bytes)


async def _receive_loop(websocket: WebSocket, run: RemoteRun, link: _Link) -> bool:
    """Feed ``run`` until the publisher leaves; True when it said ``close``. A message that
    does not fit is answered with an ``error`` and dropped (closed with 1008 past
    MAX_BAD_MESSAGES); text that is not JSON closes with 1003."""
    bad = 0
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return False
        try:
            if (data := message.get("bytes")) is not None:
                _receive_binary(run, data)
                continue
            text = message.get("text") or "null"
            if len(text) > MAX_TEXT_BYTES:
                await _refuse_large(websocket, "text message", len(text))
                return False
            try:
                body = json.loads(text)
            except (ValueError, RecursionError):
                logger.warning("publisher of run %r sent text that is not JSON; closed with "
                               "1003", run.id)
                link.queue.put_nowait({"type": "error", "message": "messages must be JSON"})
                await asyncio.sleep(0.05)  # let the sender deliver the error first
                await websocket.close(1003, "messages must be JSON")
                return False
            kind = body.get("type") if isinstance(body, dict) else None
            if kind == "steps":
                run.apply_steps(check_steps(body.get("steps")))
            elif kind == "capture_result":
                run.captures.receive_error(body)
            elif kind == "history_session":
                if run.history_inbox is not None:
                    run.history_inbox.on_session(body)
            elif kind == "close":
                return True
            else:
                await websocket.close(1003, "unknown message type")
                return False
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
                RecursionError) as exc:  # RecursionError: a frame header nested too deep
            # Client input, not a server fault: one line, an error back, the message dropped.
            bad += 1
            if bad == 1 or bad % 10 == 0:
                logger.warning("publisher of run %r: dropped a bad message (%d so far): %s",
                               run.id, bad, str(exc)[:200])
            link.queue.put_nowait({"type": "error", "field": getattr(exc, "field", None),
                                   "message": str(exc)[:500]})
            if bad >= MAX_BAD_MESSAGES:
                await asyncio.sleep(0.05)
                await websocket.close(1008, "too many bad messages")
                return False


async def _refuse_large(websocket: WebSocket, what: str, size: int) -> None:
    message = f"{what} of {size} characters is over the {MAX_TEXT_BYTES}-byte limit"
    logger.warning("publisher: %s; closed with 1009", message)
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_text(json.dumps({"type": "error", "message": message}))
        await websocket.close(1009, "message too big")


def _make_room(registry: Any, max_runs: int) -> None:
    """Forget the oldest ended (then idle) remote runs until a new one fits."""
    remote = [r for r in registry.list() if isinstance(r, RemoteRun)]
    while len(remote) >= max_runs:
        spare = [r for r in remote if r.status == "ended"] or \
            [r for r in remote if r.status == "idle"]
        if not spare:
            raise RunsFull("run", f"this server holds {len(remote)} live remote runs "
                           "(ATTNSCOPE_MAX_REMOTE_RUNS); try again later")
        oldest = min(spare, key=lambda r: r.started)
        registry.remove(oldest.id)
        remote.remove(oldest)
        logger.info("forgot remote run %r (%s) to make room", oldest.id, oldest.status)


def _receive_binary(run: RemoteRun, data: bytes) -> None:
    header, payload = unpack_binary(data)
    if header["kind"] == "capture_result":
        run.captures.receive_chunk(header, payload)
    elif header["kind"] in ("history_stats", "history_snapshot"):
        if run.history_inbox is not None:
            run.history_inbox.on_binary(header, payload)
    else:
        check_frame_header(run.bounds, header, len(payload))
        run.deliver(*decode_capture(header, payload))
