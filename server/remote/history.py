"""History of remote runs: recorded in the training process, stored by the server.

The server's ``welcome`` says whether it records history, and how
(:func:`config_message`). If it does, the publisher attaches a
:class:`~attnscope.history.recorder.RunRecorder` to its run exactly as the server does
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

On the server, a :class:`HistoryInbox` per remote run maps the publisher's sessions
to sessions of its store (the same one after a reconnection or a server restart) and
queues rows and snapshots for the history writer. While the server is away, records
wait in the outbox (up to ``queue_bytes``), so the history continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from typing import Any

import numpy as np
import safetensors.numpy

from ..history.config import HistoryConfig
from ..history.recorder import SnapshotItem, StepItem, StoredSnapshot, StoredStats, stat_rows
from ..history.store import StatRow
from ..jsonsafe import json_safe
from ..protocol import pack

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


def decode_stats(header: dict[str, Any], payload: memoryview) -> list[StatRow]:
    """The inverse of :func:`encode_stats`; ValueError if the payload does not match."""
    rows, offset = [], 0
    for step, t, scalars, shape in header["rows"]:
        heads = None
        if shape is not None:
            count = math.prod(int(s) for s in shape)
            heads = np.frombuffer(payload, "<f4", count, offset).reshape(shape).copy()
            offset += 4 * count
        values = {str(k): math.nan if v is None else float(v) for k, v in scalars.items()}
        rows.append(StatRow(int(step), float(t), values, heads))
    if offset != len(payload):
        raise ValueError(f"history_stats: {len(payload)} payload bytes for {offset} of rows")
    return rows


def encode_snapshot(item: SnapshotItem) -> bytes:
    """A probe snapshot as one binary ``history_snapshot`` message (arrays computed here)."""
    header = {"kind": "history_snapshot", "session": item.session, "step": item.step,
              "time": item.time, "labels": item.labels}
    return pack(header, safetensors.numpy.save(item.arrays()))


# -- publisher end -----------------------------------------------------------------

class HistoryOutbox:
    """The sink of a publisher's :class:`~attnscope.history.recorder.RunRecorder`.

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
    """The server's end for one remote run: stores what its publisher recorded."""

    def __init__(self, service: Any, run: Any) -> None:
        self.service = service  # a HistoryService
        self.run = run
        self.sessions: dict[str, str] = {}  # the publisher's session id -> the store's
        self.session: str | None = None  # the store's session being recorded (None: none yet)

    def on_session(self, message: dict[str, Any]) -> None:
        """A ``history_session``: the same stored session as before if this publisher
        session is known (a reconnection, or the newest session after a restart)."""
        theirs = str(message.get("session"))
        if theirs not in self.sessions:
            latest = self.service.store.latest_session(self.run.id)
            if latest is not None and latest.meta.get("publisher_session") == theirs:
                self.sessions[theirs] = latest.id
            else:
                meta = {**dict(message.get("meta") or {}), "publisher_session": theirs,
                        "host": self.run.host}
                name = str(message.get("name") or self.run.name)
                self.sessions[theirs] = self.service.new_session(self.run.id, name, meta)
        self.session = self.sessions[theirs]

    def on_binary(self, header: dict[str, Any], payload: memoryview) -> None:
        """A ``history_stats`` or ``history_snapshot`` message, queued for the writer."""
        session = self.sessions.get(str(header.get("session")))
        if session is None:
            logger.debug("history of run %r: a record of an unknown session", self.run.id)
            return
        if header["kind"] == "history_stats":
            self.service.submit(StoredStats(session, decode_stats(header, payload)))
            return
        tensors = safetensors.numpy.load(bytes(payload))
        labels = header.get("labels")
        self.service.submit(StoredSnapshot(session, int(header["step"]), float(header["time"]),
                                           tensors, None if labels is None else
                                           [str(x) for x in labels]))


__all__ = ["HistoryInbox", "HistoryOutbox", "config_from_message", "config_message"]
