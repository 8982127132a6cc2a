"""The channel between the training process and the server-side process: two shared
:class:`~attnscope.contract.ring.Ring` s and two doorbell pipes.

``up`` carries what training produces (steps, frames, history records, capture
results); ``down`` carries what the server asks (plans, capture requests, controls).
After committing records a side rings the other's doorbell (one byte, non-blocking;
a full pipe means the other side has a wake-up pending anyway). A doorbell is also the
lifeline: when a process dies, the other side's end of its pipe reads EOF.

Each record is one message: ``uint32 n | n bytes of JSON header (padded to 8) |
tensors``, the header holding ``kind`` and, under ``"t"``, each tensor's name, dtype,
shape and byte offset in the payload. Tensors are written straight from their memory
into the ring (one copy), and read back as copies.

>>> import torch
>>> a, b = Channel.create(1 << 16), None
>>> b = Channel.attach(a.child_fds(), side="server")
>>> a.send("steps", {"steps": [[0, 1.0]]}, {"x": torch.arange(3.0)})
True
>>> [(m.kind, m.header["steps"], m.tensors["x"].tolist()) for m in b.receive()]
[('steps', [[0, 1.0]], [0.0, 1.0, 2.0])]
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .ring import Reservation, Ring

logger = logging.getLogger(__name__)

_ALIGN = 8
# The header of one message is small (names, shapes, labels of one capture); past this it
# is a bug or an attack, refused when read.
MAX_HEADER_BYTES = 1 << 20


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_DTYPES = {_dtype_name(d): d for d in (torch.float16, torch.bfloat16, torch.float32,
                                       torch.float64, torch.int64, torch.int32, torch.bool,
                                       torch.uint8, torch.int8)}


def _pad(n: int) -> int:
    return (-n) % _ALIGN


@dataclass
class Message:
    """One message read from a ring: ``kind``, its JSON ``header`` and its tensors (copies)."""

    kind: str
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Pending:
    """A message whose tensors are still arriving (device copies into the ring).

    ``targets[name]`` is the ring memory each tensor goes to (a CPU tensor over shared
    memory: copy into it with ``non_blocking=True``); ``ready()`` says whether they have
    arrived; :meth:`Channel.flush` publishes the message once it has."""

    reservation: Reservation
    targets: dict[str, torch.Tensor]
    ready: Any = None  # an object with query() -> bool (a CUDA event), or None: ready now


def _write_tensor(view: memoryview, t: torch.Tensor, size: int) -> None:
    """Copy CPU tensor ``t``'s bytes into ``view`` (with numpy: no torch op is dispatched,
    so a training step that sends nothing else costs no op; bfloat16 goes through torch)."""
    if t.dtype == torch.bfloat16 or t.requires_grad:
        src = t.detach().contiguous().reshape(-1).view(torch.uint8)
        torch.frombuffer(view, dtype=torch.uint8, count=size).copy_(src)
        return
    array = np.ascontiguousarray(t.numpy()).reshape(-1).view(np.uint8)
    np.frombuffer(view, dtype=np.uint8, count=size)[:] = array


def encode_header(kind: str, header: Mapping[str, Any],
                  specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    """The header bytes of a message (length word included) and each tensor's byte size."""
    offsets, sizes, at = [], [], 0
    for _, dtype, shape in specs:
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        offsets.append(at)
        sizes.append(size)
        at += size + _pad(size)
    full = {**header, "kind": kind,
            "t": [[name, _dtype_name(dtype), list(shape), off]
                  for (name, dtype, shape), off in zip(specs, offsets, strict=True)]}
    raw = json.dumps(full, separators=(",", ":"), allow_nan=False).encode()
    raw += b" " * _pad(4 + len(raw))
    return struct.pack("<I", len(raw)) + raw, sizes


def decode(body: memoryview) -> Message:
    """A message from a ring record (tensors copied out); ``ValueError`` if malformed."""
    if len(body) < 4:
        raise ValueError("message shorter than its header length")
    (n,) = struct.unpack_from("<I", body, 0)
    if n > MAX_HEADER_BYTES or 4 + n > len(body):
        raise ValueError(f"message header of {n} bytes does not fit its record")
    header = json.loads(bytes(body[4 : 4 + n]))
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise ValueError("message header: expected a JSON object with a 'kind'")
    payload = body[4 + n :]
    tensors = {}
    for name, dtype, shape, offset in header.pop("t", []):
        if dtype not in _DTYPES:
            raise ValueError(f"message {header['kind']!r}: unknown dtype {dtype!r}")
        t = _DTYPES[dtype]
        count = int(np.prod(shape, dtype=np.int64))
        size = count * torch.empty((), dtype=t).element_size()
        if offset < 0 or offset + size > len(payload):
            raise ValueError(f"message {header['kind']!r}: tensor {name!r} runs past the record")
        raw = torch.from_numpy(np.frombuffer(payload, np.uint8, size, offset).copy())
        tensors[str(name)] = raw.view(t).reshape([int(s) for s in shape])
    return Message(header.pop("kind"), header, tensors)


class Channel:
    """One end of a channel (see the module docstring). ``side`` is ``"training"`` (writes
    ``up``, reads ``down``) or ``"server"`` (the reverse). Not thread-safe: each ring has
    one producer thread and one consumer thread."""

    def __init__(self, up: Ring, down: Ring, bell_out: int, bell_in: int, side: str) -> None:
        self.side = side
        self.up, self.down = up, down
        self.outbox, self.inbox = (up, down) if side == "training" else (down, up)
        self.bell_out = bell_out  # we ring it after writing
        self.bell_in = bell_in  # the other side rings it; EOF: the other process is gone
        self._pending: list[Pending] = []
        self._child_fds: tuple[int, int, int, int] | None = None
        self.peer_gone = False  # our doorbell's reader is gone (EPIPE)
        os.set_blocking(bell_out, False)
        os.set_blocking(bell_in, False)
        self.malformed = 0  # messages skipped because they did not decode

    @classmethod
    def create(cls, capacity: int, down_capacity: int = 1 << 20) -> Channel:
        """The training process's end of a new channel; give :meth:`child_fds` to the
        server-side process (``pass_fds``), then call :meth:`close_child_fds`."""
        up, down = Ring.create(capacity), Ring.create(down_capacity)
        up_r, up_w = os.pipe()
        down_r, down_w = os.pipe()
        channel = cls(up, down, up_w, down_r, "training")
        channel._child_fds = (up.fd, down.fd, up_r, down_w)
        return channel

    def child_fds(self) -> tuple[int, int, int, int]:
        """(up ring, down ring, up doorbell's read end, down doorbell's write end)."""
        if self._child_fds is None:
            raise RuntimeError("only the creating side has the child's fds")
        return self._child_fds

    def close_child_fds(self) -> None:
        """Close the doorbell ends the child holds now, so that EOF tells us it died."""
        if self._child_fds is not None:
            for fd in self._child_fds[2:]:
                os.close(fd)
            self._child_fds = (*self._child_fds[:2], -1, -1)

    @classmethod
    def attach(cls, fds: tuple[int, int, int, int], side: str = "server") -> Channel:
        """The server-side end, from the fds :meth:`child_fds` gave."""
        up_fd, down_fd, up_r, down_w = fds
        return cls(Ring(up_fd), Ring(down_fd), down_w, up_r, side)

    def close(self) -> None:
        for fd in (self.bell_out, self.bell_in):
            if fd >= 0:
                os.close(fd)
        self.bell_out = self.bell_in = -1
        if self._child_fds is not None:
            for fd in self._child_fds[2:]:
                if fd >= 0:
                    os.close(fd)
            self._child_fds = None
        self.up.close()
        self.down.close()

    # -- writing -----------------------------------------------------------------

    def send(self, kind: str, header: Mapping[str, Any] | None = None,
             tensors: Mapping[str, torch.Tensor] | None = None, ring: bool = True) -> bool:
        """Write one message (CPU tensors copied straight into the ring); False: no room,
        dropped (counted by the ring). ``ring``: ring the doorbell now (else :meth:`ring`)."""
        tensors = tensors or {}
        specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        head, sizes = encode_header(kind, header or {}, specs)
        reservation = self.outbox.reserve([len(head), *[s + _pad(s) for s in sizes]])
        if reservation is None:
            return False
        reservation.views[0][:] = head
        for view, t, size in zip(reservation.views[1:], tensors.values(), sizes, strict=True):
            if size:
                _write_tensor(view, t, size)
        self.outbox.commit(reservation)
        if ring:
            self.ring()
        return True

    def reserve(self, kind: str, header: Mapping[str, Any],
                specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> Pending | None:
        """Space for a message whose tensors arrive later (see :class:`Pending`); None: no
        room (dropped). Publish it with :meth:`flush` once filled."""
        head, sizes = encode_header(kind, header, specs)
        reservation = self.outbox.reserve([len(head), *[s + _pad(s) for s in sizes]])
        if reservation is None:
            return None
        reservation.views[0][:] = head
        targets = {}
        for view, (name, dtype, shape), size in zip(reservation.views[1:], specs, sizes,
                                                    strict=True):
            raw = torch.frombuffer(view, dtype=torch.uint8, count=size) if size \
                else torch.empty(0, dtype=torch.uint8)
            targets[name] = raw.view(dtype).reshape(shape)
        pending = Pending(reservation, targets)
        self._pending.append(pending)
        return pending

    def flush(self) -> bool:
        """Publish reserved messages whose tensors have arrived, in order; ring the
        doorbell if any was. Never waits (a device copy still running stays pending)."""
        moved = False
        while self._pending:
            head = self._pending[0]
            if head.ready is not None and not head.ready.query():
                break
            self._pending.pop(0)
            moved = self.outbox.commit(head.reservation) or moved
        if moved:
            self.ring()
        return moved

    @property
    def pending(self) -> int:
        """Reserved messages not yet published."""
        return len(self._pending)

    def ring(self) -> None:
        """Ring the other side's doorbell (a full pipe already holds a wake-up)."""
        if self.peer_gone:
            return
        try:
            os.write(self.bell_out, b"\x01")
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                raise
            self.peer_gone = True

    # -- reading ------------------------------------------------------------------

    @property
    def has_mail(self) -> bool:
        """Whether the inbox holds unread messages (two loads from shared memory)."""
        return self.inbox.has_data

    def drain_bell(self) -> bool:
        """Empty our doorbell; False when its writer is gone (EOF: the other process died).
        Call before :meth:`receive` when woken by it."""
        try:
            while True:
                chunk = os.read(self.bell_in, 4096)
                if not chunk:
                    return False
        except BlockingIOError:
            return True

    def wait(self, timeout: float | None) -> bool:
        """Block until the doorbell rings or ``timeout`` passes; False if the other side is
        gone (EOF)."""
        ready, _, _ = select.select([self.bell_in], [], [], timeout)
        return self.drain_bell() if ready else True

    def receive(self) -> Iterator[Message]:
        """The messages in the inbox, oldest first; a malformed one is skipped, logged and
        counted (:attr:`malformed`)."""
        for body in self.inbox.read():
            try:
                message = decode(body)
            except (ValueError, TypeError, KeyError, RecursionError) as exc:
                self.malformed += 1
                logger.warning("channel: skipped a malformed message (%d so far): %s",
                               self.malformed, exc)
                continue
            yield message
