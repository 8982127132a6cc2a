"""Where history lives: an SQLite index plus one safetensors file per probe snapshot.

Layout under ``root`` (the settings' data dir + ``/history``)::

    index.sqlite3                    sessions, snapshots (step -> file), stats (every step),
                                     alerts (attnscope.backend.alerts)
    files/<session>/<step>.safetensors   ``attention.<layer>`` (P, H, L, S) float16
    tmp/                             snapshots being written (emptied at start)
    .lock                            held (flock) by the one process that owns the store

A *session* is one run of one run id: a restarted run (or the same run id after
a server restart) starts a new session, so steps never collide. A session is
``local`` (recorded in this process) or ``remote`` (sent by a publisher). Snapshot files
are written like captures (temporary file, rename, then the index row), so a
crashed or killed process leaves a listed, complete snapshot or none. The
fsyncs that make this hold through a power loss too cost ~50 ms a snapshot on
a slow disk; they are off unless ``durable=True`` (a lost tail of history after
a power cut is acceptable, a writer that falls behind training is not).
Stats rows (head statistics (layers, 5, H) float32 and the step's scalars) are
appended in batches; past ``max_stat_points`` per session every other row goes
and only every second (fourth, ...) step is kept from then on.

Quotas (docs/security.md): what a run writes only ever evicts that run's own data.
Per run id (and origin): at most ``max_run_sessions`` sessions (its oldest go) and
``max_run_bytes`` of snapshots, statistics and metadata (its older sessions go
first, then its current one is thinned); per session ``max_snapshots`` snapshots
and ``max_stat_points`` rows. Local runs together keep at most ``max_sessions``
sessions and ``max_bytes`` of snapshots; remote runs are never evicted for them,
nor they for remote runs. At most ``max_remote_runs`` remote run ids are kept: a
new one makes the store forget the one whose newest session is the oldest (not
one that is being recorded, see :meth:`HistoryStore.new_session`).

Shape legend: P probe samples, H heads, L queries, S keys.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from ...core.history_items import StatRow
from ...core.stats import STAT_NAMES
from ...core.storage import FolderLock, FolderLocked, fsync_dir, open_index, read_safetensors
from .thinning import thinning_victim

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    run TEXT NOT NULL,
    name TEXT,
    started TEXT NOT NULL,
    meta TEXT NOT NULL,
    stat_stride INTEGER NOT NULL DEFAULT 1,
    stat_seen INTEGER NOT NULL DEFAULT 0,
    origin TEXT NOT NULL DEFAULT 'local',
    stat_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_run ON sessions (run, seq);
CREATE TABLE IF NOT EXISTS snapshots (
    session TEXT NOT NULL,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (session, step)
);
CREATE TABLE IF NOT EXISTS stats (
    session TEXT NOT NULL,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    scalars TEXT NOT NULL,
    heads BLOB,
    PRIMARY KEY (session, step)
);
CREATE TABLE IF NOT EXISTS alerts (
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    step INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (session, seq)
);
"""


# Columns added since the first stores (a store written by an older version gets them).
_ADDED_COLUMNS = {"origin": "TEXT NOT NULL DEFAULT 'local'",
                  "stat_bytes": "INTEGER NOT NULL DEFAULT 0"}
# What a stats row weighs: its statistics and its scalars as stored.
_ROW_BYTES = "COALESCE(LENGTH(heads), 0) + LENGTH(scalars)"
ORIGINS = ("local", "remote")


class HistoryLocked(FolderLocked):
    """Another process already owns this history store."""


class HistoryFull(ValueError):
    """A new remote run cannot be recorded: every remote run kept is being recorded."""


@dataclass(frozen=True)
class Session:
    """One recorded run: ``meta`` holds layers, heads, roles and the probe's description."""

    id: str
    run: str
    name: str | None
    started: str
    meta: dict[str, Any]

    @classmethod
    def from_row(cls, row: tuple) -> Session:
        id_, run, name, started, meta = row
        return cls(id_, run, name, started, json.loads(meta))


class HistoryStore:
    """The history index and snapshot files under ``root``; safe to share between threads.

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as d, HistoryStore(d, max_snapshots=3) as store:
    ...     s = store.new_session("demo", "demo", {"layers": 1})
    ...     eye = {"attention.0": np.eye(2, dtype=np.float16)}
    ...     for step in (0, 10, 20, 30):
    ...         _ = store.add_snapshot(s.id, step, 0.0, eye)
    ...     [step for step, _ in store.snapshots(s.id)]
    [0, 20, 30]
    """

    def __init__(self, root: str | os.PathLike, *, max_snapshots: int = 200,
                 max_bytes: int = 2 * 1024**3, max_stat_points: int = 20_000,
                 max_sessions: int = 100, max_run_sessions: int = 10,
                 max_run_bytes: int = 1024**3, max_remote_runs: int = 32,
                 durable: bool = False) -> None:
        self.root = Path(root)
        self.durable = durable
        self.files = self.root / "files"
        self.tmp = self.root / "tmp"
        self.max_snapshots = max_snapshots
        self.max_bytes = max_bytes
        self.max_stat_points = max_stat_points
        self.max_sessions = max_sessions
        self.max_run_sessions = max_run_sessions
        self.max_run_bytes = max_run_bytes
        self.max_remote_runs = max_remote_runs
        self.deleted: list[Callable[[str], None]] = []  # called with each deleted session
        self.files.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        self._owner = FolderLock(self.root, "history store", HistoryLocked)
        self._lock = threading.RLock()
        # NORMAL: history may lose its last rows on power loss; each commit is not worth an fsync.
        self._db = open_index(self.root / "index.sqlite3", _SCHEMA, "NORMAL")
        self._migrate()
        self._recover()

    # -- lifecycle -------------------------------------------------------------

    def _migrate(self) -> None:
        """Add the columns a store written by an older version lacks."""
        with self._lock:
            have = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE sessions ADD COLUMN {column} {kind}")
            if "origin" not in have:  # publishers' sessions name their publisher session
                self._db.execute("UPDATE sessions SET origin = 'remote' "
                                 "WHERE meta LIKE '%\"publisher_session\"%'")
            if "stat_bytes" not in have:
                self._db.execute(f"UPDATE sessions SET stat_bytes = (SELECT COALESCE(SUM("
                                 f"{_ROW_BYTES}), 0) FROM stats WHERE session = sessions.id)")

    def _recover(self) -> None:
        """Empty ``tmp/``; remove files without a row and rows without a file."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(exist_ok=True)
        with self._lock:
            rows = self._db.execute("SELECT session, step FROM snapshots").fetchall()
            sessions = {r[0] for r in self._db.execute("SELECT id FROM sessions")}
        wanted = {self._path(s, step) for s, step in rows}
        for folder in self.files.iterdir():
            if not folder.is_dir() or folder.name not in sessions:
                shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink()
                continue
            for path in folder.iterdir():
                if path not in wanted:
                    path.unlink(missing_ok=True)
        missing = [(s, step) for s, step in rows if not self._path(s, step).exists()]
        if missing:
            logger.warning("history store: %d snapshots had no file; dropped", len(missing))
            with self._lock:
                self._db.executemany("DELETE FROM snapshots WHERE session = ? AND step = ?",
                                     missing)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._owner.release()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions --------------------------------------------------------------

    def new_session(self, run: str, name: str | None, meta: dict[str, Any], *,
                    origin: str = "local", keep: Collection[str] = ()) -> Session:
        """Start recording a run (``origin``: ``local``, or ``remote`` for a publisher's).

        The run's oldest sessions past ``max_run_sessions`` are deleted, and a local
        run's oldest local sessions past ``max_sessions``. A remote run id new to the
        store, past ``max_remote_runs`` remote run ids, makes it forget the remote run
        whose newest session is the oldest, of those not in ``keep`` (the runs being
        recorded); :class:`HistoryFull` when there is none.
        """
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
        session = Session(uuid.uuid4().hex[:16], run, name,
                          datetime.now(UTC).isoformat().replace("+00:00", "Z"), dict(meta))
        with self._lock:
            old = self._remote_room(run, keep) if origin == "remote" else []
            self._db.execute(
                "INSERT INTO sessions (id, run, name, started, meta, origin) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (session.id, run, name, session.started, json.dumps(session.meta), origin))
            old += [r[0] for r in self._db.execute(
                "SELECT id FROM sessions WHERE run = ? AND origin = ? ORDER BY seq DESC "
                "LIMIT -1 OFFSET ?", (run, origin, self.max_run_sessions))]
            if origin == "local":
                old += [r[0] for r in self._db.execute(
                    "SELECT id FROM sessions WHERE origin = 'local' ORDER BY seq DESC "
                    "LIMIT -1 OFFSET ?", (self.max_sessions,))]
            for session_id in dict.fromkeys(old):
                self.delete_session(session_id)
        return session

    def _remote_room(self, run: str, keep: Collection[str]) -> list[str]:
        """The sessions to delete so that remote run ``run`` fits ``max_remote_runs``."""
        runs = [r[0] for r in self._db.execute(
            "SELECT run FROM sessions WHERE origin = 'remote' GROUP BY run ORDER BY MAX(seq)")]
        if run in runs or len(runs) < self.max_remote_runs:
            return []
        spare = [r for r in runs if r not in keep]
        if not spare:
            raise HistoryFull(f"this server keeps the history of at most {self.max_remote_runs} "
                              "remote runs (ATTNSCOPE_HISTORY_MAX_REMOTE_RUNS), all being "
                              "recorded now; try again later")
        logger.info("history: forgot remote run %r (its newest session the oldest) to record "
                    "%r", spare[0], run)
        return [r[0] for r in self._db.execute(
            "SELECT id FROM sessions WHERE origin = 'remote' AND run = ?", (spare[0],))]

    def update_meta(self, session_id: str, **values: Any) -> None:
        """Merge ``values`` into a session's meta (e.g. the probe's labels once known)."""
        with self._lock:
            session = self.session(session_id)
            if session is None:
                return
            meta = {**session.meta, **values}
            self._db.execute("UPDATE sessions SET meta = ? WHERE id = ?",
                             (json.dumps(meta), session_id))

    def session(self, session_id: str) -> Session | None:
        with self._lock:
            row = self._db.execute("SELECT id, run, name, started, meta FROM sessions "
                                   "WHERE id = ?", (session_id,)).fetchone()
        return Session.from_row(row) if row else None

    def latest_session(self, run: str) -> Session | None:
        """The newest session of run id ``run``, or None."""
        with self._lock:
            row = self._db.execute("SELECT id, run, name, started, meta FROM sessions "
                                   "WHERE run = ? ORDER BY seq DESC LIMIT 1", (run,)).fetchone()
        return Session.from_row(row) if row else None

    def sessions(self) -> list[dict[str, Any]]:
        """Every session, newest first, with its snapshot count, step range and bytes."""
        with self._lock:
            rows = self._db.execute("""
                SELECT s.id, s.run, s.name, s.started, s.meta, COUNT(p.step), MIN(p.step),
                       MAX(p.step), COALESCE(SUM(p.bytes), 0)
                FROM sessions s LEFT JOIN snapshots p ON p.session = s.id
                GROUP BY s.id ORDER BY s.seq DESC""").fetchall()
        out = []
        for row in rows:
            session = Session.from_row(row[:5])
            out.append({"session": session.id, "run": session.run, "name": session.name,
                        "started": session.started, "snapshots": row[5], "first_step": row[6],
                        "last_step": row[7], "bytes": row[8], "meta": session.meta})
        return out

    def delete_session(self, session_id: str) -> None:
        with self._lock:
            for table, column in (("snapshots", "session"), ("stats", "session"),
                                  ("alerts", "session"), ("sessions", "id")):
                self._db.execute(f"DELETE FROM {table} WHERE {column} = ?", (session_id,))
            shutil.rmtree(self.files / session_id, ignore_errors=True)
        for listener in self.deleted:
            listener(session_id)

    def has_session(self, session_id: str) -> bool:
        with self._lock:
            return self._run_of(session_id) is not None

    def _run_of(self, session_id: str) -> tuple[str, str] | None:
        """(run, origin) of a session, or None when it is gone."""
        row = self._db.execute("SELECT run, origin FROM sessions WHERE id = ?",
                               (session_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    # -- snapshots -------------------------------------------------------------

    def _path(self, session_id: str, step: int) -> Path:
        return self.files / session_id / f"{step}.safetensors"

    def add_snapshot(self, session_id: str, step: int, time: float,
                     tensors: dict[str, np.ndarray]) -> int:
        """Write one snapshot durably, index it, then thin and apply the quotas; returns its
        file size (0: the session was deleted meanwhile, nothing is kept)."""
        with self._lock:
            if self._run_of(session_id) is None:
                return 0
        folder = self.files / session_id
        folder.mkdir(exist_ok=True)
        tmp = self.tmp / f"{session_id}-{step}.tmp"
        final = self._path(session_id, step)
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        try:
            safetensors.numpy.save_file(tensors, tmp, metadata={"session": session_id,
                                                                "step": str(step)})
            if self.durable:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
            if self.durable:
                fsync_dir(folder)
        except BaseException:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        size = final.stat().st_size
        with self._lock:
            owner = self._run_of(session_id)
            if owner is None:  # deleted while the file was written
                shutil.rmtree(folder, ignore_errors=True)
                return 0
            self._db.execute("INSERT OR REPLACE INTO snapshots (session, step, time, bytes) "
                             "VALUES (?, ?, ?, ?)", (session_id, step, time, size))
            self._thin(session_id)
            self._enforce_run_quota(session_id, *owner)
            if owner[1] == "local":
                self._enforce_cap(session_id)
        return size

    def _drop_snapshot(self, session_id: str, step: int) -> None:
        self._db.execute("DELETE FROM snapshots WHERE session = ? AND step = ?",
                         (session_id, step))
        self._path(session_id, step).unlink(missing_ok=True)

    def _steps(self, session_id: str) -> list[int]:
        return [r[0] for r in self._db.execute(
            "SELECT step FROM snapshots WHERE session = ? ORDER BY step", (session_id,))]

    def _thin(self, session_id: str) -> None:
        steps = self._steps(session_id)
        while len(steps) > self.max_snapshots:
            victim = thinning_victim(steps)
            self._drop_snapshot(session_id, steps.pop(victim))

    def total_bytes(self, origin: str | None = None) -> int:
        """Bytes of all snapshot files (of ``origin``'s sessions only, if given)."""
        with self._lock:
            return self._db.execute(
                "SELECT COALESCE(SUM(p.bytes), 0) FROM snapshots p JOIN sessions s "
                "ON s.id = p.session WHERE ?1 IS NULL OR s.origin = ?1", (origin,)).fetchone()[0]

    def run_bytes(self, run: str, origin: str = "local") -> int:
        """What run ``run`` (of ``origin``) holds: snapshot files, stats rows and metadata."""
        with self._lock:
            snapshots = self._db.execute(
                "SELECT COALESCE(SUM(p.bytes), 0) FROM snapshots p JOIN sessions s "
                "ON s.id = p.session WHERE s.run = ? AND s.origin = ?", (run, origin)).fetchone()
            rest = self._db.execute(
                "SELECT COALESCE(SUM(stat_bytes + LENGTH(meta)), 0) FROM sessions "
                "WHERE run = ? AND origin = ?", (run, origin)).fetchone()
        return snapshots[0] + rest[0]

    def _enforce_run_quota(self, current: str, run: str, origin: str) -> None:
        """Evict run ``run``'s own data until it fits ``max_run_bytes``: its other sessions,
        oldest first, then its current one thinned (snapshots or statistics rows, whichever
        weighs more), its newest snapshot kept last."""
        while self.run_bytes(run, origin) > self.max_run_bytes:
            older = self._db.execute(
                "SELECT id FROM sessions WHERE run = ? AND origin = ? AND id != ? ORDER BY seq "
                "LIMIT 1", (run, origin, current)).fetchone()
            if older is not None:
                self.delete_session(older[0])
                continue
            steps = self._steps(current)
            snapshot_bytes = self._db.execute(
                "SELECT COALESCE(SUM(bytes), 0) FROM snapshots WHERE session = ?",
                (current,)).fetchone()[0]
            stat_bytes = self._db.execute("SELECT stat_bytes FROM sessions WHERE id = ?",
                                          (current,)).fetchone()[0]
            if steps and snapshot_bytes >= stat_bytes:
                if len(steps) == 1:
                    logger.warning("history: one snapshot of session %s is over run %r's quota "
                                   "of %d bytes (history_max_run_bytes); it is not kept",
                                   current, run, self.max_run_bytes)
                self._drop_snapshot(current, steps[thinning_victim(steps)] if len(steps) >= 3
                                    else steps[0])
            elif not self._halve_stats(current):
                return  # its metadata alone: nothing left to evict

    def _enforce_cap(self, current: str) -> None:
        """Drop local snapshots until they fit ``max_bytes``: other local sessions' oldest
        first (the fattest session first), then the current one thinned, its newest kept
        last. Remote sessions have their own quotas (``_enforce_run_quota``)."""
        while self.total_bytes("local") > self.max_bytes:
            other = self._db.execute(
                "SELECT p.session, MIN(p.step) FROM snapshots p JOIN sessions s "
                "ON s.id = p.session WHERE s.origin = 'local' AND p.session != ? "
                "GROUP BY p.session ORDER BY SUM(p.bytes) DESC LIMIT 1", (current,)).fetchone()
            if other is not None:
                self._drop_snapshot(other[0], other[1])
                continue
            steps = self._steps(current)
            if not steps:
                return
            if len(steps) >= 3:
                self._drop_snapshot(current, steps[thinning_victim(steps)])
            else:
                if len(steps) == 1:
                    logger.warning("history: one snapshot of session %s is over the cap of %d "
                                   "bytes (history_max_bytes); it is not kept",
                                   current, self.max_bytes)
                self._drop_snapshot(current, steps[0])

    def snapshots(self, session_id: str, start: int | None = None,
                  end: int | None = None) -> list[tuple[int, float]]:
        """(step, time) of the kept snapshots with ``start <= step <= end``, ascending."""
        lo = start if start is not None else -(2**62)
        hi = end if end is not None else 2**62
        with self._lock:
            return [(r[0], r[1]) for r in self._db.execute(
                "SELECT step, time FROM snapshots WHERE session = ? AND step BETWEEN ? AND ? "
                "ORDER BY step", (session_id, lo, hi))]

    def snapshot_at(self, session_id: str, step: int) -> int | None:
        """The step of the newest snapshot at or before ``step``, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(step) FROM snapshots WHERE session = ? AND step <= ?",
                (session_id, step)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def load_snapshot(self, session_id: str, step: int,
                      names: Iterable[str] | None = None) -> dict[str, np.ndarray] | None:
        """The tensors of one snapshot (only ``names`` if given), or None if it is gone."""
        wanted = None if names is None else set(names)
        try:
            with open(self._path(session_id, step), "rb") as f:
                return {k: v for k, v in read_safetensors(f) if wanted is None or k in wanted}
        except FileNotFoundError:
            return None

    # -- stats -----------------------------------------------------------------

    def add_stats(self, session_id: str, rows: Sequence[StatRow]) -> None:
        """Append per-step rows in one transaction, thinning past ``max_stat_points``, then
        apply the run's quota. Rows of a deleted session are dropped."""
        with self._lock:
            found = self._db.execute("SELECT stat_stride, stat_seen, run, origin FROM sessions "
                                     "WHERE id = ?", (session_id,)).fetchone()
            if found is None:
                return
            stride, seen, run, origin = found
            self._db.execute("BEGIN")
            try:
                added = 0
                for row in rows:
                    keep = seen % stride == 0
                    seen += 1
                    if not keep:
                        continue
                    blob = None if row.heads is None else \
                        np.ascontiguousarray(row.heads, "<f4").tobytes()
                    scalars = json.dumps(row.scalars)
                    replaced = self._db.execute(
                        f"SELECT {_ROW_BYTES} FROM stats WHERE session = ? AND step = ?",
                        (session_id, row.step)).fetchone()
                    added += len(blob or b"") + len(scalars) - (replaced[0] if replaced else 0)
                    self._db.execute(
                        "INSERT OR REPLACE INTO stats (session, step, time, scalars, heads) "
                        "VALUES (?, ?, ?, ?, ?)", (session_id, row.step, row.time, scalars, blob))
                self._db.execute("UPDATE sessions SET stat_stride = ?, stat_seen = ?, "
                                 "stat_bytes = stat_bytes + ? WHERE id = ?",
                                 (stride, seen, added, session_id))
                count = self._db.execute("SELECT COUNT(*) FROM stats WHERE session = ?",
                                         (session_id,)).fetchone()[0]
                if count > self.max_stat_points:
                    self._halve_stats(session_id)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._enforce_run_quota(session_id, run, origin)

    def _halve_stats(self, session_id: str) -> bool:
        """Drop every other stats row of a session and keep every other step from now on;
        False when it has fewer than two rows."""
        count = self._db.execute("SELECT COUNT(*) FROM stats WHERE session = ?",
                                 (session_id,)).fetchone()[0]
        if count < 2:
            return False
        self._db.execute("""
            DELETE FROM stats WHERE session = ?1 AND step IN (
                SELECT step FROM (SELECT step, ROW_NUMBER() OVER (ORDER BY step) AS n
                                  FROM stats WHERE session = ?1) WHERE n % 2 = 0)""",
                         (session_id,))
        self._db.execute(f"UPDATE sessions SET stat_stride = stat_stride * 2, stat_bytes = ("
                         f"SELECT COALESCE(SUM({_ROW_BYTES}), 0) FROM stats WHERE session = ?1) "
                         "WHERE id = ?1", (session_id,))
        return True

    def stats(self, session_id: str, start: int | None = None,
              end: int | None = None, points: int | None = None) -> list[StatRow]:
        """Stats rows with ``start <= step <= end``, ascending; ``heads`` (layers, R, H).
        ``points``: at most that many rows, spread evenly over those (the first and last
        among them), only those read."""
        session = self.session(session_id)
        if session is None:
            return []
        layers = int(session.meta.get("layers", 0))
        names = len(session.meta.get("stat_names") or STAT_NAMES)
        lo = start if start is not None else -(2**62)
        hi = end if end is not None else 2**62
        with self._lock:
            if points is not None:
                steps = [r[0] for r in self._db.execute(
                    "SELECT step FROM stats WHERE session = ? AND step BETWEEN ? AND ? "
                    "ORDER BY step", (session_id, lo, hi))]
                if len(steps) > points:
                    picked = np.unique(np.linspace(0, len(steps) - 1, points).round().astype(int))
                    steps = [steps[i] for i in picked]
                rows = []
                for i in range(0, len(steps), 500):  # SQLite's bound on host parameters
                    chunk = steps[i: i + 500]
                    rows += self._db.execute(
                        "SELECT step, time, scalars, heads FROM stats WHERE session = ? AND "
                        f"step IN ({','.join('?' * len(chunk))}) ORDER BY step",
                        (session_id, *chunk)).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT step, time, scalars, heads FROM stats WHERE session = ? AND step "
                    "BETWEEN ? AND ? ORDER BY step", (session_id, lo, hi)).fetchall()
        out = []
        for step, time_, scalars, blob in rows:
            arr = None if blob is None else \
                np.frombuffer(blob, "<f4").reshape(layers, names, -1)
            out.append(StatRow(step, time_, json.loads(scalars), arr))
        return out

    # -- alerts ----------------------------------------------------------------

    def add_alerts(self, session_id: str, messages: Sequence[dict[str, Any]]) -> None:
        """Store alert messages (``attnscope.backend.alerts.rules.Alert.to_message``: ``seq``,
        ``step``...) of a session, in one transaction."""
        if not messages:
            return
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO alerts (session, seq, step, body) VALUES (?, ?, ?, ?)",
                [(session_id, m["seq"], m["step"], json.dumps(m)) for m in messages])

    def alerts(self, session_id: str, start: int | None = None, end: int | None = None,
               limit: int | None = None) -> list[dict[str, Any]]:
        """A session's alert messages with ``start <= step <= end``, oldest first; the last
        ``limit`` of them when given."""
        lo = start if start is not None else -(2**62)
        hi = end if end is not None else 2**62
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM (SELECT seq, body FROM alerts WHERE session = ? AND step "
                "BETWEEN ? AND ? ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                (session_id, lo, hi, -1 if limit is None else limit)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def alert_count(self, session_id: str) -> int:
        """How many alerts a session has stored (the next one's ``seq``)."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM alerts "
                                   "WHERE session = ?", (session_id,)).fetchone()
        return int(row[0])

    def stat_at(self, session_id: str, step: int | None) -> StatRow | None:
        """The stats row at or before ``step`` (None: the last one), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT step FROM stats WHERE session = ? AND step <= ? ORDER BY step DESC "
                "LIMIT 1", (session_id, 2**62 if step is None else step)).fetchone()
        if row is None:
            return None
        found = self.stats(session_id, row[0], row[0])
        return found[0] if found else None
