"""The ``heads`` message: every head's statistics, role scores and role, pushed to viewers.

A viewer that subscribes to the kind ``head_roles`` gets a ``heads`` message (the
body of ``GET /api/v1/runs/{id}/heads`` plus ``type``, ``source`` and ``induction``)
whenever the roles or the statistics behind them changed, checked once per
:data:`HEADS_INTERVAL_S`: never per frame, and never for viewers that did not ask.

Two sources, neither of which computes a statistic of its own:

- ``history``: the history writer's role tracker, when the run is being recorded
  (or is over and was recorded). It has the induction and duplicate-token scores
  from the history's induction probe.
- ``stream``: the ``head_stats`` the stream already sends (their JSON, parsed
  again once a second), fed to a :class:`~attnscope.backend.history.roles.RoleTracker`
  of its own, when the server records no history. Induction and duplicate-token
  need the probe, so they are unknown here (``induction: false``).

Building a message (a few ms for 144 heads) runs in a worker thread; the event
loop only copies slot references and hands finished text to the senders.

Shape legend: K layers, R statistics per head (``HEAD_STATISTICS``), H heads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import HTTPException

from ..contract.plan import Capture
from ..core.roles import ROLES, RoleRule
from ..core.run_base import BaseRun, UnknownRunError
from ..core.stats import HEAD_STATISTICS
from .frames import encode_stats
from .history.heads import head_list, heads_answer, thresholds_of
from .history.roles import RoleTracker

if TYPE_CHECKING:
    from .history.writer import HistoryWriter
    from .hub import Hub

logger = logging.getLogger(__name__)

HEADS_KIND = "head_roles"  # the subscription kind that asks for ``heads`` messages
HEADS_INTERVAL_S = 1.0  # roles change over hundreds of steps: once a second is live enough
MAX_EVENTS = 100  # events per message (GET /heads gives up to 5000)
NO_INDUCTION = ("induction and duplicate-token scores need the history's induction probe "
                "(ATTNSCOPE_HISTORY_ENABLED=true)")


class StreamRoles:
    """Roles of one run from its stream's latest ``head_stats`` per layer (no history).

    Layers not streamed lately keep their last values; layers never streamed are NaN
    (no role). Not thread-safe: one :class:`HeadsFeed` worker call at a time uses it.
    """

    def __init__(self, layers: int, heads: int, rule: RoleRule) -> None:
        if layers < 0 or heads < 0:
            raise ValueError(f"layers, heads: expected >= 0, got {layers}, {heads}")
        self.tracker = RoleTracker(rule)
        self.stats = np.full((layers, len(HEAD_STATISTICS), heads), np.nan, np.float32)  # (K, R, H)
        self.seen: dict[int, int] = {}  # layer -> seq of the capture last taken
        self.step: int | None = None

    def take(self, layer: int, seq: int, text: str) -> bool:
        """Take one layer's ``head_stats`` JSON text (capture ``seq``); False if not new."""
        if self.seen.get(layer) == seq or not 0 <= layer < self.stats.shape[0]:
            return False
        message = json.loads(text)
        heads = message["heads"]
        row = np.full((len(HEAD_STATISTICS), self.stats.shape[2]), np.nan, np.float32)
        for r, name in enumerate(HEAD_STATISTICS):
            values = message.get(name)
            if values is None:
                continue  # induction and duplicate_token: not in head_stats
            for head, v in zip(heads, values, strict=False):
                if 0 <= head < row.shape[1]:
                    row[r, head] = math.nan if v is None else float(v)
        self.stats[layer] = row
        self.seen[layer] = seq
        step = int(message["step"])
        self.step = step if self.step is None else max(self.step, step)
        return True

    def observe(self) -> None:
        """Assign roles from the statistics taken so far (at the latest step taken)."""
        if self.step is not None:
            self.tracker.observe(self.step, self.stats.copy())

    def message(self, run_id: str, rule: RoleRule) -> dict[str, Any]:
        tracker = self.tracker
        with tracker.lock:
            roles = [list(r) for r in tracker.roles]
            since = [list(r) for r in tracker.since]
            events = [e.to_dict() for e in tracker.events[-MAX_EVENTS:]]
            stats = tracker.stats
        heads = head_list(stats, roles, since)
        return {
            "type": "heads", "source": "stream", "induction": False, "note": NO_INDUCTION,
            "run": run_id, "session": None, "step": tracker.step, "probe_step": None,
            "layers": self.stats.shape[0], "roles": list(ROLES),
            "thresholds": thresholds_of(rule),
            "heads": [h.model_dump(mode="json") for h in heads], "events": events,
        }


def history_message(service: HistoryWriter, run_id: str) -> dict[str, Any] | None:
    """The ``heads`` message from the history's role tracker; None if nothing is recorded."""
    try:
        answer = heads_answer(service, run_id, events=MAX_EVENTS)
    except HTTPException:
        return None
    message = {"type": "heads", "source": "history", "induction": True, "note": None}
    message.update(answer.model_dump(mode="json"))
    return message


def history_version(service: HistoryWriter, run_id: str) -> tuple[Any, ...] | None:
    """What changes when the history's answer for ``run_id`` changes (cheap), or None."""
    session = service.session_of(run_id)
    if session is None:
        return None if not service.is_recording(run_id) else ("waiting",)
    tracker = service.roles.get(session)
    with tracker.lock:
        version = (session, tracker.step, len(tracker.events), tracker.repeat_step)
    return (*version, service.alerts.count(session))


class HeadsFeed:
    """Once per :data:`HEADS_INTERVAL_S`: a fresh ``heads`` message for each run that a
    ``head_roles`` subscriber watches, handed to those subscribers' senders."""

    def __init__(self, hub: Hub, rule: RoleRule | None = None) -> None:
        self.hub = hub
        self.rule = rule or RoleRule()
        self.history: HistoryWriter | None = None  # set by the app once history is open
        self.stream: dict[str, StreamRoles] = {}
        self.latest: dict[str, tuple[Any, str]] = {}  # run -> (version, message text)

    def watched(self) -> dict[str, list[Any]]:
        """Run id -> the connections subscribed to ``head_roles`` of it."""
        runs: dict[str, list[Any]] = {}
        for conn in self.hub.connections:
            sub = conn.sub
            if sub is not None and HEADS_KIND in sub.kinds:
                runs.setdefault(sub.run, []).append(conn)
        return runs

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(HEADS_INTERVAL_S)
            await self.tick()

    async def tick(self) -> None:
        """Refresh every watched run's message; wake the subscribers that lack it."""
        runs = self.watched()
        for run_id in [r for r in self.latest if r not in runs]:
            del self.latest[run_id]
        for run_id in [r for r in self.stream if r not in runs]:
            del self.stream[run_id]
        for run_id, conns in runs.items():
            try:
                run = self.hub.registry.get(run_id)
            except UnknownRunError:
                continue
            caps = self._stats_captures(run_id)  # on the loop: slots change there
            latest = await asyncio.to_thread(self._refresh, run, caps)
            if latest is None:
                continue
            version, text = latest
            for conn in conns:
                if conn.heads_version != version:
                    conn.heads_version = version
                    conn.heads_pending = text
                    conn.wake.set()

    def _stats_captures(self, run_id: str) -> dict[int, Capture]:
        """The latest ``head_stats`` capture per layer in the run's slots (lowest sample)."""
        publisher = self.hub.publishers.get(run_id)
        out: dict[int, Capture] = {}
        if publisher is None:
            return out
        for (kind, layer, sample), cap in list(publisher.slots.items()):
            if kind == "head_stats" and (layer not in out or sample < out[layer].sample):
                out[layer] = cap
        return out

    def _refresh(self, run: BaseRun, caps: dict[int, Capture]) -> tuple[Any, str] | None:
        """(version, text) of the run's current message, rebuilt only if it changed."""
        run_id = run.id
        service = self.history
        use_history = service is not None and (
            service.is_recording(run_id) or (run_id not in self.stream and not caps
                                             and service.session_of(run_id) is not None))
        if use_history:
            version: Any = ("history", history_version(service, run_id))
        else:
            layers = len(run.sites)
            heads = max((s.heads or 0 for s in run.sites), default=0)
            roles = self.stream.get(run_id)
            if roles is None or roles.stats.shape[::2] != (layers, heads):  # new, or resized
                roles = self.stream[run_id] = StreamRoles(layers, heads, self.rule)
            # encode_stats is the stream's own encoding, cached on the capture: usually
            # sent already, so this parses text and computes nothing.
            fresh = [roles.take(layer, cap.seq, encode_stats(run_id, cap))
                     for layer, cap in caps.items()]
            if any(fresh):
                roles.observe()
            version = ("stream", roles.step, tuple(sorted(roles.seen.items())))
        cached = self.latest.get(run_id)
        if cached is not None and cached[0] == version:
            return cached
        if use_history:
            message = history_message(service, run_id)
            if message is None:
                return None
        else:
            message = self.stream[run_id].message(run_id, self.rule)
        text = json.dumps(message, separators=(",", ":"), allow_nan=False)
        self.latest[run_id] = (version, text)
        return version, text
