"""History of remote runs: recorded in the training process, stored by the server.

The server's ``welcome`` says whether it records history, and how
(:func:`config_message`). If it does, the publisher attaches a
:class:`~attnscope.training.recorder.RunRecorder` to its run exactly as the server does
to a local run (the probe, one sample copy per layer and step, snapshots every K
steps within the time budget). The recorder's sink is a :class:`HistoryOutbox`,
which holds the records (bounded by ``queue_bytes``) for the publisher's sending
thread; that thread computes the statistics and snapshot arrays and sends:

- JSON ``history_session`` ``{session, name, meta}``: a new recording (sent again
  after each reconnection, so that a restarted server knows it);
- binary ``history_stats`` ``{session, rows: [[step, time, scalars, shape]]}``, the
  payload holding each row's statistics (layers, 5, H) float32, one after another;
- binary ``history_snapshot`` ``{session, step, time, labels}``, the payload a
  safetensors file of ``attention.<layer>`` (P, H, L, S) float16.

On the server, a :class:`HistoryInbox` per remote run checks each record against the
run's announced layout (:mod:`attnscope.backend.remote.checks`: a bad one is refused with an
``error``, as a bad frame is), maps the publisher's sessions to sessions of its store
(the same one after a reconnection or a server restart; the run's own quotas,
docs/security.md) and queues rows and snapshots for the history writer. While the
server is away, records wait in the outbox (up to ``queue_bytes``), so the history
continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import safetensors.numpy

from ...contract.protocol import pack
from ...core.history_config import HistoryConfig
from ...core.history_items import SnapshotItem, StepItem, StoredSnapshot, StoredStats, stat_rows
from ...core.jsonsafe import json_safe
from ..history.store import HistoryFull, StatRow
from .checks import (
    FrameError,
    check_history_session,
    check_history_snapshot,
    check_history_stats,
    check_session_id,
)

logger = logging.getLogger(__name__)

# Records leave in batches at most this often: the statistics of a batch are computed in
# one go (a fixed cost per batch, in the training process), and fewer, larger messages.
SEND_PERIOD_S = 0.5
# What of the server's HistoryConfig the publisher's recorder uses.
_RECORDER_FIELDS = ("every", "probe_samples", "probe_budget", "queue_size", "queue_bytes",
                    "stats_rows")


def config_message(config: HistoryConfig | None, max_message_bytes: int) -> dict[str, Any] | None:
    """The ``history`` part of the server's ``welcome`` (None: it records no history)."""
    if config is None:
        return None
    return {**{f: getattr(config, f) for f in _RECORDER_FIELDS},
            "max_message_bytes": max_message_bytes}


def config_from_message(message: dict[str, Any]) -> tuple[HistoryConfig, int]:
    """The inverse of :func:`config_message`: (recorder config, largest message to send)."""
    values = {f: message[f] for f in _RECORDER_FIELDS if f in message}
    return HistoryConfig(**values).validate(), int(message.get("max_message_bytes", 1 << 20))


# -- encoding ----------------------------------------------------------------------

def encode_stats(session: str, rows: list[StatRow]) -> bytes:
    """Rows of one session as one binary ``history_stats`` message."""
    header = {"kind": "history_stats", "session": session, "rows": [
        [r.step, r.time, json_safe(r.scalars),
         None if r.heads is None else list(r.heads.shape)] for r in rows]}
    payload = b"".join(np.ascontiguousarray(r.heads, "<f4").tobytes()
                       for r in rows if r.heads is not None)
    return pack(header, payload)


def encode_snapshot(item: SnapshotItem) -> bytes:
    """A probe snapshot as one binary ``history_snapshot`` message (arrays computed here)."""
    header = {"kind": "history_snapshot", "session": item.session, "step": item.step,
              "time": item.time, "labels": item.labels}
    return pack(header, safetensors.numpy.save(item.arrays()))


# -- publisher end -----------------------------------------------------------------

class HistoryOutbox:
    """The sink of a publisher's :class:`~attnscope.training.recorder.RunRecorder`.

    The training thread adds records (:meth:`submit`, never blocking: past
    ``queue_size`` records or ``queue_bytes`` they are dropped and counted); the
    sending thread turns them into messages (:meth:`messages`).
    """

    def __init__(self, config: HistoryConfig, max_message_bytes: int) -> None:
        self.config = config
        self.max_message_bytes = max_message_bytes
        self.dropped = 0
        self._items: deque[Any] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self._session: dict[str, Any] | None = None  # the current session's message
        self._sent = 0.0  # time.monotonic() of the last batch

    def new_session(self, run_id: str, name: str | None, meta: dict[str, Any]) -> str:
        """A new recording: its id (this process's), announced to the server first."""
        session = uuid.uuid4().hex[:16]
        message = {"type": "history_session", "session": session, "name": name, "meta": meta}
        with self._lock:
            self._session = message
            self._items.append(message)
        return session

    def submit(self, item: Any) -> None:
        size = item.nbytes
        with self._lock:
            if self._bytes + size > self.config.queue_bytes \
                    or len(self._items) >= self.config.queue_size:
                self.dropped += 1
                return
            self._items.append(item)
            self._bytes += size

    def reconnected(self) -> None:
        """A new connection: the current session is announced again before anything else."""
        with self._lock:
            if self._session is not None:
                self._items.appendleft(self._session)

    def due_in(self) -> float | None:
        """Seconds until what waits may leave (None: nothing waits)."""
        if not self._items:
            return None
        return max(0.0, self._sent + SEND_PERIOD_S - time.monotonic())

    def messages(self, now: bool = False) -> list[bytes | str]:
        """What waits, as messages in order, at most every ``SEND_PERIOD_S`` unless ``now``;
        statistics and arrays are computed here."""
        if not now and time.monotonic() < self._sent + SEND_PERIOD_S:
            return []
        self._sent = time.monotonic()
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._bytes = 0
        out: list[bytes | str] = []
        steps: list[StepItem] = []

        def add_steps() -> None:
            out.extend(encode_stats(session, rows)
                       for session, rows in stat_rows(steps, self.config.stats_rows).items())
            steps.clear()

        for item in items:
            if isinstance(item, StepItem):
                steps.append(item)
                continue
            add_steps()
            if isinstance(item, dict):
                out.append(json.dumps(item, separators=(",", ":")))
                continue
            message = encode_snapshot(item)
            if len(message) > self.max_message_bytes:
                self.dropped += 1
                logger.warning("history: a snapshot of %d bytes is over the server's message "
                               "limit (ATTNSCOPE_MAX_PUBLISH_BYTES): not sent", len(message))
                continue
            out.append(message)
        add_steps()
        return out


# -- server end --------------------------------------------------------------------

class HistoryInbox:
    """The server's end for one remote run: checks and stores what its publisher recorded.

    Every method raises :class:`~attnscope.backend.remote.checks.FrameError` (naming the field)
    for a record that does not fit the run's :class:`~attnscope.backend.remote.checks.RunBounds`;
    nothing of it is queued.
    """

    # Publisher sessions remembered: one is recorded at a time, a reconnection repeats it.
    MAX_SESSIONS = 8

    def __init__(self, service: Any, run: Any, bounds: Any) -> None:
        self.service = service  # a HistoryWriter
        self.run = run
        self.bounds = bounds  # the run's RunBounds, with the server's history limits
        # the publisher's session id -> (the store's, statistics per head R)
        self.sessions: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self.refused: OrderedDict[str, None] = OrderedDict()  # sessions past the quota
        self.session: str | None = None  # the store's session being recorded (None: none yet)

    def on_session(self, message: dict[str, Any]) -> None:
        """A ``history_session``: the same stored session as before if this publisher
        session is known (a reconnection, or the newest session after a restart)."""
        record = check_history_session(self.bounds, message)
        theirs = record.session
        known = self.sessions.get(theirs)
        if known is not None and self.service.store.session(known[0]) is None:
            del self.sessions[theirs]  # evicted by the run's own quota: a new one
        if theirs not in self.sessions:
            latest = self.service.store.latest_session(self.run.id)
            if latest is not None and latest.meta.get("publisher_session") == theirs:
                ours = latest.id
            else:
                meta = {**record.meta, "publisher_session": theirs, "host": self.run.host}
                try:
                    ours = self.service.new_session(self.run.id, record.name or self.run.name,
                                                    meta, remote=True)
                except HistoryFull as exc:
                    _remember(self.refused, theirs, self.MAX_SESSIONS)
                    raise FrameError("session", str(exc)) from None
            _remember(self.sessions, theirs, self.MAX_SESSIONS, (ours, record.stat_rows))
        self.sessions.move_to_end(theirs)
        self.session = self.sessions[theirs][0]

    def on_binary(self, header: dict[str, Any], payload: memoryview) -> None:
        """A ``history_stats`` or ``history_snapshot`` message, queued for the writer."""
        theirs = check_session_id(header.get("session"))
        if theirs in self.refused:
            return  # said once, at its history_session
        if theirs not in self.sessions:
            raise FrameError("session", "unknown session: send its history_session first")
        session, stat_rows = self.sessions[theirs]
        if header["kind"] == "history_stats":
            _, rows = check_history_stats(self.bounds, header, payload, stat_rows)
            self.service.submit(StoredStats(session, rows))
            return
        _, step, t, tensors, labels = check_history_snapshot(self.bounds, header, payload)
        self.service.submit(StoredSnapshot(session, step, t, tensors, labels))


def _remember(book: OrderedDict, key: str, most: int, value: Any = None) -> None:
    book[key] = value
    while len(book) > most:
        book.popitem(last=False)


__all__ = ["HistoryInbox", "HistoryOutbox", "config_from_message", "config_message"]
