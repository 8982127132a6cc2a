"""Recording a run's history: the training-thread side and the writer thread.

Per run, a :class:`RunRecorder`

* keeps a **probe**: the first ``probe_samples`` samples of the first batch the
  model sees (its first ``forward`` call), so snapshots compare across steps (not for
  a recurrent model: its steps are one token each, recorded as statistics of that
  token's attention row, with no snapshots);
* at every step (every ``stats_every`` steps when the run's cost budget thins
  them, :mod:`attnscope.training.budget`), keeps sample 0 of each layer's attention event as a
  :meth:`~transformer_core.events.AttentionEvent.sample_copy` (that sample's
  queries and keys, copied where they are: no attention computed); on a CUDA
  device it reduces that sample to head statistics (R, H) there instead, and copies
  them to pinned host memory without waiting (:mod:`attnscope.core.reduce`);
* every ``every`` steps (times the budget's ``snapshot_stride``), at the end of the
  step, runs the model once on the probe (eval mode, no grad, its events heard by
  nobody else) and keeps each layer's event as P sample copies (the writer computes
  the attention (P, H, L, S) and stores it as float16). The deprecated
  ``probe_budget``, when set, also spaces snapshots so that probe passes alone stay
  under that share of the training time.

That is all the training thread does, and its time is charged to the run's budget.
The attention of those copies (H, L, S), their statistics (in float32, as the stream
computes them), file writes, thinning and the cap happen in the writer thread of
:class:`~attnscope.backend.history.writer.HistoryWriter`; if it falls behind, records are
dropped (counted in the budget, which then thins), the training thread never waits.

A snapshot of step ``s`` shows the weights at the end of step ``s`` (after its
update); it equals what the stream showed at step ``s`` when the training batch
is the probe and the weights changed before that step's forward pass.

Shape legend: N batch, P probe samples, H heads, L queries, S keys.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn

from transformer_core.events import AttentionEvent, EventDispatcher, dispatching_to
from transformer_core.events.portable import Portable, portable_sample

from ..core.history_config import HistoryConfig
from ..core.history_items import (  # the records, shared with the server process
    SnapshotItem,
    StepItem,
    _on_cuda,
    sample_statistics,
)
from ..core.reduce import HostCopy, to_host
from ..core.roles import repeated_probe
from ..core.stats import HEAD_STATISTICS

# Probe passes alone take at most this share of the run's cost budget: once their cost
# and the training step's are known, snapshots are spaced at once (a snapshot's two probe
# passes of a big model trained at batch 1 take half a step: every 10 steps that alone is
# 5 %), not after the budget has measured several of them.
PROBE_SHARE = 0.4

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

logger = logging.getLogger(__name__)



class RecorderSink(Protocol):
    """Where a :class:`RunRecorder` sends what it records: a :class:`HistoryWriter`, or a
    remote publisher's link to the server's (``attnscope.backend.remote.history``)."""

    config: HistoryConfig

    def new_session(self, run_id: str, name: str | None, meta: dict[str, Any]) -> str: ...

    def submit(self, item: Any) -> None: ...


def _slice_batch(value: Any, n: int, keep: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == n:
        return value[:keep].detach().clone()
    return value


class RunRecorder:
    """Records one :class:`Run` into ``service`` (see the module docstring)."""

    def __init__(self, run: Run, service: RecorderSink, staging: Any = None) -> None:
        self.run = run
        self.service = service
        # A training process watched from another process: sample copies are host copies
        # of the queries and keys as data (``staging``: attnscope.training.staging; on a
        # device too: statistics are computed over there); None: events, reduced here.
        self.staging = staging
        self.config = service.config
        self.session: str | None = None
        self.last_step: int | None = None
        self.last_snapshot: int | None = None
        self.probe: tuple[tuple, dict] | None = None
        self.probe_labels: list[str] | None = None
        self.probe_failed = False
        self.repeat_ok = True  # the induction probe works on this model (until it fails)
        # A recurrent model takes one position and a state per call: a probe pass would be
        # one position from an empty state (and would redraw random feature maps in the
        # middle of the user's sequence), so it gets per-step statistics and no snapshots.
        self.recurrent = any(site.recurrent for site in run.local.sites)
        self._layer_of = {id(site.module): site.index for site in run.local.sites}
        self._pending: dict[int, AttentionEvent] = {}
        self._pending_stats: dict[int, HostCopy] = {}  # layer -> (R, H) from a GPU
        self._stride = 1  # snapshots every ``every * stride`` steps (``probe_budget``)
        self._probe_time = 0.0  # moving average of a probe pass (CPU seconds)
        self._probes = 0  # probe passes so far
        self._probe_cost = 0.0  # what the last probe passes cost (CPU s; 0: none yet)
        self._budget = run.budget  # the run's cost budget: what this costs, what to thin
        self._stats_due = True  # record this step's statistics (the budget thins them)
        self._stats_seen = 0
        self._in_probe = False
        self._dispatchers = run.dispatchers
        self._listening = False
        self._pre_hook = run.model.register_forward_pre_hook(self._before_forward,
                                                                with_kwargs=True)
        self._listen(True)
        run.add_step_hook(self._on_step)

    def detach(self) -> None:
        """Stop recording (listeners and hooks removed); what was recorded stays."""
        self.run.remove_step_hook(self._on_step)
        self._listen(False)
        self._pre_hook.remove()

    def _listen(self, on: bool) -> None:
        """Listen to the model's attention (True) or not: only on steps whose statistics
        are due, since a dispatcher with no listener lets each attention run its fused
        kernel with no event made (a listener costs ~2 % of a launch-bound step even when
        its handler returns at once)."""
        if on == self._listening:
            return
        for d in self._dispatchers:
            if on:
                d.listen(self._accepts, self._on_attention)
            else:
                d.remove(self._on_attention)
        self._listening = on

    # -- training thread -------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model: keep the first batch's head as the probe; and
        forget statistics of an earlier pass in this step (a capture run between steps),
        so a step's statistics are those of the last forward before ``step()``."""
        if self._in_probe:
            return
        self._pending = {}
        self._pending_stats = {}
        # Not listened to while the budget measures the slowdown (nothing is recorded).
        self._listen(self._stats_due and not self._budget.off)
        if self.probe is not None or self.recurrent:
            return
        # The batch size: of the first tensor argument (Hugging Face models take keywords).
        first = next((a for a in (*args, *kwargs.values())
                      if isinstance(a, torch.Tensor) and a.ndim >= 1), None)
        if first is None:
            return
        n, keep = first.shape[0], self.config.probe_samples
        self.probe = (tuple(_slice_batch(a, n, keep) for a in args),
                      {k: _slice_batch(v, n, keep) for k, v in kwargs.items()})

    def _accepts(self, event: Any) -> bool:
        return isinstance(event, AttentionEvent) and id(event.source) in self._layer_of

    def _on_attention(self, event: AttentionEvent) -> None:
        if not self._stats_due or self._budget.off:  # thinned, or switched off this step
            return
        t0 = time.thread_time()
        layer = self._layer_of[id(event.source)]
        if layer in self._pending or layer in self._pending_stats:
            return  # a layer run twice in one forward: keep the first
        if self.staging is not None:
            self._pending[layer] = self._portable(event, 0)  # computed in the other process
        elif _on_cuda(event):
            # Reduced where the tensors are: kernels queued on the training stream, the
            # (R, H) result copied to pinned memory; nothing here waits for the device.
            with torch.no_grad():
                self._pending_stats[layer] = to_host(sample_statistics(event, 0))
        else:
            self._pending[layer] = event.sample_copy(0)  # the writer computes (CPU)
        self._budget.spend("stats", time.thread_time() - t0)

    def _portable(self, event: AttentionEvent, n: int) -> Portable:
        """Sample ``n`` as data (host copies, see ``staging``), with its copies' arrival."""
        portable = portable_sample(event, n, self.staging.copy)
        portable.arrival = self.staging.arrival()
        return portable

    def _on_step(self, run: Run) -> None:
        """Step hook: this step's statistics when due (every ``budget.stats_every`` steps),
        a probe snapshot when due; the time each takes is charged to the run's budget."""
        step = run.step_index
        if step is None:
            return
        t0 = time.thread_time()
        now = time.time()
        budget = self._budget
        if self.session is None or (self.last_step is not None and step < self.last_step):
            self._new_session()  # first step, or the run started over
        self.last_step = step
        pending, self._pending = self._pending, {}
        stats, self._pending_stats = self._pending_stats, {}
        if self.session is None:
            return
        if budget.off:  # the budget measures the slowdown: no record, no snapshot this step
            every = self.config.every * self._snapshot_stride
            if self.last_snapshot is not None and step // every > self.last_snapshot // every:
                self.last_snapshot = step  # skipped, not taken late: snapshots stay on multiples
            return
        if self._stats_due:
            item = StepItem(self.session, step, now, dict(run.scalars), pending, len(run.sites),
                            stats)
            if self.service.submit(item) is False:  # the writer is behind: over budget
                budget.queue_full()
        # The next step's statistics: every ``stats_every`` steps (a count, not the step
        # number: loops that skip numbers are still thinned evenly).
        self._stats_seen += 1
        self._stats_due = self._stats_seen % budget.stats_every == 0
        self._listen(self._stats_due)
        budget.spend("stats", time.thread_time() - t0)
        self._space_snapshots()
        every = self.config.every * self._snapshot_stride  # at multiples (and the first one)
        # A probe pass is charged spread over the steps between two of them (its moving
        # average per step), so a window's overhead does not jump with each snapshot.
        budget.spend("snapshots", self._probe_time / every)
        due = self.last_snapshot is None or step // every > self.last_snapshot // every
        if due and self.probe is not None and not self.probe_failed:
            self.last_snapshot = step
            budget.lump()
            t0 = time.thread_time()
            attention = self._probe_forward()
            repeat = self._probe_forward(repeated=True) if attention and self.repeat_ok else {}
            if attention:
                labels = run.labels(0) if self.probe_labels is None else None
                if labels is not None:
                    self.probe_labels = labels
                item = SnapshotItem(self.session, step, now, attention, labels, repeat,
                                    self.config.snapshot_max_side)
                if self.service.submit(item) is False:
                    budget.queue_full()
            self._adapt_stride(time.thread_time() - t0)

    @property
    def _snapshot_stride(self) -> int:
        """Snapshots every ``every * stride`` steps: the budget's spacing, or the probe's
        own (``probe_budget``, deprecated) when that is wider."""
        return max(self._stride, self._budget.snapshot_stride)

    def _adapt_stride(self, probe_s: float) -> None:
        """Account for a probe pass of ``probe_s`` CPU seconds (its moving average is
        charged to the budget per step) and space snapshots so that probe passes take
        at most ``PROBE_SHARE`` of the budget; with the deprecated ``probe_budget``, also
        so that they take at most that share of training time."""
        if not self._probes:  # the first pass warms up (allocations): charged as it is
            self._budget.spend("snapshots", probe_s)
            self._probe_cost = probe_s
        else:
            self._probe_time = probe_s if self._probes == 1 else \
                0.5 * self._probe_time + 0.5 * probe_s
            self._probe_cost = self._probe_time
        self._probes += 1
        self._space_snapshots()
        step_time = self._budget.step_time
        if self.config.probe_budget is None or step_time <= 0:
            return
        share = self._probe_time / (self.config.every * self._stride * step_time)
        if share > self.config.probe_budget:
            self._stride *= 2
        elif share < self.config.probe_budget / 4 and self._stride > 1:
            self._stride //= 2

    def _space_snapshots(self) -> None:
        """Hold the budget's snapshot spacing where probe passes of the known cost take at
        most ``PROBE_SHARE`` of it (once the budget has measured a window: short runs keep
        ``every``)."""
        budget = self._budget
        limit = budget.limit  # the run's budget, or the smaller one while nobody watches
        if limit is None or budget.overhead is None or budget.step_time <= 0 \
                or not self._probe_cost:
            return
        share = self._probe_cost / (self.config.every * budget.step_time)
        allowed = PROBE_SHARE * limit
        budget.hold_at_least("snapshots",
                             math.ceil(math.log2(share / allowed)) if share > allowed else 0)

    def _new_session(self) -> None:
        run = self.run
        heads = [s.heads for s in run.sites]
        meta = {"layers": len(run.sites), "heads": max((h or 0 for h in heads), default=0),
                "layer_heads": heads, "roles": [s.role for s in run.sites],
                "every": self.config.every, "probe_samples": self.config.probe_samples,
                "stat_names": list(HEAD_STATISTICS)}
        self.session = self.service.new_session(run.id, run.name, meta)
        self.last_step = self.last_snapshot = None
        self.probe_labels = None
        logger.info("history: recording run %r as session %s", run.id, self.session)

    def _repeated_args(self) -> tuple[tuple, dict] | None:
        """The probe with its first half repeated (the induction probe), or None when the
        probe is not a plain (N, L, ...) sequence batch (other arguments, too short)."""
        if self.probe is None:
            return None
        args, kwargs = self.probe
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if kwargs or not tensors or len(tensors) != len(args) \
                or any(a.ndim < 2 or a.shape[:2] != tensors[0].shape[:2] for a in tensors) \
                or tensors[0].shape[1] < 4:
            return None
        return tuple(repeated_probe(a) for a in args), {}

    def _probe_forward(self, repeated: bool = False) -> dict[int, list[AttentionEvent]]:
        """Run the model on the probe (or the induction probe, ``repeated``); each layer's
        event as copies of its P samples."""
        assert self.probe is not None
        args, kwargs = self.probe
        if repeated:
            made = self._repeated_args()
            if made is None:
                self.repeat_ok = False
                return {}
            args, kwargs = made
        model = self.run.model
        out: dict[int, list[AttentionEvent]] = {}
        private = EventDispatcher()

        def collect(event: AttentionEvent) -> None:
            layer = self._layer_of[id(event.source)]
            if layer not in out:
                copy = event.sample_copy if self.staging is None \
                    else lambda i: self._portable(event, i)
                out[layer] = [copy(i) for i in range(event.shape[0])]

        private.listen(self._accepts, collect)
        modes = [(m, m.training) for m in model.modules()]
        self._in_probe = True
        seen = (self.run.batch_size, self.run.seq_len)  # the run's hook sees the probe too
        try:
            model.eval()
            # A private dispatcher: the stream and the stats listener do not see the probe.
            with torch.no_grad(), dispatching_to(model, private):
                model(*args, **kwargs)
        except Exception:
            if repeated:  # the model rejects the longer / repeated input: no induction scores
                self.repeat_ok = False
                logger.info("history: run %r cannot take the induction probe; no induction "
                            "scores", self.run.id, exc_info=True)
                return {}
            self.probe_failed = True
            logger.warning("history: the probe forward pass of run %r failed; recording head "
                           "statistics only", self.run.id, exc_info=True)
            return {}
        finally:
            self._in_probe = False
            self.run.batch_size, self.run.seq_len = seen
            for module, mode in modes:  # a plain bool: nn.Module's __setattr__ is not needed
                object.__setattr__(module, "training", mode)
        return out


