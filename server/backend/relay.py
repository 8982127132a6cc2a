"""The relay process of ``Dashboard.connect``: ``python -m attnscope.backend.relay --fds ...``.

The training process keeps the capture path (:mod:`attnscope.training.link`) and hands
what it produces to this process through the shared-memory channel, as it does to its own
server process; this process does the rest of what a publisher does (docs/teams.md) over
one websocket to the team server's ``/ws/publish``:

- frames: sample copies arrive as events; their attention, statistics and views are
  computed here (a worker thread) and sent as wire frames, at most ``buffer_frames``
  waiting (the oldest dropped and counted);
- steps: batched every ``STEPS_PERIOD_S``; the scalar history is kept here and sent in
  the announce of each (re)connection, so the server's copy continues where it stopped;
- history: records go into a :class:`~attnscope.backend.remote.history.HistoryOutbox`, which
  computes statistics and snapshots and sends them, bounded while the server is away;
- the server's ``plan``, ``capture`` requests and welcome's history config go down to the
  training process; capture results come up and leave as wire chunks;
- the connection: reconnects with exponential backoff (0.25 s doubling to 10 s); its state
  goes down as ``link`` messages (``{connected, connections, refused, dropped,
  history_dropped}``) for the training process's
  :class:`~attnscope.training.connect.RemotePublisher`.

It exits when the run's ``close`` has been sent, or when the training process is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import deque
from typing import Any

import websockets

from ..contract.channel import Channel, Message
from ..contract.messages import read_frames, read_snapshot, read_step
from ..contract.protocol import pack
from ..contract.wire import publish_url
from ..core.captured import deferred_captures
from ..core.jsonsafe import json_safe
from ..core.run_base import ScalarHistory
from ..core.stats import valid_key_counts
from .child import run_process

logger = logging.getLogger("attnscope.relay")

BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0
# At most this many steps wait to be sent; the scalar history sent on reconnection
# covers anything dropped.
MAX_PENDING_STEPS = 4096
# Steps (their scalars) leave in batches at most this often.
STEPS_PERIOD_S = 0.1


class Relay:
    """One run's relay (see the module docstring); everything runs on one event loop."""

    def __init__(self, channel: Channel, boot: dict[str, Any], hello: dict[str, Any]) -> None:
        self.channel = channel
        self.url = str(boot["url"])
        self.ws_url = publish_url(self.url)
        self.token = boot.get("token")
        self.hello = hello
        self.history = ScalarHistory.from_dict(hello.get("history") or {})
        self.frames: deque[bytes] = deque(maxlen=int(boot.get("buffer_frames", 256)))
        self.steps: deque[list[Any]] = deque(maxlen=MAX_PENDING_STEPS)
        self.answers: deque[bytes | str] = deque()
        self.dropped = 0
        self.connections = 0
        self.connected = False
        self.refused: str | None = None
        self.error: str | None = None  # the last connection error worth the user's eye
        self.error_level = logging.WARNING
        self.secret: str | None = None
        self.closing = False
        self.gone = False  # the training process is gone
        self.outbox: Any = None  # a HistoryOutbox while the server records history
        self._sessions: dict[str, str] = {}
        self._history_config: dict[str, Any] | None = None
        self._records_history = bool(hello.get("records_history", True))
        self._wake = asyncio.Event()
        self._steps_sent = 0.0
        self._capture_timers: dict[str, asyncio.TimerHandle] = {}
        self._cpu = 0.0  # CPU spent here for the run's frames, not yet reported down
        self._cpu_history = 0.0  # ... and for its history

    # -- to the training process -------------------------------------------------------

    def tell(self, kind: str, header: dict[str, Any]) -> None:
        if not self.channel.peer_gone:
            self.channel.send(kind, header)

    def report(self) -> None:
        """The connection's state, for the training process's ``RemotePublisher``."""
        self.tell("link", {"connected": self.connected, "connections": self.connections,
                           "refused": self.refused, "dropped": self.dropped,
                           "history_dropped": 0 if self.outbox is None else self.outbox.dropped,
                           "error": self.error, "error_level": self.error_level})

    # -- from the training process ---------------------------------------------------------

    async def receive(self, message: Message) -> None:
        kind, body = message.kind, message.header
        if kind == "steps":
            for row in body["steps"]:
                step, t, scalars = row[0], row[1], row[2]
                values = {str(k): float("nan") if v is None else float(v)
                          for k, v in scalars.items()}
                if step is not None and values:
                    self.history.append(int(step), float(t), values)
                if self.connected:
                    self.steps.append(row)
        elif kind == "frames":
            if self.connected:
                encoded = await asyncio.to_thread(self._encode_frames, body, message.tensors)
                for frame in encoded:
                    if len(self.frames) == self.frames.maxlen:
                        self.dropped += 1
                    self.frames.append(frame)
        elif kind == "history_session":
            if self.outbox is not None:
                self._sessions[str(body["session"])] = self.outbox.new_session(
                    self.hello["run"], body.get("name"), dict(body.get("meta") or {}))
        elif kind in ("history_step", "history_snapshot"):
            self._history_item(kind, body, message)
        elif kind == "capture_started":
            timer = self._capture_timers.pop(str(body.get("id")), None)
            if timer is not None:
                timer.cancel()
        elif kind == "capture_result":
            data = message.tensors["bytes"].numpy().tobytes()
            self.answers.append(pack({"kind": "capture_result", **body}, data))
        elif kind == "capture_error":
            self.answers.append(json.dumps({"type": "capture_result", **body}))
        elif kind == "close":
            self.closing = True
        self._wake.set()

    def _encode_frames(self, body: dict[str, Any], tensors: dict[str, Any]) -> list[bytes]:
        """Wire frames of a ``frames`` message (computed here: a worker thread)."""
        from ..contract.wire import encode_capture

        cpu = time.thread_time()
        out = []
        for cap in read_frames(body, tensors, deferred_captures):
            valid = None
            data = cap.wait()
            if cap.kind == "head_stats" and cap.masks is not None:
                L, S = data.shape[-2:]
                valid = valid_key_counts(cap.masks, cap.sample, L, S)
            out.append(encode_capture(cap, valid))
        self._cpu += time.thread_time() - cpu
        return out

    def _history_messages(self) -> list[bytes | str]:
        """What the history outbox has to send, computed here (a worker thread)."""
        cpu = time.thread_time()
        try:
            return [] if self.outbox is None else self.outbox.messages(now=self.closing)
        finally:
            self._cpu_history += time.thread_time() - cpu

    def _history_item(self, kind: str, body: dict[str, Any], message: Message) -> None:
        if self.outbox is None:
            return
        item = read_step(body, message.tensors) if kind == "history_step" \
            else read_snapshot(body, message.tensors)
        session = self._sessions.get(item.session)
        if session is None:
            return
        item.session = session
        self.outbox.submit(item)

    # -- the websocket --------------------------------------------------------------------

    def _announce(self) -> str:
        hello = self.hello
        return json.dumps({
            "type": "announce", "wire": 1, "run": hello["run"], "name": hello["name"],
            "host": hello.get("host", ""), "model": hello["model"],
            "config": hello.get("config") or {}, "capture": hello.get("capture"),
            "records_history": self._records_history, "history": self.history.to_dict(),
            "secret": self.secret,
        }, separators=(",", ":"), allow_nan=False)

    async def run(self) -> None:
        backoff = BACKOFF_START_S
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        while not self.closing and not self.gone:
            try:
                async with websockets.connect(self.ws_url, additional_headers=headers,
                                              open_timeout=5, max_size=None,
                                              compression=None) as ws:
                    backoff = BACKOFF_START_S
                    await self._session(ws)
            except websockets.InvalidStatus as exc:
                status = exc.response.status_code
                level = logging.ERROR if status in (401, 403) else logging.WARNING
                self.error = (f"the attnscope server at {self.url} refused the publisher "
                              f"(HTTP {status}){': check the token' if status == 401 else ''}")
                self.error_level = level
                logger.log(level, "%s", self.error)
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                logger.info("publisher for run %r: %s; retrying in %.2g s", self.hello["run"],
                            exc, backoff)
            finally:
                self._disconnected()
            if self.closing or self.gone:
                break
            await self._sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _sleep(self, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while not self.closing and not self.gone:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def _disconnected(self) -> None:
        self.connected = False
        self.frames.clear()
        self.steps.clear()
        self.answers.clear()  # the server failed those requests when the link dropped
        self.tell("plan", {"type": "plan", "interval": 1.0, "sources": [], "needs": {},
                           "scalars": False})
        self.report()  # also the first attempt's outcome (unreachable, refused)

    async def _session(self, ws: Any) -> None:
        self.steps.clear()
        await ws.send(self._announce())
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if welcome.get("type") != "welcome" and welcome.get("retry"):
            logger.warning("attnscope server: %s", welcome.get("message"))
            return
        if welcome.get("type") != "welcome":
            self.refused = str(welcome.get("message", welcome))
            logger.error("attnscope server refused run %r: %s", self.hello["run"], self.refused)
            self.report()
            await self._sleep(BACKOFF_MAX_S)
            return
        self.refused = None
        self.error = None
        self.secret = welcome.get("secret") or self.secret
        self.connections += 1
        self.connected = True
        self._follow_history(welcome.get("history") if self._records_history else None)
        if self.outbox is not None:
            self.outbox.reconnected()
        self.report()
        receiver = asyncio.create_task(self._receive_server(ws))
        try:
            await self._send_loop(ws, receiver)
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiver

    def _follow_history(self, config: dict[str, Any] | None) -> None:
        from .remote.history import HistoryOutbox, config_from_message

        if config is not None and self.outbox is None:
            self.outbox = HistoryOutbox(*config_from_message(config))
            self.tell("history", {"config": {k: v for k, v in config.items()
                                             if k != "max_message_bytes"}})
        elif config is None and self.outbox is not None:
            self.outbox = None
            self._sessions.clear()
            self.tell("history", {"config": None})

    async def _receive_server(self, ws: Any) -> None:
        async for raw in ws:
            data = json.loads(raw)
            kind = data.get("type")
            if kind == "plan":
                self.tell("plan", data)
            elif kind == "capture":
                self._forward_capture(data)
            elif kind == "alert":  # for the training script's on_alert callbacks
                self.tell("alert", json_safe(data))
            elif kind == "error":  # the server dropped something we sent
                logger.warning("attnscope server: %s", data.get("message"))

    def _forward_capture(self, request: dict[str, Any]) -> None:
        """A capture request to the training process; answered ``timeout`` here when the
        training thread does not start it within the request's timeout (no step boundary)."""
        capture_id = str(request.get("id"))
        timeout = float(request.get("timeout", 60.0))
        self.tell("capture", {**{k: v for k, v in request.items() if k != "type"},
                              "deadline": time.monotonic() + timeout})

        def expire() -> None:
            self._capture_timers.pop(capture_id, None)
            self.answers.append(json.dumps({"type": "capture_result", "id": capture_id, "error": {
                "kind": "timeout", "field": None, "message":
                f"the training thread did not reach a step boundary in {timeout:g} s (is the "
                "training loop still calling step()?)"}}))
            self._wake.set()

        self._capture_timers[capture_id] = asyncio.get_running_loop().call_later(timeout, expire)

    async def _send_loop(self, ws: Any, receiver: asyncio.Task) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiter = asyncio.ensure_future(self._wake.wait())
            due = [] if not self.steps else \
                [max(0.0, self._steps_sent + STEPS_PERIOD_S - loop.time())]
            if self.outbox is not None and (history_in := self.outbox.due_in()) is not None:
                due.append(history_in)
            done, _ = await asyncio.wait({waiter, receiver}, timeout=min(due, default=None),
                                         return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                waiter.cancel()
            if receiver in done:  # the server went away
                receiver.result()
                return
            self._wake.clear()
            await self._flush(ws)
            if self.closing or self.gone:
                if self.closing:
                    await ws.send(json.dumps({"type": "close"}))
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2)
                return

    async def _flush(self, ws: Any) -> None:
        while self.answers:
            await ws.send(self.answers.popleft())
        if self.outbox is not None:
            messages = await asyncio.to_thread(self._history_messages)
            for message in messages:
                await ws.send(message)
        now = asyncio.get_running_loop().time()
        if self.steps and (self.closing or now >= self._steps_sent + STEPS_PERIOD_S):
            self._steps_sent = now
            steps = [[s, t, json_safe(v), b, n] for s, t, v, b, n in self.steps]
            self.steps.clear()
            await ws.send(json.dumps({"type": "steps", "steps": steps},
                                     separators=(",", ":"), allow_nan=False))
        while self.frames:
            await ws.send(self.frames.popleft())


async def _relay(channel: Channel, boot: Message, hello: Message) -> None:
    relay = Relay(channel, boot.header, hello.header)
    loop = asyncio.get_running_loop()
    pending: deque[Message] = deque()
    busy = asyncio.Event()

    def on_bell() -> None:
        if not channel.drain_bell():
            loop.remove_reader(channel.bell_in)
            relay.gone = True
            relay._wake.set()
        pending.extend(channel.receive())
        busy.set()

    async def consume() -> None:
        while True:
            await busy.wait()
            busy.clear()
            while pending:
                message = pending.popleft()
                try:
                    await relay.receive(message)
                except (ValueError, TypeError, KeyError, IndexError) as exc:
                    logger.warning("relay: dropped a %s message: %s", message.kind, exc)

    async def report_cpu() -> None:
        while True:
            await asyncio.sleep(1.0)
            if channel.has_mail:  # steps a loop that stopped left without ringing
                on_bell()
            if relay._cpu > 0 or relay._cpu_history > 0:
                relay.tell("helper_cpu", {"stream": relay._cpu, "stats": relay._cpu_history})
                relay._cpu = relay._cpu_history = 0.0
            relay.report()

    loop.add_reader(channel.bell_in, on_bell)
    on_bell()
    relay.tell("ready", {})
    tasks = [asyncio.create_task(consume()), asyncio.create_task(report_cpu())]
    try:
        await relay.run()
    finally:
        for task in tasks:
            task.cancel()
        if not relay.gone:
            relay.tell("link", {"connected": False, "connections": relay.connections,
                                "refused": relay.refused, "dropped": relay.dropped,
                                "history_dropped": 0, "closed": True})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnscope-relay")
    parser.add_argument("--fds", required=True)
    args = parser.parse_args(argv)
    channel = Channel.attach(tuple(int(x) for x in args.fds.split(",")),  # type: ignore[arg-type]
                             side="server")
    return run_process("relay", channel, _relay)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
