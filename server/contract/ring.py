"""A single-producer, single-consumer ring of messages in shared memory.

The training process writes, the server process reads (and a second ring the other
way). Writing never waits: a message that does not fit is dropped and counted. The
memory is one file-descriptor-backed mapping (``memfd_create`` where there is one, an
unlinked temporary file elsewhere) that a child process maps from its inherited fd.

Layout (little-endian): a 64-byte header, then ``capacity`` bytes of records::

    0  magic "ASR1"      4 version          8 capacity (u64)
    16 write (u64)       24 read (u64)      32 dropped (u64)
    64 records: u32 body length | body | padding to 8 bytes

``write`` and ``read`` count bytes ever written and consumed (positions modulo
``capacity``); a record never wraps: one that would is preceded by a wrap mark
(``0xFFFFFFFF``) and starts at offset 0. The producer moves ``write`` only over
records it has finished (:meth:`Ring.commit`, in the order reserved); the consumer
reads up to ``write`` and then moves ``read``. A writer reserves space first
(:meth:`Ring.reserve`) when the bytes arrive later (a device copy into the ring).

Ordering: each side publishes its position after its bytes; the channel's notify
pipe (a syscall after each commit, see :mod:`attnscope.contract.channel`) orders the
consumer's reads after the producer's writes on every architecture.

>>> ring = Ring.create(1024)
>>> ring.write([b"hello"]), ring.write([b"world!"])
(True, True)
>>> [bytes(body) for body in ring.read()]
[b'hello', b'world!']
>>> ring.write([b"x" * 2000]), ring.dropped
(False, 1)
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

MAGIC = b"ASR1"
VERSION = 1
HEADER_BYTES = 64
_WRITE, _READ, _DROPPED = 16, 24, 32
_WRAP = 0xFFFFFFFF
_ALIGN = 8


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def shared_fd(size: int, name: str = "attnscope-ring") -> int:
    """A file descriptor of ``size`` zeroed bytes that a child process can map: an
    anonymous memfd (Linux), else an unlinked temporary file (it vanishes with the last fd)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    else:  # pragma: no cover - macOS
        with tempfile.TemporaryFile(prefix=name) as handle:
            fd = os.dup(handle.fileno())
    os.ftruncate(fd, size)
    return fd


@dataclass
class Reservation:
    """Space reserved in a ring for one record, filled later, then committed.

    ``views[i]`` is where part ``i`` goes (a writable memoryview into the ring);
    :meth:`Ring.commit` publishes it once it is filled and every earlier one is.
    """

    start: int  # absolute position of the record's length word
    end: int  # absolute position after it (padding included)
    views: list[memoryview]
    done: bool = False


class Ring:
    """One direction of a channel (see the module docstring). Not thread-safe: one
    thread produces, one (in another process) consumes."""

    def __init__(self, fd: int, *, create: bool = False, capacity: int | None = None) -> None:
        size = os.fstat(fd).st_size
        if create:
            if capacity is None or capacity < 64 or capacity % _ALIGN:
                raise ValueError(f"capacity: a multiple of {_ALIGN} >= 64, got {capacity!r}")
            if size < HEADER_BYTES + capacity:
                os.ftruncate(fd, HEADER_BYTES + capacity)
        self.fd = fd
        self.map = mmap.mmap(fd, 0)
        self.buf = memoryview(self.map)
        if create:
            struct.pack_into("<4sIQ", self.buf, 0, MAGIC, VERSION, capacity)
        magic, version, self.capacity = struct.unpack_from("<4sIQ", self.buf, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not an attnscope ring (magic {magic!r}, version {version})")
        self.data = self.buf[HEADER_BYTES : HEADER_BYTES + self.capacity]
        self._reserved = self._load(_WRITE)  # producer: end of the last reservation
        self._pending: deque[Reservation] = deque()

    @classmethod
    def create(cls, capacity: int) -> Ring:
        """A new ring of ``capacity`` bytes of records in fresh shared memory."""
        return cls(shared_fd(HEADER_BYTES + capacity), create=True, capacity=capacity)

    def close(self) -> None:
        """Close this side's fd; the mapping goes with the last view of it (the memory
        lives while another process maps it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- positions -------------------------------------------------------------

    def _load(self, offset: int) -> int:
        return struct.unpack_from("<Q", self.buf, offset)[0]

    def _store(self, offset: int, value: int) -> None:
        struct.pack_into("<Q", self.buf, offset, value)

    @property
    def dropped(self) -> int:
        """Records the producer could not fit (it never waits)."""
        return self._load(_DROPPED)

    @property
    def used(self) -> int:
        """Bytes written and not yet read."""
        return self._load(_WRITE) - self._load(_READ)

    @property
    def has_data(self) -> bool:
        """Whether the consumer has something to read (two 8-byte loads: cheap)."""
        return self._load(_WRITE) != self._load(_READ)

    # -- producer --------------------------------------------------------------

    def reserve(self, sizes: Sequence[int]) -> Reservation | None:
        """Space for one record of parts of ``sizes`` bytes, or None (no room: counted as
        dropped). Fill ``views`` then :meth:`commit`; reservations commit in order."""
        body = sum(sizes)
        need = _aligned(4 + body)
        if need > self.capacity // 2:
            self._store(_DROPPED, self.dropped + 1)
            return None
        pos = self._reserved
        offset = pos % self.capacity
        skip = self.capacity - offset if offset + need > self.capacity else 0
        if pos + skip + need - self._load(_READ) > self.capacity:
            self._store(_DROPPED, self.dropped + 1)
            return None
        if skip:
            struct.pack_into("<I", self.data, offset, _WRAP)
            pos += skip
            offset = 0
        struct.pack_into("<I", self.data, offset, body)
        views, at = [], offset + 4
        for size in sizes:
            views.append(self.data[at : at + size])
            at += size
        reservation = Reservation(self._reserved, pos + need, views)
        self._reserved = pos + need
        self._pending.append(reservation)
        return reservation

    def commit(self, reservation: Reservation) -> bool:
        """Mark ``reservation`` filled; publish every filled reservation at the head of
        the queue. True if the consumer can now see more."""
        reservation.done = True
        moved = False
        while self._pending and self._pending[0].done:
            self._store(_WRITE, self._pending.popleft().end)
            moved = True
        return moved

    @property
    def uncommitted(self) -> int:
        """Reservations not yet published (waiting to be filled, or behind one that is)."""
        return len(self._pending)

    def write(self, parts: Sequence[bytes | memoryview]) -> bool:
        """Copy ``parts`` into the ring as one record and publish it (unless an earlier
        reservation is still unfilled: then with it). False: no room, dropped."""
        reservation = self.reserve([memoryview(p).nbytes for p in parts])
        if reservation is None:
            return False
        for view, part in zip(reservation.views, parts, strict=True):
            view[:] = memoryview(part).cast("B")
        self.commit(reservation)
        return True

    # -- consumer --------------------------------------------------------------

    def read(self) -> Iterator[memoryview]:
        """The records published so far, oldest first. Each body is a view into the ring,
        valid until the next record is asked for (copy what you keep); a record handed
        out is consumed, even when the caller stops iterating there."""
        end = self._load(_WRITE)
        pos = self._load(_READ)
        while pos < end:
            offset = pos % self.capacity
            (length,) = struct.unpack_from("<I", self.data, offset)
            if length == _WRAP:
                pos += self.capacity - offset
                self._store(_READ, pos)
                continue
            if 4 + length > self.capacity - offset:
                raise ValueError(f"corrupt ring: a record of {length} bytes at {offset}")
            try:
                yield self.data[offset + 4 : offset + 4 + length]
            finally:  # consumed once handed out, even if the caller stops here
                pos += _aligned(4 + length)
                self._store(_READ, pos)
