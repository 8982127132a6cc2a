"""The training-thread side of the stream: one :class:`StreamTap` per watched run.

It listens on the run's dispatcher(s) only while someone subscribes, with a
:class:`Plan` that is the union of the subscriptions, and then only during forward
passes that will be captured: a forward pre-hook on the model decides, from the frame
rate and the cost budget, whether this pass is due (a dispatcher with no listener lets
each attention run its fused kernel with no event made). Its handler runs in the
training thread and does as little as possible: a throttle check, then

* on a GPU: the slices asked for (``event.attention(sample=..., heads=...)``),
  head statistics (11, H) and views pooled to the subscribers' ``max_side``
  reduced there, copied to pinned host memory without waiting (a CUDA event
  that the reader waits on);
* on the CPU: a copy of the sample's queries and keys; its attention, statistics
  and pooled view are computed by the first reader (the hub's encoder thread, or a
  remote publisher's thread), so that they do not take the training thread's time;

and a store into a latest-value slot. Encoding and sending happen in the
server (encoding in its encoder thread, sending in its event loop).

Frames are tied to steps: captures made during a forward pass wait in
``pending`` until :meth:`Run.step` marks the step (so they carry that step's
number and token labels), then replace the previous value of their slot.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from transformer_core.events import AttentionEvent, QKVEvent
from transformer_core.events.portable import portable_sample

from ..contract.plan import EMPTY_PLAN, Capture, Plan, SampleNeed, SlotKey
from ..core.captured import (
    LATER,
    deferred_captures,
    heads_arg,
    host_capture,
    pooled_view,
)
from ..core.reduce import (
    HostCopy,
    layer_statistics,
    to_host,
)
from ..core.stats import MaskInfo, valid_key_counts
from .rows import RowStore
from .tokens import warn_labels_mismatch

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

__all__ = ["EMPTY_PLAN", "Capture", "Plan", "StreamTap", "SampleNeed", "SlotKey"]

def _kinds(need: SampleNeed) -> list[str]:
    flags = (("attention", need.attention), ("qk_logits", need.logits),
             ("head_stats", need.stats), ("qkv_norms", need.qkv))
    return [kind for kind, wanted in flags if wanted]


def _to_cpu_float(t: torch.Tensor) -> HostCopy:
    """Detached float32 copy on the host (from CUDA without waiting)."""
    return to_host(t, torch.float32)


def _on_cuda(event: AttentionEvent) -> bool:
    return event.queries is not None and event.queries.is_cuda


def _reduced_now(event: AttentionEvent, layer: int, need: SampleNeed,
                 heads: tuple[int, ...], now: float) -> list[Capture]:
    """On a device: statistics (11, H) and the pooled view computed there now (queued
    kernels), copied to pinned memory without waiting."""
    a = event.attention(sample=need.sample, heads=heads_arg(need.attention_heads))  # (h, L, S)
    out = []
    if need.stats:  # all heads (see build_plan)
        L, S = a.shape[-2:]
        valid = valid_key_counts(MaskInfo.of(event), need.sample, L, S, on_device=True)
        out.append(host_capture("head_stats", layer, need.sample, heads,
                            to_host(layer_statistics(a, valid)), event.role, now))
    if need.attention:
        out.append(pooled_view(layer, need, heads, a, event.role, now))
    return out


def _row_now(event: AttentionEvent, layer: int, need: SampleNeed, heads: tuple[int, ...],
             now: float) -> list[Capture]:
    """A recurrent site's row (h, 1, S), copied to the host now and unpooled: the row store
    grows it into the sequence's matrix in this thread (head_stats then carry the rows and
    their masks). One row is small, so this copy may wait for the device."""
    a = event.attention(sample=need.sample, heads=heads_arg(need.attention_heads))
    a = a.detach().to("cpu", torch.float16)  # (h, 1, S)
    out = []
    if need.stats:
        out.append(Capture("head_stats", layer, need.sample, heads, a, event.role, now,
                           masks=MaskInfo.of(event)))
    if need.attention:
        out.append(Capture("attention", layer, need.sample, heads, a, event.role, now))
    return out


def _reduced_later(event: AttentionEvent, layer: int, need: SampleNeed,
                   heads: tuple[int, ...], now: float) -> list[Capture]:
    """On the CPU: only a copy of the sample's queries and keys here; its attention,
    statistics and pooled view are computed by whoever reads the captures first (the
    hub's encoder thread, the heads feed, a remote publisher's thread, or the server's
    process), off the training thread, once for both captures."""
    return deferred_captures(event.sample_copy(need.sample), layer, need, heads, event.role,
                             now)


def _sent_later(event: AttentionEvent, layer: int, need: SampleNeed, heads: tuple[int, ...],
                now: float, staging: Any) -> list[Capture]:
    """For another process: the sample's queries and keys copied to the host (without
    waiting for a device), as one :class:`~transformer_core.events.portable.Portable` that
    both captures (statistics, view) share; the other process computes them."""
    portable = portable_sample(event, need.sample, staging.copy)
    arrival = staging.arrival()
    kinds = [k for k, wanted in (("head_stats", need.stats), ("attention", need.attention))
             if wanted]
    return [Capture(kind, layer, need.sample, heads, LATER, event.role, now, event=portable,
                    need=need, ready=arrival, full_shape=tuple(event.shape[2:]))
            for kind in kinds]


def _thinned_interval(interval: float, factor: int, step_s: float) -> float:
    """Seconds from one capture to the next, the cost budget's ``factor`` applied.

    Frames come at most once per step: with steps slower than ``interval`` the rate is
    the step rate, so 1/``factor`` of it means every ``factor``-th step (half a step
    early, so that jitter does not skip one more).

    >>> _thinned_interval(0.1, 1, 10.0), _thinned_interval(0.1, 4, 0.01)
    (0.1, 0.4)
    >>> _thinned_interval(0.1, 4, 10.0)  # 10 s steps: every 4th step
    35.0
    """
    if factor == 1 or step_s <= interval:
        return factor * interval
    return (factor - 0.5) * step_s


class StreamTap:
    """Captures what a run's subscribers want; the event loop reads :attr:`slots`.

    ``notify(run_id)`` is called from the training thread when slots changed
    (at most once per step); it must be cheap and thread-safe.
    """

    def __init__(self, run: Run, notify: Callable[[str], None], staging: Any = None) -> None:
        self.run = run
        # A training process watched from another process: captures are host copies of
        # the sample's queries and keys (``staging``: attnscope.training.staging), computed
        # over there; None: computed in this process (on the device, or by a reader).
        self.staging = staging
        self.slots: dict[SlotKey, Capture] = {}
        self._notify = notify
        self._plan = EMPTY_PLAN
        self._sources = run.local.sources  # id(module) -> (what, layer)
        self._wanted: dict[int, Any] = {}  # id(dispatcher) -> dispatcher: what the plan needs
        self._listening: dict[int, Any] = {}  # ... and what is listened to now
        self._listen_lock = threading.Lock()  # set_plan (any thread) vs the pre-hook
        self._gating = False  # the plan can skip forward passes (no recurrent rows in it)
        self._pre_hook: Any = None  # the model's forward pre-hook, while something is wanted
        self._hooked = False
        self._lock = threading.Lock()
        self._pending: dict[SlotKey, Capture] = {}
        self._window: set[tuple[str, int]] = set()
        self._capturing = False
        self._window_start = 0.0
        self._last_capture = -math.inf  # when the last capture window started
        self._scalars_due = 0.0
        self._seq = itertools.count(1)
        # Recurrent sites: every event is one row of a sequence, kept (never throttled) and
        # grown into the sequence's matrix by the row store.
        self._row_layers = frozenset(s.index for s in run.local.sites if s.recurrent)
        self._rows = RowStore()

    @property
    def plan(self) -> Plan:
        return self._plan

    # -- event loop ----------------------------------------------------------

    def set_plan(self, plan: Plan) -> None:
        """Install ``plan``; listen on exactly the dispatchers it needs (none if empty)."""
        wanted: dict[int, Any] = {}
        sites = self.run.local.sites
        for kind, layer in plan.sources:
            if not 0 <= layer < len(sites):
                continue  # a plan for another model: nothing to listen to
            site = sites[layer]
            d = site.dispatcher if kind == "attn" else site.qkv_dispatcher
            if d is not None:
                wanted[id(d)] = d
        self._plan = plan
        self.run.budget.set_watched(not plan.empty)  # the budget's limit: watched or idle
        with self._listen_lock:
            self._wanted = wanted
            # Recurrent rows are kept at every step: never skipped, always listened to.
            self._gating = not any(layer in self._row_layers for _, layer in plan.sources)
            self._sync(wanted)  # until the next forward pass decides
            if wanted and self._pre_hook is None:
                self._pre_hook = self.run.model.register_forward_pre_hook(self._before_forward)
            elif not wanted and self._pre_hook is not None:
                self._pre_hook.remove()
                self._pre_hook = None
        if plan.empty and self._hooked:
            self.run.remove_step_hook(self._on_step)
            self._hooked = False
        elif not plan.empty and not self._hooked:
            self.run.add_step_hook(self._on_step)
            self._hooked = True
        if plan.empty:
            # Nobody watches: forget half-made captures, but keep the slots, so a page
            # reloaded while the run is paused shows the last frames at once.
            with self._lock:
                self._pending = {}
                self._window = set()
                self._capturing = False
            self._rows.reset()  # rows missed from now on: the rows start over anyway
            return
        # Slots the new plan cannot fill are dropped (bounded memory, nothing stale later).
        keep = {(kind, layer, need.sample) for layer, needs in plan.needs.items()
                for need in needs for kind in _kinds(need)}
        for key in [k for k in self.slots if k not in keep]:
            self.slots.pop(key, None)
        self._rows.keep(keep)

    def close(self) -> None:
        self.set_plan(EMPTY_PLAN)
        self.slots.clear()

    def flush_stale(self, max_age: float) -> None:
        """Publish captures whose step was never marked (a loop that does not call step())."""
        published = False
        with self._lock:
            if self._pending and time.monotonic() - self._window_start > max_age:
                published = self._flush_locked()
        if published:
            self._notify(self.run.id)

    # -- training thread -------------------------------------------------------

    def _sync(self, dispatchers: dict[int, Any]) -> None:
        """Listen on exactly ``dispatchers`` (holding ``_listen_lock``)."""
        for key, d in dispatchers.items():
            if key not in self._listening:
                d.listen(self._accepts, self._handle)
        for key, d in self._listening.items():
            if key not in dispatchers:
                d.remove(self._handle)
        self._listening = dispatchers

    def _before_forward(self, module: Any, args: Any) -> None:
        """Forward pre-hook on the model: listen during this pass only if it will be
        captured (its frame is due at the budget's rate, the budget is not measuring the
        slowdown, or a pass without ``step()`` in between must publish the last one).
        A loop that calls submodules directly never runs this: it stays listened to."""
        if not self._gating:
            return
        budget = self.run.budget
        with self._lock:
            due = self._capturing or time.monotonic() >= self._last_capture + \
                _thinned_interval(self._plan.interval, budget.stream_factor, budget.step_time)
        with self._listen_lock:
            if self._gating:
                self._sync(self._wanted if due and not budget.off else {})

    def _accepts(self, event: Any) -> bool:
        return self._sources.get(id(getattr(event, "source", None))) in self._plan.sources

    def _handle(self, event: Any) -> None:
        plan = self._plan
        source = self._sources.get(id(event.source))
        if source not in plan.sources:
            return
        what, layer = source
        if what == "attn" and not isinstance(event, AttentionEvent):
            return
        if what == "qkv" and not isinstance(event, QKVEvent):
            return
        budget = self.run.budget
        if budget.off and layer not in self._row_layers:
            # switched off this step: the budget measures the slowdown (a recurrent site's
            # rows are kept: each is one row of a sequence, never skipped)
            return
        now = time.monotonic()
        t0 = time.thread_time()
        flushed = False
        with self._lock:
            if source in self._window:
                # A second forward pass without step() in between: publish the first.
                flushed = self._flush_locked()
            if not self._capturing:
                # Due from the last capture at the budget's factor now (one restored after
                # a long thinned interval takes effect at once).
                due = self._last_capture + _thinned_interval(
                    plan.interval, budget.stream_factor, budget.step_time)
                if now < due and layer not in self._row_layers:
                    capture = False
                else:
                    capture = self._capturing = True
                    self._window_start = self._last_capture = now
            else:
                capture = True
            if capture:
                self._window.add(source)
        if flushed:
            self._notify(self.run.id)
        if not capture:
            budget.spend("stream", time.thread_time() - t0)
            return
        needs = plan.needs.get(layer, ())
        with torch.no_grad():
            if what == "attn":
                captures = self._capture_attention(event, layer, needs)
            else:
                captures = self._capture_qkv(event, layer, needs)
        with self._lock:
            for cap in captures:
                self._pending[(cap.kind, cap.layer, cap.sample)] = cap
        budget.spend("stream", time.thread_time() - t0)

    def _capture_attention(self, event: AttentionEvent, layer: int,
                           needs: tuple[SampleNeed, ...]) -> list[Capture]:
        n, h = event.shape[0], event.shape[1]
        now = time.time()
        out = []
        for need in needs:
            if need.sample >= n:
                continue
            if need.attention or need.stats:
                heads = need.attention_heads or tuple(range(h))
                if layer in self._row_layers:
                    out.extend(_row_now(event, layer, need, heads, now))
                elif self.staging is not None:
                    out.extend(_sent_later(event, layer, need, heads, now, self.staging))
                elif _on_cuda(event):
                    out.extend(_reduced_now(event, layer, need, heads, now))
                else:
                    out.extend(_reduced_later(event, layer, need, heads, now))
            if need.logits:
                g = event.logits(sample=need.sample, heads=heads_arg(need.logits_heads))
                heads = need.logits_heads or tuple(range(h))
                out.append(host_capture("qk_logits", layer, need.sample, heads, _to_cpu_float(g),
                                    event.role, now))
        return out

    def _capture_qkv(self, event: QKVEvent, layer: int,
                     needs: tuple[SampleNeed, ...]) -> list[Capture]:
        q, k, v = event.queries, event.keys, event.values  # (N, L|S, H, E|D)
        now = time.time()
        role = self.run.sites[layer].role
        out = []
        for need in needs:
            if not need.qkv or need.sample >= q.shape[0]:
                continue
            heads = need.qkv_heads or tuple(range(q.shape[2]))
            idx = list(heads)
            norms = [t[need.sample][:, idx].float().norm(dim=-1).T for t in (q, k, v)]  # (h, P)
            p = max(x.shape[1] for x in norms)
            data = torch.full((3, len(heads), p), float("nan"), device=q.device)
            for i, x in enumerate(norms):
                data[i, :, : x.shape[1]] = x
            out.append(host_capture("qkv_norms", layer, need.sample, heads, _to_cpu_float(data),
                                role, now))
        return out

    def _on_step(self, run: Run) -> None:
        """Step hook: publish this step's captures with its number and token labels."""
        t0 = time.thread_time()
        with self._lock:
            pending, self._pending = self._pending, {}
            self._window = set()
            self._capturing = False
        plan = self._plan
        if pending:
            self._publish(pending, run.step_index or 0)
            self._notify(run.id)
        elif plan.scalars:
            now = time.monotonic()
            if now >= self._scalars_due:
                self._scalars_due = now + plan.interval
                self._notify(run.id)
        run.budget.spend("stream", time.thread_time() - t0)

    def _flush_locked(self) -> bool:
        pending, self._pending = self._pending, {}
        self._window = set()
        self._capturing = False
        if not pending:
            return False
        step = self.run.step_index
        self._publish(pending, 0 if step is None else step + 1)
        return True

    def _publish(self, pending: dict[SlotKey, Capture], step: int) -> None:
        labels: dict[int, list[str] | None] = {}
        rows = {key: cap for key, cap in pending.items() if cap.layer in self._row_layers}
        if rows:
            self._rows.begin(step, self.run.sequence)
            if self._rows.new_sequence_in(rows):
                self._rows.reset()
        for key, cap in pending.items():
            if cap.sample not in labels:
                labels[cap.sample] = self.run.labels(cap.sample)
            cap.step = step
            if key in rows:  # the step's token labels its row (the last label given)
                cap.wait()  # rows are grown here: their copies must have arrived
                tokens = labels[cap.sample]
                grown = self._rows.add(key, cap, tokens[-1] if tokens else None)
                if grown is None:
                    continue  # nothing to show yet
                cap = grown
            else:
                cap.labels = _axis_labels(labels[cap.sample], cap)
                if cap.labels is None and labels[cap.sample] and cap.kind != "head_stats":
                    warn_labels_mismatch(self.run, len(labels[cap.sample]),
                                         (cap.full_shape or cap.data.shape[-2:])[0])
            cap.seq = next(self._seq)
            self.slots[key] = cap


def _axis_labels(tokens: list[str] | None, cap: Capture) -> tuple[list[str] | None,
                                                                  list[str] | None] | None:
    """(query labels, key labels) for a capture; an axis whose length differs gets None."""
    if tokens is None or cap.kind == "head_stats":
        return None
    if cap.kind == "qkv_norms":
        return (tokens, tokens if cap.role == "self" else None)
    length, keys = cap.full_shape or cap.data.shape[-2:]
    q = tokens if len(tokens) == length else None
    k = tokens if cap.role == "self" and len(tokens) == keys else None
    return None if q is None and k is None else (q, k)
