"""Where captures live: an SQLite index plus one safetensors file per capture.

Layout under ``root`` (the settings' data dir + ``/captures``)::

    index.sqlite3          one row per capture (id, run, name, created, tensors, sizes)
    files/<id>.safetensors the tensors, with the capture id and run in its header
    tmp/                   captures being written (never listed; emptied at start)
    .lock                  held (flock) by the one process that owns the store

Crash safety: a capture is written to its temporary file, fsynced, renamed to
its final name (and the directory fsynced) *before* its index row commits. A
crash at any moment therefore leaves either a listed, complete capture or
none. At start, ``tmp/`` is emptied, files without a row (a crash between the
rename and the commit) and anything else in ``files/`` are removed, and rows
whose file vanished are dropped. A delete commits the row's removal first,
then unlinks the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.numpy

from ...core.storage import FolderLock, FolderLocked, fsync_dir, open_index, read_safetensors

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    run TEXT NOT NULL,
    name TEXT,
    created TEXT NOT NULL,
    tensors TEXT NOT NULL,
    tensor_bytes INTEGER NOT NULL,
    file_bytes INTEGER NOT NULL,
    meta TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS captures_run ON captures (run, seq);
"""
_COLUMNS = "id, run, name, created, tensors, tensor_bytes, file_bytes, meta"
TMP_SUFFIX = ".tmp"
DATA_SUFFIX = ".safetensors"


class StoreLocked(FolderLocked):
    """Another process already owns this capture store."""


class StoreFull(RuntimeError):
    """A capture would take the store past its total byte budget (HTTP 507)."""


@dataclass(frozen=True)
class CaptureRecord:
    """One stored capture's index row.

    ``tensors`` maps each tensor name to ``{"shape": [...], "dtype": "float32"}``;
    ``tensor_bytes`` is the sum of their sizes and ``file_bytes`` the size of
    the safetensors file; ``meta`` is what the API records with it (kinds,
    layers, heads, input description, labels).
    """

    id: str
    run: str
    name: str | None
    created: datetime
    tensors: dict[str, dict[str, Any]]
    tensor_bytes: int
    file_bytes: int
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: tuple) -> CaptureRecord:
        id_, run, name, created, tensors, tensor_bytes, file_bytes, meta = row
        return cls(id_, run, name, datetime.fromisoformat(created), json.loads(tensors),
                   tensor_bytes, file_bytes, json.loads(meta))


class CaptureStore:
    """The capture index and files under ``root``; safe to share between threads.

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as d, CaptureStore(d) as store:
    ...     rec = store.save({"attention.0": np.eye(2, dtype=np.float32)}, run="demo")
    ...     [r.id for r in store.list()[0]] == [rec.id], store.load(rec.id)["attention.0"][1, 1]
    (True, np.float32(1.0))
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self.tmp = self.root / "tmp"
        self.files.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        self._owner = FolderLock(self.root, "capture store", StoreLocked)
        self._db_lock = threading.Lock()
        # FULL: a committed row survives power loss too
        self._db = open_index(self.root / "index.sqlite3", _SCHEMA, "FULL")
        self._reserved = 0  # bytes promised to captures being taken (see reserve)
        self._recover()

    # -- lifecycle -------------------------------------------------------------

    def _recover(self) -> None:
        """Empty ``tmp/``, remove unindexed files; drop rows whose file is gone."""
        with self._db_lock:
            ids = {row[0] for row in self._db.execute("SELECT id FROM captures")}
        wanted = {f"{i}{DATA_SUFFIX}" for i in ids}
        removed = 0
        for path in [*self.tmp.iterdir(), *self.files.iterdir()]:
            if path.parent == self.tmp or path.name not in wanted:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
        missing = [i for i in ids if not self._path(i).exists()]
        if missing:
            logger.warning("capture store: %d indexed captures had no file; dropped", len(missing))
            with self._db_lock:
                self._db.executemany("DELETE FROM captures WHERE id = ?", [(i,) for i in missing])
        if removed:
            logger.info("capture store: removed %d orphaned files from %s", removed, self.files)

    def close(self) -> None:
        """Close the index and release the store for another process."""
        with self._db_lock:
            self._db.close()
        self._owner.release()

    def __enter__(self) -> CaptureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- budget ----------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes of all stored capture files (as indexed)."""
        with self._db_lock:
            return int(self._db.execute(
                "SELECT COALESCE(SUM(file_bytes), 0) FROM captures").fetchone()[0])

    @contextlib.contextmanager
    def reserve(self, nbytes: int, budget: int) -> Iterator[None]:
        """Hold ``nbytes`` of ``budget`` while a capture is taken and saved; raise
        :class:`StoreFull` (before any work) when stored plus reserved bytes would pass it."""
        used = self.used_bytes()
        with self._db_lock:
            if used + self._reserved + nbytes > budget:
                raise StoreFull(
                    f"the capture store holds {used} bytes (+{self._reserved} being written) of "
                    f"its {budget}-byte budget (ATTNSCOPE_MAX_CAPTURE_BYTES); this capture "
                    f"needs about {nbytes}: delete old captures or raise the budget")
            self._reserved += nbytes
        try:
            yield
        finally:
            with self._db_lock:
                self._reserved -= nbytes

    # -- writing ---------------------------------------------------------------

    def _path(self, capture_id: str) -> Path:
        return self.files / f"{capture_id}{DATA_SUFFIX}"

    def save(self, tensors: dict[str, np.ndarray], *, run: str, name: str | None = None,
             meta: dict[str, Any] | None = None) -> CaptureRecord:
        """Write ``tensors`` durably, then index them; returns the committed record."""
        capture_id = uuid.uuid4().hex
        created = datetime.now(UTC)
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        described = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()}
        tmp = self.tmp / f"{capture_id}{TMP_SUFFIX}"
        final = self._path(capture_id)
        header = {"id": capture_id, "run": run, "created": created.isoformat()}
        try:
            safetensors.numpy.save_file(tensors, tmp, metadata=header)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(self.files)
        except BaseException:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        record = CaptureRecord(
            capture_id, run, name, created, described,
            sum(v.nbytes for v in tensors.values()), final.stat().st_size, dict(meta or {}))
        try:
            with self._db_lock:
                self._db.execute(
                    f"INSERT INTO captures ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.id, run, name, created.isoformat(), json.dumps(described),
                     record.tensor_bytes, record.file_bytes, json.dumps(record.meta)))
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        logger.debug("stored capture %s (%d bytes)", capture_id, record.file_bytes)
        return record

    def delete(self, capture_id: str) -> bool:
        """Remove a capture; False when there was none with this id."""
        with self._db_lock:
            gone = self._db.execute("DELETE FROM captures WHERE id = ?", (capture_id,)).rowcount
        if gone:
            self._path(capture_id).unlink(missing_ok=True)
        return bool(gone)

    # -- reading ---------------------------------------------------------------

    def get(self, capture_id: str) -> CaptureRecord | None:
        """The record of ``capture_id``, or None."""
        with self._db_lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM captures WHERE id = ?", (capture_id,)).fetchone()
        return CaptureRecord.from_row(row) if row else None

    def list(self, run: str | None = None, limit: int = 50,
             offset: int = 0) -> tuple[list[CaptureRecord], int]:
        """A page of records, newest first, optionally of one run; and the total count."""
        where, args = ("WHERE run = ?", (run,)) if run is not None else ("", ())
        with self._db_lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM captures {where}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM captures {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                (*args, limit, offset)).fetchall()
        return [CaptureRecord.from_row(r) for r in rows], total

    def open(self, capture_id: str) -> tuple[CaptureRecord, BinaryIO] | None:
        """The record and an open handle on its file, or None.

        The handle stays readable even if the capture is deleted meanwhile.
        """
        record = self.get(capture_id)
        if record is None:
            return None
        try:
            return record, open(self._path(capture_id), "rb")  # noqa: SIM115 (caller closes)
        except FileNotFoundError:  # deleted between the lookup and the open
            return None

    def load(self, capture_id: str,
             names: Collection[str] | None = None) -> dict[str, np.ndarray] | None:
        """The tensors of a capture (only ``names``, when given) as numpy arrays, or None."""
        opened = self.open(capture_id)
        if opened is None:
            return None
        with opened[1] as f:
            return dict(read_safetensors(f, names))


def open_store(settings: Any) -> CaptureStore:
    """The capture store under ``settings.data_dir / "captures"`` (created if missing)."""
    return CaptureStore(Path(settings.data_dir) / "captures")
