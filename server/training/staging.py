"""Copies into host memory that never make the training thread wait: :class:`HostStaging`.

A training process watched from another process sends a sample's queries and keys
(:func:`~transformer_core.events.portable.portable_sample`); everything else is computed
over there. On the CPU a copy is a clone. From a CUDA device it is a non-blocking copy
into a pinned buffer, issued on one side stream per device after the training stream's
work so far (``wait_event`` on a reused fence), the source kept alive for that stream
(``record_stream``); a pooled event recorded after a group of copies says when they have
arrived. Pinned buffers and events are allocated once and reused (:meth:`release`), so a
watched step allocates no pinned memory and creates no event; nothing here synchronises.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch


class Arrival:
    """When a group of copies has arrived: ``query()`` never waits; :meth:`HostStaging.release`
    gives its buffers and event back once they have been read."""

    def __init__(self, event: Any = None, device: Any = None) -> None:
        self.event = event  # a torch.cuda.Event, or None: arrived (CPU copies)
        self.device = device  # the CUDA device copied from
        self.buffers: list[torch.Tensor] = []

    def query(self) -> bool:
        return self.event is None or bool(self.event.query())

    def synchronize(self) -> None:
        """Block until arrived (only where waiting is fine: closing, a test)."""
        if self.event is not None:
            self.event.synchronize()


class HostStaging:
    """Host copies of training tensors (see the module docstring). Training thread only."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._events: list[Any] = []
        self._side: dict[Any, Any] = {}  # device -> side stream
        self._fence: dict[Any, Any] = {}  # device -> event the side stream waits on
        self._group: Arrival | None = None
        self.allocated = 0  # pinned buffers ever allocated (a test's measure of reuse)
        self.events_made = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` (part of the current group: see :meth:`arrival`)."""
        if t.device.type != "cuda":
            with torch.no_grad():  # one op: the clone (no graph kept)
                return t.clone()
        group = self._group = self._group or Arrival(device=t.device)
        side = self._side_stream(t.device)
        out = self._buffer(tuple(t.shape), t.dtype)
        with torch.cuda.stream(side):
            out.copy_(t, non_blocking=True)
        t.record_stream(side)  # its memory is not reused before the side stream read it
        group.buffers.append(out)
        return out

    def arrival(self) -> Arrival:
        """The arrival of the copies made since the last call (CPU copies: arrived)."""
        group, self._group = self._group, None
        if group is None:
            return Arrival()
        group.event = self._event()
        group.event.record(self._side[group.device])
        return group

    def release(self, arrival: Arrival) -> None:
        """``arrival``'s buffers have been read: back to the pools (call only once arrived)."""
        for buf in arrival.buffers:
            self._free[(tuple(buf.shape), buf.dtype)].append(buf)
        arrival.buffers = []
        if arrival.event is not None:
            self._events.append(arrival.event)
            arrival.event = None

    # -- pools -----------------------------------------------------------------------

    def _side_stream(self, device: Any) -> Any:
        side = self._side.get(device)
        if side is None:
            side = self._side[device] = torch.cuda.Stream(device=device)
            self._fence[device] = torch.cuda.Event()
        # the side stream starts after the training stream's work so far (one reused event)
        fence = self._fence[device]
        fence.record(torch.cuda.current_stream(device))
        side.wait_event(fence)
        return side

    def _buffer(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        free = self._free[(shape, dtype)]
        if free:
            return free.pop()
        self.allocated += 1
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _event(self) -> Any:
        if self._events:
            return self._events.pop()
        self.events_made += 1
        # blocking: a reader that must wait (closing) sleeps instead of spinning a core
        return torch.cuda.Event(blocking=True)
