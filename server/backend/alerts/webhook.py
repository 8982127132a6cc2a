"""Alerts to a webhook (``ATTNSCOPE_ALERT_WEBHOOK``): a JSON POST with a Slack-compatible
``text`` field, from one daemon thread that nothing waits for.

Callers only queue (:meth:`Webhook.submit` never blocks; a full queue drops and
counts). The thread sends what waits as one POST (a collapse raises alerts on many
heads at once: one message lists them), with a timeout, at most one POST per
``min_interval_s``. A failed POST (timeout, refused, an HTTP error status) is not
retried: its alerts are counted in ``failed``, one warning is logged for the streak,
and nothing is sent for ``backoff_s`` (doubling while it keeps failing, up to 16x),
so a dead or slow endpoint costs one attempt per back-off, never a storm.

The body: ``{"text": "...", "alerts": [<alert message>, ...]}`` (the messages of
:meth:`attnscope.backend.alerts.rules.Alert.to_message`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any

import httpx

logger = logging.getLogger(__name__)

MAX_LINES = 10  # alert lines in one message's text; the rest is "... and N more"


def webhook_text(messages: list[dict[str, Any]]) -> str:
    """The ``text`` of one POST: one line per alert (at most :data:`MAX_LINES`).

    >>> webhook_text([{"run": "lm", "text": "step 3: L0 H1 went uniform"}])
    'attnscope alert on run lm: step 3: L0 H1 went uniform'
    """
    lines = [f"attnscope alert on run {m['run']}: {m['text']}" for m in messages[:MAX_LINES]]
    if len(messages) > MAX_LINES:
        lines.append(f"... and {len(messages) - MAX_LINES} more alerts")
    return "\n".join(lines)


class Webhook:
    """POSTs alert messages to ``url`` from its own thread (see the module docstring)."""

    def __init__(self, url: str, timeout_s: float = 5.0, *, queue_size: int = 256,
                 min_interval_s: float = 1.0, backoff_s: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"alert_webhook: expected an http(s) URL, got {url!r}")
        self.url = url
        self.timeout_s = timeout_s
        self.min_interval_s = min_interval_s
        self.backoff_s = backoff_s
        self.sent = 0  # alerts delivered
        self.failed = 0  # alerts in a POST that failed (not retried)
        self.dropped = 0  # alerts not sent: the queue was full, or during a back-off
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._stop = threading.Event()
        self._pause_until = 0.0
        self._streak = 0  # consecutive failed POSTs
        self._client = httpx.Client(timeout=timeout_s)
        self._thread = threading.Thread(target=self._loop, name="attnscope-webhook", daemon=True)
        self._thread.start()

    def submit(self, message: dict[str, Any]) -> bool:
        """Queue one alert message; never blocks. False: dropped (queue full)."""
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Send what waits, then stop the thread (waits at most ``timeout``)."""
        self._stop.set()
        with contextlib.suppress(queue.Full):  # full: the thread sees _stop after its batch
            self._queue.put_nowait(None)
        self._thread.join(timeout)
        self._client.close()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            self._stop.wait(self.min_interval_s)  # let the rest of a burst arrive: one POST
            batch, stop = [first], False
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            if time.monotonic() < self._pause_until:
                self.dropped += len(batch)
            else:
                self._post(batch)
            if stop or self._stop.is_set():
                return

    def _post(self, batch: list[dict[str, Any]]) -> None:
        try:
            response = self._client.post(self.url, json={"text": webhook_text(batch),
                                                          "alerts": batch})
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self.failed += len(batch)
            self._streak += 1
            pause = self.backoff_s * min(16, 2 ** (self._streak - 1))
            self._pause_until = time.monotonic() + pause
            if self._streak == 1:
                logger.warning("alert webhook %s failed (%s); not retried, nothing sent for "
                               "%.0f s", self.url, exc.__class__.__name__, pause)
            return
        if self._streak:
            logger.info("alert webhook %s works again", self.url)
        self._streak = 0
        self.sent += len(batch)
