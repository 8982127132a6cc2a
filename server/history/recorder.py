"""Recording a run's history: the training-thread side and the writer thread.

Per run, a :class:`RunRecorder`

* keeps a **probe**: the first ``probe_samples`` samples of the first batch the
  model sees (its first ``forward`` call), so snapshots compare across steps;
* at every step, copies sample 0's attention (H, L, S) of each layer as float16
  to the CPU (the same slice the stream's ``head_stats`` use) for the statistics;
* every ``every`` steps, at the end of the step, runs the model once on the
  probe (eval mode, no grad, its events heard by nobody else) and copies each
  layer's attention (P, H, L, S) as float16.

That is all the training thread does. Statistics, file writes, thinning and the
cap happen in the :class:`HistoryService`'s writer thread; if it falls behind,
records are dropped (and counted), the training thread never waits.

A snapshot of step ``s`` shows the weights at the end of step ``s`` (after its
update); it equals what the stream showed at step ``s`` when the training batch
is the probe and the weights changed before that step's forward pass.

Shape legend: N batch, P probe samples, H heads, L queries, S keys.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from transformer_core.events import AttentionEvent, EventDispatcher

from ..runs import Run, RunRegistry
from ..stream.stats import MaskInfo, head_stats, valid_key_counts
from .config import HistoryConfig
from .store import STAT_NAMES, HistoryStore, StatRow

logger = logging.getLogger(__name__)


@dataclass
class _StepItem:
    """One step for the writer: sample 0's attention per layer (H, L, S) float16 + masks."""

    session: str
    step: int
    time: float
    scalars: dict[str, float]
    attention: dict[int, tuple[torch.Tensor, MaskInfo]]
    n_layers: int


@dataclass
class _SnapshotItem:
    """One probe snapshot for the writer: attention per layer (P, H, L, S) float16."""

    session: str
    step: int
    time: float
    attention: dict[int, torch.Tensor]
    labels: list[str] | None


def _slice_batch(value: Any, n: int, keep: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == n:
        return value[:keep].detach().clone()
    return value


@contextmanager
def _private_dispatch(model: nn.Module, dispatcher: EventDispatcher) -> Iterator[None]:
    """Within the block every module of ``model`` dispatches to ``dispatcher`` only,
    so the stream's publisher and the stats listener do not see the probe's events."""
    saved = [(m, m.event_dispatcher) for m in model.modules()
             if isinstance(getattr(m, "event_dispatcher", None), EventDispatcher)]
    for module, _ in saved:
        module.event_dispatcher = dispatcher
    try:
        yield
    finally:
        for module, original in saved:
            module.event_dispatcher = original


class RunRecorder:
    """Records one :class:`Run` into ``service``'s store (see the module docstring)."""

    def __init__(self, run: Run, service: HistoryService) -> None:
        self.run = run
        self.service = service
        self.config = service.config
        self.session: str | None = None
        self.last_step: int | None = None
        self.last_snapshot: int | None = None
        self.probe: tuple[tuple, dict] | None = None
        self.probe_labels: list[str] | None = None
        self.probe_failed = False
        self._layer_of = {id(site.inner): site.index for site in run.sites}
        self._pending: dict[int, tuple[torch.Tensor, MaskInfo]] = {}
        self._in_probe = False
        self._dispatchers = run.dispatchers
        self._pre_hook = run.model.register_forward_pre_hook(self._grab_probe, with_kwargs=True)
        for d in self._dispatchers:
            d.listen(self._accepts, self._on_attention)
        run.add_step_hook(self._on_step)

    def detach(self) -> None:
        """Stop recording (listeners and hooks removed); what was recorded stays."""
        self.run.remove_step_hook(self._on_step)
        for d in self._dispatchers:
            d.remove(self._on_attention)
        self._pre_hook.remove()

    # -- training thread -------------------------------------------------------

    def _grab_probe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.probe is not None or self._in_probe or not args \
                or not isinstance(args[0], torch.Tensor) or args[0].ndim < 1:
            return
        n, keep = args[0].shape[0], self.config.probe_samples
        self.probe = (tuple(_slice_batch(a, n, keep) for a in args),
                      {k: _slice_batch(v, n, keep) for k, v in kwargs.items()})

    def _accepts(self, event: Any) -> bool:
        return isinstance(event, AttentionEvent) and id(event.source) in self._layer_of

    def _on_attention(self, event: AttentionEvent) -> None:
        layer = self._layer_of[id(event.source)]
        if layer in self._pending:  # a second forward in one step: keep the first
            return
        with torch.no_grad():
            a = event.attention(sample=0).detach()  # (H, L, S)
            a = a.to(torch.float16).cpu() if a.dtype != torch.float16 else a.to("cpu", copy=True)
        self._pending[layer] = (a, MaskInfo.of(event))

    def _on_step(self, run: Run) -> None:
        step = run.step_index
        if step is None:
            return
        now = time.time()
        if self.session is None or (self.last_step is not None and step < self.last_step):
            self._new_session()  # first step, or the run started over
        self.last_step = step
        pending, self._pending = self._pending, {}
        assert self.session is not None
        self.service.submit(_StepItem(self.session, step, now, dict(run.scalars), pending,
                                      len(run.sites)))
        due = self.last_snapshot is None or step >= self.last_snapshot + self.config.every
        if due and self.probe is not None and not self.probe_failed:
            self.last_snapshot = step
            attention = self._probe_forward()
            if attention:
                labels = run.labels(0) if self.probe_labels is None else None
                if labels is not None:
                    self.probe_labels = labels
                self.service.submit(_SnapshotItem(self.session, step, now, attention, labels))

    def _new_session(self) -> None:
        run = self.run
        heads = [s.heads for s in run.sites]
        meta = {"layers": len(run.sites), "heads": max((h or 0 for h in heads), default=0),
                "layer_heads": heads, "roles": [s.role for s in run.sites],
                "every": self.config.every, "probe_samples": self.config.probe_samples}
        self.session = self.service.store.new_session(run.id, run.name, meta).id
        self.last_step = self.last_snapshot = None
        self.probe_labels = None
        logger.info("history: recording run %r as session %s", run.id, self.session)

    def _probe_forward(self) -> dict[int, torch.Tensor]:
        """Run the model on the probe; each layer's attention (P, H, L, S) float16 on the CPU."""
        assert self.probe is not None
        args, kwargs = self.probe
        model = self.run.model
        out: dict[int, torch.Tensor] = {}
        private = EventDispatcher()

        def collect(event: AttentionEvent) -> None:
            layer = self._layer_of[id(event.source)]
            if layer not in out:
                out[layer] = event.attention().detach().to(torch.float16).cpu()  # (P, H, L, S)

        private.listen(self._accepts, collect)
        modes = {m: m.training for m in model.modules()}
        self._in_probe = True
        seen = (self.run.batch_size, self.run.seq_len)  # the run's hook sees the probe too
        try:
            model.eval()
            with torch.no_grad(), _private_dispatch(model, private):
                model(*args, **kwargs)
        except Exception:
            self.probe_failed = True
            logger.warning("history: the probe forward pass of run %r failed; recording head "
                           "statistics only", self.run.id, exc_info=True)
            return {}
        finally:
            self._in_probe = False
            self.run.batch_size, self.run.seq_len = seen
            for module, mode in modes.items():
                module.training = mode
        return out


class HistoryService:
    """Records the runs of a registry into a :class:`HistoryStore` with one writer thread."""

    def __init__(self, store: HistoryStore, config: HistoryConfig | None = None) -> None:
        self.store = store
        self.config = (config or HistoryConfig()).validate()
        self.recorders: dict[str, RunRecorder] = {}
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(self.config.queue_size)
        self._registry: RunRegistry | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_loop, name="attnscope-history",
                                        daemon=True)
        self._thread.start()

    # -- runs ------------------------------------------------------------------

    def attach(self, run: Run) -> RunRecorder:
        with self._lock:
            recorder = self.recorders.get(run.id)
            if recorder is None or recorder.run is not run:
                if recorder is not None:
                    recorder.detach()
                recorder = self.recorders[run.id] = RunRecorder(run, self)
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
        runs = {run.id: run for run in registry.list()}
        for run in runs.values():
            recorder = self.recorders.get(run.id)
            if recorder is None or recorder.run is not run:
                self.attach(run)
        for run_id in [r for r in self.recorders if r not in runs]:
            self.detach(run_id)

    def session_of(self, run_id: str) -> str | None:
        """The session being recorded for a live run id, else its newest stored one."""
        recorder = self.recorders.get(run_id)
        if recorder is not None and recorder.session is not None:
            return recorder.session
        session = self.store.latest_session(run_id)
        return None if session is None else session.id

    # -- writer ----------------------------------------------------------------

    def submit(self, item: Any) -> None:
        """Queue an item for the writer; never blocks (a full queue drops the item)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                logger.warning("history: writer behind, %d records dropped", self.dropped)

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
        self._thread.join(timeout)
        self.store.close()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while item is not None and len(batch) < 256:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception:
                logger.exception("history: writing failed")
            if any(x is None for x in batch):
                return

    def _write(self, batch: list[Any]) -> None:
        rows: dict[str, list[StatRow]] = {}
        for item in batch:
            if isinstance(item, _StepItem):
                rows.setdefault(item.session, []).append(_stat_row(item, self.config))
                continue
            for session, session_rows in rows.items():  # keep the order of the items
                self.store.add_stats(session, session_rows)
            rows = {}
            if isinstance(item, _SnapshotItem):
                tensors = {f"attention.{layer}": a.numpy() for layer, a in item.attention.items()}
                self.store.add_snapshot(item.session, item.step, item.time, tensors)
                if item.labels is not None:
                    self.store.update_meta(item.session, probe_labels=item.labels,
                                           probe_shape=list(next(iter(
                                               item.attention.values())).shape))
            elif isinstance(item, threading.Event):
                item.set()
        for session, session_rows in rows.items():
            self.store.add_stats(session, session_rows)


def _stat_row(item: _StepItem, config: HistoryConfig) -> StatRow:
    """Head statistics (layers, 5, H) of one step, computed as the stream computes them."""
    heads = None
    if item.attention:
        n_layers = item.n_layers
        n_heads = max(a.shape[0] for a, _ in item.attention.values())
        heads = np.full((n_layers, len(STAT_NAMES), n_heads), np.nan, np.float32)
        for layer, (a, masks) in item.attention.items():
            L, S = a.shape[-2:]
            stats = head_stats(a, valid_key_counts(masks, 0, L, S))  # (5, H)
            heads[layer, :, : a.shape[0]] = stats.numpy()
    return StatRow(item.step, item.time, item.scalars, heads)
