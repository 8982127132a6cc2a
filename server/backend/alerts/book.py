"""Where alerts are raised, kept and sent: one :class:`AlertBook` beside the history writer.

The writer hands every stats row it stores to :meth:`AlertBook.rows` (local runs'
and remote publishers' alike); the session's :class:`~.rules.AlertTracker` turns
them into alerts, each of which is stored with the session's history, logged as one
line, queued for the webhook (when set) and given to the book's listeners. A session
seen for the first time by this process (after a restart of the server) is replayed
from its stored rows first, without raising anything, so episodes already alerted
are not alerted again.

Shape legend: K layers, R statistics per head, H heads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ..history.store import HistoryStore, StatRow
from .rules import AlertRules, AlertTracker
from .webhook import Webhook

logger = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]


class AlertBook:
    """Alert trackers per session, fed by the history writer (one thread at a time)."""

    def __init__(self, store: HistoryStore, rules: AlertRules | None = None,
                 webhook: Webhook | None = None) -> None:
        self.store = store
        self.rules = (rules or AlertRules()).validate()
        self.webhook = webhook
        self.listeners: list[Listener] = []
        self._trackers: dict[str, AlertTracker] = {}
        self._next: dict[str, int] = {}  # session -> next seq
        self._runs: dict[str, str] = {}  # session -> run id
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, store: HistoryStore, settings: Any) -> AlertBook:
        """A book with the settings' rules and webhook (``alert_webhook``)."""
        url = getattr(settings, "alert_webhook", None)
        webhook = None if not url else \
            Webhook(url, timeout_s=getattr(settings, "alert_webhook_timeout_s", 5.0))
        return cls(store, AlertRules.from_settings(settings), webhook)

    def count(self, session: str) -> int:
        """Alerts raised so far in ``session`` (what changes when a new one is raised)."""
        with self._lock:
            known = self._next.get(session)
        return self.store.alert_count(session) if known is None else known

    def rows(self, session: str, rows: list[StatRow]) -> list[dict[str, Any]]:
        """Evaluate a session's new stats rows; the alert messages they raised (stored,
        logged, sent)."""
        tracker = self._tracker(session, before=min((r.step for r in rows), default=None))
        raised = []
        for row in rows:
            if row.heads is None:
                continue
            for alert in tracker.observe(row.step, row.heads):
                with self._lock:
                    seq = self._next[session]
                    self._next[session] = seq + 1
                raised.append(alert.to_message(self._runs[session], session, seq))
        if not raised:
            return raised
        self.store.add_alerts(session, raised)
        for message in raised:
            logger.warning("attnscope alert (run %s): %s", message["run"], message["text"])
            if self.webhook is not None:
                self.webhook.submit(message)
            for listener in list(self.listeners):
                try:
                    listener(message)
                except Exception:  # a listener's bug must not stop the history writer
                    logger.exception("alert listener %r failed", listener)
        return raised

    def _tracker(self, session: str, before: int | None) -> AlertTracker:
        """The session's tracker; on first use, replayed from the rows stored before
        ``before`` without raising anything (a server restarted on the same data dir)."""
        tracker = self._trackers.get(session)
        if tracker is not None:
            return tracker
        tracker = AlertTracker(self.rules)
        stored = self.store.session(session)
        if before is not None:
            for row in self.store.stats(session, end=before - 1):
                if row.heads is not None:
                    tracker.observe(row.step, row.heads)
        with self._lock:
            self._trackers[session] = tracker
            self._next[session] = self.store.alert_count(session)
            self._runs[session] = stored.run if stored is not None else session
        return tracker

    def forget(self, session: str) -> None:
        with self._lock:
            self._trackers.pop(session, None)
            self._next.pop(session, None)
            self._runs.pop(session, None)

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()
