"""The history writer: one :class:`HistoryWriter` per server records every run of its
registry into a :class:`~.store.HistoryStore`, with one writer thread.

Local runs are recorded by a :class:`~.recorder.RunRecorder` in their training thread;
remote runs by their publisher, whose records arrive through the run's inbox
(:mod:`attnscope.backend.remote.history`). Either way the items end up in
:meth:`HistoryWriter.submit`.
A record that fails to write fails alone: the rest of its batch, and other runs, are
written, and the failure is logged once per run and kind of record.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...core.history_config import HistoryConfig
from ...core.history_items import (
    SnapshotItem,
    StepItem,
    StoredSnapshot,
    StoredStats,
    stat_rows,
)
from ...core.run_base import BaseRun, RunRegistry
from ..alerts.book import AlertBook
from .roles import RoleBook
from .store import HistoryLocked, HistoryStore

if TYPE_CHECKING:  # pragma: no cover
    from ...training.recorder import RunRecorder

logger = logging.getLogger(__name__)

WRITE_PERIOD_S = 0.25  # the writer collects records this long before writing them
# (run, kind) pairs whose write failures were logged; past this many the set starts over
# (a long-lived server with failing runs logs each again, never floods).
MAX_LOGGED_FAILURES = 1024


class HistoryWriter:
    """Records the runs of a registry into a :class:`HistoryStore` with one writer thread."""

    def __init__(self, store: HistoryStore, config: HistoryConfig | None = None,
                 alerts: AlertBook | None = None) -> None:
        self.store = store
        self.config = (config or HistoryConfig()).validate()
        self.recorders: dict[str, RunRecorder] = {}
        self.roles = RoleBook(store)  # head roles per session, fed by the writer
        self.alerts = alerts if alerts is not None else AlertBook(store)  # fed by the writer
        self.dropped = 0
        self.failed = 0  # records that could not be written (logged once per run and kind)
        self._logged: set[tuple[str, str]] = set()
        self._queue: queue.Queue = queue.Queue(self.config.queue_size)
        self._registry: RunRegistry | None = None
        self._ended: dict[str, int] = {}  # session -> the last step said ended (see _sync)
        self._closed = False
        self._queued_bytes = 0  # bytes of tensors waiting for the writer
        self._bytes_lock = threading.Lock()
        self._wake = threading.Event()  # set by flush() and close(): write now
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_loop, name="attnscope-history",
                                        daemon=True)
        self._thread.start()

    # -- runs ------------------------------------------------------------------

    def attach(self, run: BaseRun) -> RunRecorder:
        """Start recording ``run`` (its model must be in this process)."""
        recorder = self._attach(run)
        if recorder is None:
            raise TypeError(f"run {run.id!r} has no model in this process: history records "
                            "local runs only")
        return recorder

    def _attach(self, run: BaseRun) -> RunRecorder | None:
        """``run``'s recorder, made if needed; None for a run recorded elsewhere."""
        with self._lock:
            recorder = self.recorders.get(run.id)
            if recorder is None or recorder.run is not run:
                new = run.new_recorder(self)
                if new is None:
                    return None
                if recorder is not None:
                    recorder.detach()
                recorder = self.recorders[run.id] = new
            return recorder

    def detach(self, run_id: str) -> None:
        with self._lock:
            recorder = self.recorders.pop(run_id, None)
        if recorder is not None:
            recorder.detach()

    def watch(self, registry: RunRegistry) -> None:
        """Record every run of ``registry``, now and as runs are added or removed."""
        self._registry = registry
        registry.add_listener(self._sync)
        self._sync()

    def _sync(self) -> None:
        registry = self._registry
        if registry is None:
            return
        # Runs recorded here: those with a model in this process (a remote run's
        # publisher records it and sends the records to its inbox).
        runs = registry.list()
        recorded = {run.id for run in runs if self._attach(run) is not None}
        for run_id in [r for r in self.recorders if r not in recorded]:
            self.detach(run_id)
        for run in runs:
            if run.status == "ended" and run.step_index is not None:
                self._mark_ended(run.id, run.step_index)

    def _mark_ended(self, run_id: str, step: int) -> None:
        """Keep an ended run's last step in its session (``ended_at_step``): the statistics
        the budget thinned may have skipped it, and the run, browsed after its process is
        gone (:mod:`.browse`), shows it."""
        session = self.session_of(run_id)
        if session is None or self._ended.get(session) == step:
            return
        self._ended[session] = step
        self.store.update_meta(session, ended_at_step=int(step))

    def new_session(self, run_id: str, name: str | None, meta: dict[str, Any], *,
                    remote: bool = False) -> str:
        """A new stored session of run ``run_id``; its id. ``remote``: sent by the run's
        publisher (its own quotas; raises :class:`~.store.HistoryFull` when every remote
        run kept is being recorded)."""
        if not remote:
            return self.store.new_session(run_id, name, meta).id
        recording = {run.id for run in self._registry.list()} if self._registry else set()
        recording = {r for r in recording if r != run_id and self._remote_inbox(r) is not None}
        return self.store.new_session(run_id, name, meta, origin="remote", keep=recording).id

    def _remote_inbox(self, run_id: str) -> Any:
        """The inbox of a live remote run whose publisher records
        (attnscope.backend.remote.history)."""
        try:
            run = self._registry.get(run_id) if self._registry is not None else None
        except KeyError:
            return None
        inbox = None if run is None else run.history_inbox
        return inbox if inbox is not None and run.status == "live" else None

    def is_recording(self, run_id: str) -> bool:
        """Whether run ``run_id`` is being recorded now (here, or by its publisher)."""
        return run_id in self.recorders or self._remote_inbox(run_id) is not None

    def live_sessions(self) -> set[str]:
        """Sessions being recorded now: local runs' and live remote runs' (whose
        publishers record and send them, see ``attnscope.backend.remote.history``)."""
        live = {r.session for r in self.recorders.values() if r.session is not None}
        for run in self._registry.list() if self._registry is not None else ():
            inbox = self._remote_inbox(run.id)
            if inbox is not None and inbox.session is not None:
                live.add(inbox.session)
        return live

    def session_of(self, run_id: str) -> str | None:
        """The session being recorded for a live run id (None before its first step),
        else the newest stored one of that id."""
        recorder = self.recorders.get(run_id) or self._remote_inbox(run_id)
        if recorder is not None:
            return recorder.session
        session = self.store.latest_session(run_id)
        return None if session is None else session.id

    # -- writer ----------------------------------------------------------------

    def submit(self, item: Any) -> bool:
        """Queue an item for the writer; never blocks. False: the queue is full and the
        item was dropped (counted in ``dropped``; the recorder tells its run's budget,
        which thins the history's work). Nothing is logged: the budget says it."""
        size = getattr(item, "nbytes", 0)
        with self._bytes_lock:
            # One item larger than the cap (a snapshot's copies of a big model: 12 layers x
            # 2 probes x q, k at L=512 are 75 MB) is taken when nothing else waits, so
            # memory stays bounded by max(cap, one item) and big models still get snapshots.
            fits = self._queued_bytes + size <= self.config.queue_bytes \
                or self._queued_bytes == 0
            if fits:
                self._queued_bytes += size
        try:
            if not fits:
                raise queue.Full
            self._queue.put_nowait(item)
        except queue.Full:
            if fits:
                with self._bytes_lock:
                    self._queued_bytes -= size
            self.dropped += 1
            return False
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        done = threading.Event()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._queue.put(done, timeout=0.1)
                break
            except queue.Full:
                continue
        else:
            return False
        self._wake.set()
        return done.wait(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 10.0) -> None:
        """Stop recording every run, write what is queued, stop the writer, close the store."""
        if self._closed:
            return
        self._closed = True
        if self._registry is not None:
            self._registry.remove_listener(self._sync)
        for run_id in list(self.recorders):
            self.detach(run_id)
        self._queue.put(None)
        self._wake.set()
        self._thread.join(timeout)
        self.alerts.close()
        self.store.close()

    def _write_loop(self) -> None:
        # torch's default intra-op thread count (see stream.reduce.limit_threads)
        while True:
            item = self._queue.get()
            if isinstance(item, StepItem | SnapshotItem):
                # Wake a few times a second, not once per step: fewer GIL hand-offs with
                # the training thread, and one SQLite transaction for many rows.
                self._wake.wait(WRITE_PERIOD_S)
                self._wake.clear()
            batch = [item]
            while item is not None and len(batch) < 1024:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            cpu = time.thread_time()
            try:
                self._write(batch)
            except Exception:  # a fault of the writer itself, not of one record
                logger.exception("history: writing failed")
            self._charge(batch, time.thread_time() - cpu)
            if any(x is None for x in batch):
                return

    def _charge(self, batch: list[Any], cpu_s: float) -> None:
        """Charge the writer's CPU time for ``batch`` to the budgets of the local runs whose
        records it held, in proportion to their bytes (a remote run's publisher pays in
        its own process)."""
        by_session: dict[str, list[float]] = {}
        for item in batch:
            if isinstance(item, StepItem | SnapshotItem):
                part = by_session.setdefault(item.session, [0.0, 0.0])
                part[isinstance(item, SnapshotItem)] += max(item.nbytes, 1)
        total = sum(sum(p) for p in by_session.values())
        if not total:
            return
        for recorder in list(self.recorders.values()):
            part = by_session.get(recorder.session or "")
            if part is not None:
                recorder.run.budget.spend_helper("stats", cpu_s * part[0] / total)
                recorder.run.budget.spend_helper("snapshots", cpu_s * part[1] / total)

    def _write(self, batch: list[Any]) -> None:
        steps: list[StepItem] = []
        for item in batch:
            with self._bytes_lock:
                self._queued_bytes -= getattr(item, "nbytes", 0)
            if isinstance(item, StepItem):
                steps.append(item)
                continue
            self._write_stats(steps)  # keep the order of the items
            steps = []
            if isinstance(item, threading.Event):
                item.set()
                continue
            if item is None:  # close(): written up to here
                continue
            try:
                self._write_one(item)
            except Exception as exc:  # one record fails alone, logged below
                self._failed(item.session, type(item).__name__, exc)
        self._write_stats(steps)

    def _write_one(self, item: Any) -> None:
        if not self.store.has_session(item.session):
            return  # deleted (a quota) while the record waited: no role tracker for it
        if isinstance(item, StoredStats):
            self._add_rows(item.session, item.rows)
        elif isinstance(item, SnapshotItem | StoredSnapshot):
            tensors = item.arrays()
            self.roles.snapshot(item.session, item.step, tensors)
            self.store.add_snapshot(item.session, item.step, item.time, tensors)
            if item.labels is not None:
                self.store.update_meta(item.session, probe_labels=item.labels,
                                       probe_shape=list(next(iter(tensors.values())).shape))

    def _write_stats(self, steps: list[StepItem]) -> None:
        """The steps' rows, computed together; if that fails, step by step (so one bad
        step costs only its own row), then written session by session, with their roles
        and the alerts they raise."""
        if not steps:
            return
        try:
            by_session = stat_rows(steps, self.config.stats_rows)
        except Exception:  # retried one step at a time below
            by_session = {}
            for item in steps:
                try:
                    rows = stat_rows([item], self.config.stats_rows)
                except Exception as exc:  # this step alone is lost
                    self._failed(item.session, "step", exc)
                    continue
                for session, found in rows.items():
                    by_session.setdefault(session, []).extend(found)
        for session, rows in by_session.items():
            if not self.store.has_session(session):
                continue  # deleted (a quota) while the rows waited
            try:
                self._add_rows(session, rows)
            except Exception as exc:  # other sessions are still written
                self._failed(session, "stats", exc)

    def _add_rows(self, session: str, rows: list) -> None:
        """Store a session's new stats rows, with their roles and the alerts they raise."""
        rows = self.roles.rows(session, rows)
        self.store.add_stats(session, rows)
        try:
            self.alerts.rows(session, rows)
        except Exception:  # the rows are stored; an alert bug must not stop the writer
            logger.exception("history: evaluating alert rules failed")

    def _failed(self, session: str, kind: str, exc: Exception) -> None:
        """A record that could not be written: counted, and logged once per run and kind
        (one line naming the run, no traceback: the same failure would repeat)."""
        self.failed += 1
        found = self.store.session(session)
        run = found.run if found is not None else f"(session {session})"
        if (run, kind) in self._logged:
            return
        if len(self._logged) >= MAX_LOGGED_FAILURES:
            self._logged.clear()
        self._logged.add((run, kind))
        logger.warning("history: a %s record of run %r could not be written and was dropped "
                       "(%s: %s); further failures of this run's %s records are not logged",
                       kind, run, type(exc).__name__, str(exc)[:200], kind)


def open_service(settings: Any, **overrides: Any) -> HistoryWriter | None:
    """A recording service on ``settings.data_dir / "history"``, or None when disabled."""
    config = HistoryConfig.from_settings(settings, **overrides)
    if not config.enabled:
        return None
    store = HistoryStore(Path(settings.data_dir) / "history", max_snapshots=config.max_snapshots,
                         max_bytes=config.max_bytes, max_stat_points=config.max_stat_points,
                         max_sessions=config.max_sessions,
                         max_run_sessions=config.max_run_sessions,
                         max_run_bytes=config.max_run_bytes,
                         max_remote_runs=config.max_remote_runs)
    return HistoryWriter(store, config, AlertBook.from_settings(store, settings))


def start(settings: Any, registry: Any) -> HistoryWriter | None:
    """Record every run of ``registry``; None (history answers 503) when disabled or when
    another process owns the data dir's history."""
    try:
        service = open_service(settings)
    except HistoryLocked as exc:
        logger.warning("history disabled: %s", exc)
        return None
    if service is not None:
        if service.config.probe_budget is not None:
            logger.warning("ATTNSCOPE_HISTORY_PROBE_BUDGET is deprecated: ATTNSCOPE_MAX_OVERHEAD "
                           "bounds the probe passes with the rest of the dashboard's work")
        service.watch(registry)
    return service
