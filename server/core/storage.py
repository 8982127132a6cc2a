"""What the on-disk stores (captures, history) share.

Each store is a folder with an SQLite index, tensor files and a ``tmp/`` for
writes in progress. One process owns a folder at a time (an ``flock`` on
``.lock``, released by the kernel if the process dies); files become visible
by ``os.replace`` from ``tmp/``, never half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np


class FolderLocked(RuntimeError):
    """Another process already owns this store's folder."""


class FolderLock:
    """Exclusive ownership of ``root`` for this process, until :meth:`release`."""

    def __init__(self, root: Path, what: str, error: type[FolderLocked] = FolderLocked) -> None:
        self._file = open(root / ".lock", "a+b")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise error(f"{what} {root} is in use by another process "
                        "(set ATTNSCOPE_DATA_DIR to another directory)") from None

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def open_index(path: Path, schema: str, synchronous: str) -> sqlite3.Connection:
    """An autocommit SQLite connection in WAL mode, usable from any thread (callers lock)."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.executescript(schema)
    return db


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(f: BinaryIO, names: Collection[str] | None = None,
                     ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) from an open safetensors file, one tensor in memory at a time
    (only ``names``, when given: the others are not read)."""
    (n,) = np.frombuffer(f.read(8), dtype="<u8")
    header = json.loads(f.read(int(n)))
    header.pop("__metadata__", None)
    base = 8 + int(n)
    for name, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if names is not None and name not in names:
            continue
        start, end = spec["data_offsets"]
        f.seek(base + start)
        array = np.frombuffer(f.read(end - start), dtype=_ST_DTYPES[spec["dtype"]])
        yield name, array.reshape(spec["shape"])
