"""The event-loop side of the stream: subscriptions, publishers and per-socket senders.

One :class:`Hub` per app. Each websocket is a :class:`Connection` with one
subscription and one sender task; the sender wakes when its run's publisher
has new captures, and sends the latest value of each of its slots (so a slow
client skips frames; nothing queues). What is not encoded yet is encoded in the
hub's one encoder thread, never on the loop. Publishers exist only while a run has
subscribers, and listen to exactly the union of what those ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import __version__
from ..contract.plan import EMPTY_PLAN, Capture, Plan, SampleNeed, SlotKey
from ..contract.protocol import KINDS, PROTOCOL_VERSION, ProtocolError, Subscribe
from ..core.limits import LimitError, check_indices
from ..core.run_base import BaseRun, RunRegistry, StreamSource, UnknownRunError
from ..settings import Settings
from .frames import encode, view_key
from .heads_feed import HEADS_KIND, HeadsFeed

logger = logging.getLogger(__name__)

# A capture whose step is never marked (a loop that never calls step()) is
# published anyway after this long.
STALE_AFTER_S = 0.5


@dataclass(frozen=True)
class Resolved:
    """A validated subscription with defaults and null lists resolved against its run."""

    run: str
    kinds: tuple[str, ...]
    layers: tuple[int, ...]
    heads: tuple[int, ...] | None  # None: all heads
    all_heads: tuple[int, ...]
    sample: int
    max_fps: float
    max_side: int
    dtype: str

    @property
    def slot_keys(self) -> tuple[SlotKey, ...]:
        return tuple((kind, layer, self.sample) for layer in self.layers
                     for kind in self.kinds if kind not in ("scalars", HEADS_KIND))

    def to_message(self) -> dict[str, Any]:
        return {
            "type": "subscribed", "run": self.run, "kinds": list(self.kinds),
            "layers": list(self.layers),
            "heads": list(self.all_heads if self.heads is None else self.heads),
            "sample": self.sample, "max_fps": self.max_fps, "max_side": self.max_side,
            "dtype": self.dtype,
        }


def resolve(sub: Subscribe, run: BaseRun, settings: Settings) -> Resolved:
    """Check ``sub`` against ``run`` and the server limits; raise :class:`ProtocolError`."""
    n_layers = len(run.sites)
    try:
        layers = tuple(range(n_layers)) if sub.layers is None else tuple(sorted(check_indices(
            "layers", sub.layers, n_layers, where=f"run {run.id!r}")))
        counts = [(run.sites[i].heads, i) for i in layers if run.sites[i].heads is not None]
        n_heads, where = min(counts) if counts else (None, None)
        heads = None if sub.heads is None else tuple(sorted(check_indices(
            "heads", sub.heads, 1 << 16 if n_heads is None else n_heads,
            where=f"layer {where} of run {run.id!r}")))
    except LimitError as exc:
        raise ProtocolError(exc.field, exc.message) from None
    if run.batch_size is not None and sub.sample >= run.batch_size:
        raise ProtocolError("sample", f"sample {sub.sample} out of range: run {run.id!r} has "
                                      f"batches of {run.batch_size} (0-{run.batch_size - 1})")
    if sub.max_fps > settings.max_fps:
        raise ProtocolError("max_fps", f"max_fps {sub.max_fps:g} is above this server's limit "
                                       f"{settings.max_fps:g}")
    if sub.max_side > settings.max_side:
        raise ProtocolError("max_side", f"max_side {sub.max_side} is above this server's limit "
                                        f"{settings.max_side}")
    return Resolved(
        run=run.id, kinds=tuple(dict.fromkeys(sub.kinds)), layers=layers, heads=heads,
        all_heads=tuple(range(n_heads or 0)), sample=sub.sample, max_fps=sub.max_fps,
        max_side=sub.max_side, dtype=sub.dtype,
    )


class _Heads:
    """A union of head selections where None (all heads) absorbs everything."""

    def __init__(self) -> None:
        self.all = False
        self.some: set[int] = set()

    def add(self, heads: tuple[int, ...] | None) -> None:
        if heads is None:
            self.all = True
        else:
            self.some.update(heads)

    def value(self) -> tuple[int, ...] | None:
        return None if self.all else tuple(sorted(self.some))


def build_plan(run: BaseRun, subs: list[Resolved]) -> Plan:
    """The union of ``subs`` (all for ``run``) as a :class:`Plan`."""
    if not subs:
        return EMPTY_PLAN
    acc: dict[tuple[int, int], dict[str, Any]] = {}
    for sub in subs:
        for layer in sub.layers:
            need = acc.setdefault((layer, sub.sample), {
                "kinds": set(), "attention": _Heads(), "logits": _Heads(), "qkv": _Heads(),
                "sides": set()})
            for kind in sub.kinds:
                need["kinds"].add(kind)
                if kind == "attention":
                    need["attention"].add(sub.heads)
                    need["sides"].add(sub.max_side)
                elif kind == "qk_logits":
                    need["logits"].add(sub.heads)
                elif kind == "qkv_norms":
                    need["qkv"].add(sub.heads)
    needs: dict[int, list[SampleNeed]] = {}
    sources: set[tuple[str, int]] = set()
    for (layer, sample), need in sorted(acc.items()):
        kinds = need["kinds"]
        stats = "head_stats" in kinds
        sample_need = SampleNeed(
            sample=sample,
            attention="attention" in kinds,
            attention_heads=None if stats else need["attention"].value(),
            logits="qk_logits" in kinds, logits_heads=need["logits"].value(),
            stats=stats,
            qkv="qkv_norms" in kinds, qkv_heads=need["qkv"].value(),
            # one view size: pooled where computed (less to copy, nothing to pool here)
            max_side=next(iter(need["sides"])) if len(need["sides"]) == 1 else None,
        )
        if sample_need.attention or sample_need.logits or stats:
            sources.add(("attn", layer))
        if sample_need.qkv and run.sites[layer].qkv:
            sources.add(("qkv", layer))
        needs.setdefault(layer, []).append(sample_need)
    return Plan(
        interval=1.0 / max(s.max_fps for s in subs), sources=frozenset(sources),
        needs={layer: tuple(v) for layer, v in needs.items()},
        scalars=any("scalars" in s.kinds for s in subs),
    )


class Connection:
    """One websocket: its subscription, what it was last sent, and its sender task."""

    def __init__(self, websocket: WebSocket, hub: Hub) -> None:
        self.websocket = websocket
        self.hub = hub
        self.sub: Resolved | None = None
        self.wake = asyncio.Event()
        self.runs_dirty = False
        self.sent: dict[SlotKey, int] = {}
        self.sent_scalars = -1
        self.sent_budget = -1  # the version of the run's budget last sent
        self.next_due = 0.0  # loop time before which no new frames are sent
        self.scalars_due = 0.0  # the same for scalars messages
        self.heads_pending: str | None = None  # the latest ``heads`` message not yet sent
        self.heads_version: Any = None  # what the HeadsFeed last handed this socket
        self._send_lock = asyncio.Lock()
        self.task: asyncio.Task | None = None

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_text(json.dumps(message, separators=(",", ":")))

    async def send_text(self, text: str) -> None:
        async with self._send_lock:
            await self.websocket.send_text(text)

    async def send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            await self.websocket.send_bytes(data)

    async def close(self, code: int, reason: str = "") -> None:
        async with self._send_lock:
            with contextlib.suppress(RuntimeError):
                await self.websocket.close(code, reason)

    async def run_sender(self) -> None:
        """Send what is new whenever woken; ends quietly when the socket goes away."""
        try:
            await self._send_loop()
        except (WebSocketDisconnect, OSError, RuntimeError):
            return  # the client left mid-send; the receive loop cleans up
        except Exception:
            logger.exception("stream sender failed")
            await self.close(1011, "internal error")

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.runs_dirty:
                self.runs_dirty = False
                await self.send_json(self.hub.runs_message())
            await self._send_heads()
            if self.sub is None:
                continue
            await self._send_budget(self.sub)
            delay = self.next_due - loop.time()
            if delay > 0:  # this subscriber's max_fps: wait, then send the latest
                await asyncio.sleep(delay)
            sub = self.sub
            if sub is None:
                continue
            started = loop.time()
            if await self._send_frames(sub):
                # The publisher captures at most once per plan interval (the fastest
                # subscriber's period), so waiting a full period here would hold most
                # frames back until the next tick. Half a capture interval of slack
                # lets each frame go out as soon as it is released, while a slower
                # subscriber is still held near its own rate.
                self.next_due = started + 1.0 / sub.max_fps - self._capture_interval(sub) / 2
            # Scalars not due yet wait for a later wake (a step, or the hub's
            # periodic check for unsent scalars), so the last ones are never lost.
            if "scalars" in sub.kinds and started >= self.scalars_due \
                    and await self._send_scalars(sub):
                self.scalars_due = started + 1.0 / sub.max_fps

    async def _send_heads(self) -> None:
        """Send the latest ``heads`` message the HeadsFeed left for this socket, if any."""
        text, self.heads_pending = self.heads_pending, None
        if text is not None and self.sub is not None and HEADS_KIND in self.sub.kinds:
            await self.send_text(text)

    def _capture_interval(self, sub: Resolved) -> float:
        publisher = self.hub.publishers.get(sub.run)
        return publisher.plan.interval if publisher is not None else 0.0

    async def _send_frames(self, sub: Resolved) -> bool:
        """Send every subscribed slot holding a capture this socket has not had."""
        try:
            run = self.hub.registry.get(sub.run)
        except UnknownRunError:
            return False
        publisher = self.hub.publishers.get(sub.run)
        if publisher is None:
            return False
        budget = run.budget  # a local run's: it may shrink views to save encoding time
        side = sub.max_side if budget is None else budget.view_side(sub.max_side)
        due = []
        for key in sub.slot_keys:
            cap = publisher.slots.get(key)
            if cap is not None and cap.seq > self.sent.get(key, 0):
                self.sent[key] = cap.seq
                due.append((key, cap))
        if not due:
            return False
        views = [(cap, cap.cache.get(view_key(cap, sub.heads, side, sub.dtype))) for _, cap in due]
        missing = [cap for cap, encoded in views if encoded is None]
        if missing:  # one trip to the encoder thread for all of this frame's slots
            encoded_now = iter(await self.hub.encode(run, missing, sub.heads, side, sub.dtype))
            views = [(cap, next(encoded_now) if encoded is None else encoded)
                     for cap, encoded in views]
        sent = False
        for (key, _), (cap, encoded) in zip(due, views, strict=True):
            if encoded is None:
                # A capture that cannot be encoded (publishers' frames are checked on
                # arrival, so this is a bug): drop it from its slot so that no viewer,
                # now or later, is closed over it.
                if publisher.slots.get(key) is cap:
                    del publisher.slots[key]
                continue
            if isinstance(encoded, str):
                await self.send_text(encoded)
            else:
                await self.send_bytes(encoded)
            sent = True
            if self.sub is not sub:  # resubscribed meanwhile: start over with the new one
                return sent
        return sent

    async def _send_budget(self, sub: Resolved) -> None:
        """Send the run's cost budget (docs/protocol.md, ``budget``) when it changed."""
        message = self.hub.budget_message(sub.run, self.sent_budget)
        if message is not None:
            self.sent_budget = message["version"]
            await self.send_json(message)

    async def _send_scalars(self, sub: Resolved) -> bool:
        """Send the run's latest scalars if they changed since the last ones sent."""
        try:
            run = self.hub.registry.get(sub.run)
        except UnknownRunError:
            return False
        if run.step_index is None or run.scalars_seq == self.sent_scalars:
            return False
        self.sent_scalars = run.scalars_seq
        await self.send_json({
            "type": "scalars", "run": run.id, "step": run.step_index,
            "time": run.scalars_time, "values": dict(run.scalars),
        })
        return True


class Hub:
    """Connections, their subscriptions, and one publisher per watched run."""

    def __init__(self, registry: RunRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self.connections: set[Connection] = set()
        self.publishers: dict[str, StreamSource] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_wakes: set[str] = set()
        self._housekeeping: asyncio.Task | None = None
        self.heads_feed = HeadsFeed(self)
        self._heads_task: asyncio.Task | None = None
        # Encoding, and computing a CPU capture's attention on first read (0.3-0.7 s a
        # frame for 144 heads at L=512), happen here, one at a time: never on the event
        # loop, which keeps serving every other socket meanwhile.
        self._encoder: ThreadPoolExecutor | None = None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnscope-frames")
        self.registry.add_listener(self._registry_changed)
        self._housekeeping = asyncio.create_task(self._flush_stale_loop())
        self._heads_task = asyncio.create_task(self._heads_loop())

    async def stop(self) -> None:
        self.registry.remove_listener(self._registry_changed)
        tasks = [c.task for c in self.connections if c.task is not None]
        if self._housekeeping is not None:
            tasks.append(self._housekeeping)
        if self._heads_task is not None:
            tasks.append(self._heads_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for publisher in self.publishers.values():
            publisher.close()
        self.publishers.clear()
        self.connections.clear()
        if self._encoder is not None:
            self._encoder.shutdown(wait=False, cancel_futures=True)
            self._encoder = None

    @property
    def full(self) -> bool:
        return len(self.connections) >= self.settings.max_subscribers

    def hello(self) -> dict[str, Any]:
        return {"type": "hello", "protocol": PROTOCOL_VERSION, "server": f"attnscope {__version__}",
                "kinds": list(KINDS), "runs": [r.summary() for r in self.registry.list()]}

    def runs_message(self) -> dict[str, Any]:
        return {"type": "runs", "runs": [r.summary() for r in self.registry.list()]}

    def budget_message(self, run_id: str, sent: int = -1) -> dict[str, Any] | None:
        """``{"type": "budget", "run", "version", ...Budget.status()}``, or None when the
        run has no budget here or its version is still ``sent``."""
        try:
            budget = self.registry.get(run_id).budget
        except UnknownRunError:
            return None
        if budget is None or budget.version == sent:
            return None
        return {"type": "budget", "run": run_id, "version": budget.version, **budget.status()}

    async def encode(self, run: BaseRun, caps: list[Capture], heads: tuple[int, ...] | None,
                     side: int, dtype: str) -> list[str | bytes | None]:
        """The messages of ``caps`` for one view, encoded (and computed, if pending) in the
        encoder thread in one trip; its CPU time is charged to a local run's budget. None
        (logged) for a capture that cannot be encoded."""
        budget = run.budget  # a local run's: this competes with its training

        def one(cap: Capture) -> str | bytes | None:
            try:
                return encode(run.id, cap, heads, side, dtype)
            except (ValueError, IndexError, RuntimeError) as exc:
                logger.error("dropped an unencodable %s capture of run %r layer %d: %s",
                             cap.kind, run.id, cap.layer, exc)
                return None

        def work() -> list[str | bytes | None]:
            cpu = time.thread_time()
            try:
                return [one(cap) for cap in caps]
            finally:
                if budget is not None:
                    budget.spend_helper("stream", time.thread_time() - cpu)

        if self._encoder is None:  # not started (a unit test driving the hub by hand)
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._encoder, work)

    # -- connections -----------------------------------------------------------

    def connect(self, websocket: WebSocket) -> Connection:
        conn = Connection(websocket, self)
        self.connections.add(conn)
        conn.task = asyncio.create_task(conn.run_sender())
        return conn

    async def disconnect(self, conn: Connection) -> None:
        self.connections.discard(conn)
        old = conn.sub
        conn.sub = None
        if conn.task is not None:
            conn.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await conn.task
            conn.task = None
        if old is not None:
            self._replan(old.run)

    def subscribe(self, conn: Connection, sub: Subscribe) -> Resolved:
        """Validate and install ``sub`` for ``conn`` (raises :class:`ProtocolError`)."""
        try:
            run = self.registry.get(sub.run)
        except UnknownRunError as exc:
            raise ProtocolError("run", str(exc)) from None
        resolved = resolve(sub, run, self.settings)
        old = conn.sub
        conn.sub = resolved
        conn.sent = {}
        conn.sent_scalars = -1
        conn.sent_budget = -1
        conn.next_due = 0.0
        conn.heads_version = None  # a new subscription gets the current heads message
        if old is not None and old.run != resolved.run:
            self._replan(old.run)
        self._replan(resolved.run)
        conn.wake.set()
        return resolved

    def unsubscribe(self, conn: Connection) -> None:
        old, conn.sub = conn.sub, None
        if old is not None:
            self._replan(old.run)

    def _replan(self, run_id: str) -> None:
        subs = [c.sub for c in self.connections if c.sub is not None and c.sub.run == run_id]
        publisher = self.publishers.get(run_id)
        try:
            run = self.registry.get(run_id)
        except UnknownRunError:
            run = None
        if run is None:
            if publisher is not None:
                publisher.close()
                del self.publishers[run_id]
            return
        if not subs:
            if publisher is not None:
                publisher.set_plan(EMPTY_PLAN)  # stop listening; keep the last frames
            return
        if publisher is None or publisher.run is not run:
            if publisher is not None:
                publisher.close()
            # A local run's publisher listens to its model; a remote run's forwards plans.
            publisher = self.publishers[run_id] = run.open_stream(self._notify_threadsafe)
        publisher.set_plan(build_plan(run, subs))

    # -- wake-ups (from the training thread and registry listeners) --------------

    def _notify_threadsafe(self, run_id: str) -> None:
        if run_id in self._pending_wakes or self._loop is None:
            return
        self._pending_wakes.add(run_id)
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._wake_run, run_id)

    def _wake_run(self, run_id: str) -> None:
        self._pending_wakes.discard(run_id)
        for conn in self.connections:
            if conn.sub is not None and conn.sub.run == run_id:
                conn.wake.set()

    def _registry_changed(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._broadcast_runs)

    def _broadcast_runs(self) -> None:
        for run_id in list(self.publishers):
            if run_id not in self.registry.ids():
                self._replan(run_id)
        for conn in self.connections:
            conn.runs_dirty = True
            conn.wake.set()

    async def _flush_stale_loop(self) -> None:
        while True:
            await asyncio.sleep(STALE_AFTER_S / 2)
            for publisher in list(self.publishers.values()):
                publisher.flush_stale(STALE_AFTER_S)
            self._wake_for_unsent_scalars()
            self._wake_for_budgets()

    def _wake_for_budgets(self) -> None:
        """Wake senders whose run's budget changed (a window closed: every few seconds)."""
        for conn in self.connections:
            sub = conn.sub
            if sub is None:
                continue
            with contextlib.suppress(UnknownRunError):
                budget = self.registry.get(sub.run).budget
                if budget is not None and budget.version != conn.sent_budget:
                    conn.wake.set()

    async def _heads_loop(self) -> None:
        """The ``heads`` messages (:mod:`.heads_feed`); a failure is logged, not fatal."""
        while True:
            try:
                await self.heads_feed.run_forever()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("heads feed failed; restarting it")
                await asyncio.sleep(1.0)

    def _wake_for_unsent_scalars(self) -> None:
        """Wake senders owing scalars. Publishers notify scalars at most once per
        interval, so the last steps before a pause or the end come through here."""
        for conn in self.connections:
            sub = conn.sub
            if sub is None or "scalars" not in sub.kinds:
                continue
            with contextlib.suppress(UnknownRunError):
                if self.registry.get(sub.run).scalars_seq != conn.sent_scalars:
                    conn.wake.set()
