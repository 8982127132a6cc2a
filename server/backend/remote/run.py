"""The server side of a remote run: a :class:`~attnscope.core.run_base.BaseRun` fed over
``/ws/publish``.

A :class:`RemoteRun` has no model here: its layers, heads and roles come from the
publisher's ``announce``; its steps, scalars and captures arrive over the network.
When the hub plans what its viewers want, :class:`RemoteStream` (the hub's
publisher for remote runs) forwards the plan to the training process instead of
listening to a model, and fills the same latest-value slots with the captures
that come back, so viewers cannot tell a remote run from a local one.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from transformer_core.masking import FullMask

from ...contract.captures import CaptureRequests, model_info_from_message
from ...contract.layout import ModelLayout, SiteLayout
from ...contract.plan import EMPTY_PLAN, Capture, Plan, SlotKey
from ...core.run_base import BaseRun, RunStateError, ScalarHistory
from ...core.stats import MaskInfo

logger = logging.getLogger(__name__)


class RemoteRun(BaseRun):
    """A run whose training loop is in another process (``Dashboard.connect``).

    ``status`` is ``live`` while its publisher is connected, ``idle`` when the
    connection dropped (the publisher reconnects by itself and continues the same
    run) and ``ended`` once the publisher said so (``close()``).
    """

    def __init__(self, run_id: str, name: str, model: dict[str, Any], host: str,
                 config: dict[str, Any] | None = None) -> None:
        layers = model.get("layer_details") or []
        if not layers:
            raise ValueError("model.layer_details: a remote run needs at least one layer")
        d_model = model.get("d_model")
        layout = ModelLayout(
            sites=tuple(SiteLayout.from_message(i, layer) for i, layer in enumerate(layers)),
            d_model=None if d_model is None else int(d_model))
        super().__init__(run_id, layout, name=name, controls=())
        self.host, self.config = host, dict(config or {})
        self.seq_len = model.get("seq_len")
        self._ended = True  # until a publisher attaches
        self._dropped = False  # the last connection dropped without close(): idle
        self.plan: Plan = EMPTY_PLAN
        self.link: Any = None  # the attached publisher connection (endpoint._Link)
        self.proxy: RemoteStream | None = None
        self._capture_layout: ModelLayout | None = None  # from the announce; None: no captures
        self.text_captures = False  # the publisher tokenizes captures given as text
        self.captures = CaptureRequests()
        self.history_inbox: Any = None  # a remote.history.HistoryInbox when history is on
        # What its announce allows its messages (remote.checks.RunBounds; set on attach).
        self.bounds: Any = None
        # Issued at the first announce (remote.endpoint): proves a reconnecting publisher
        # is the one that owns this run id.
        self.secret: str | None = None

    @property
    def status(self) -> str:
        return "idle" if self._ended and self._dropped else super().status

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "host": self.host, "config": self.config}

    def open_stream(self, notify: Callable[[str], None]) -> RemoteStream:
        """The hub's source of this run's frames: forwards plans to the publisher."""
        return RemoteStream(self, notify)

    def capture_layout(self) -> ModelLayout | None:
        """What the publisher's announce said captures need (None: it said nothing)."""
        return self._capture_layout

    def set_capture_info(self, message: dict[str, Any] | None) -> None:
        """What the publisher's announce says captures need to know of its model."""
        if message is None:
            self._capture_layout = None
            self.text_captures = False
            return
        self._capture_layout = model_info_from_message(message)
        self.text_captures = message.get("text") is True
        symbols = message.get("symbols")
        self.symbols = None if symbols is None else [str(s) for s in symbols]

    def capture(self, inputs: torch.Tensor, kinds: list[str], layers: list[int],
                heads: list[int] | None, max_bytes: int,
                timeout: float) -> tuple[dict[str, Any], int | None]:
        """Run a capture in the publisher's process (see :mod:`attnscope.contract.captures`):
        (name -> numpy array, the publisher's last step when it ran the capture)."""
        link = self.link
        if link is None:
            raise RunStateError(f"run {self.id!r} is {self.status}: its publisher is not "
                                "connected, so there is no model to run")
        given = {"tokens" if inputs.dtype == torch.long else "features": inputs.tolist()}
        request = {"input": given, "kinds": kinds, "layers": layers, "heads": heads}
        return self.captures.request(link.send_threadsafe, request, max_bytes, timeout)

    def capture_text(self, texts: list[str], kinds: list[str], layers: list[int],
                     heads: list[int] | None, max_bytes: int,
                     timeout: float) -> tuple[dict[str, Any], int | None]:
        """As :meth:`capture`, on ``texts`` tokenized by the publisher's tokenizer; the
        result holds their token ids as ``tokens`` (N, L)."""
        link = self.link
        if link is None:
            raise RunStateError(f"run {self.id!r} is {self.status}: its publisher is not "
                                "connected, so there is no model to run")
        request = {"input": {"text": list(texts)}, "kinds": kinds, "layers": layers,
                   "heads": heads}
        return self.captures.request(link.send_threadsafe, request, max_bytes, timeout)

    # -- from the publisher's connection (event loop) ---------------------------

    def attach(self, link: Any, history: dict[str, Any] | None) -> None:
        """A publisher (re)connected: it is live, and its history is the one it kept."""
        self.link = link
        if history is not None and history.get("steps"):
            self.history = ScalarHistory.from_dict(history)
            self.step_index = self.history.steps[-1]
            self.scalars = dict(self.history.values[-1])
            self.scalars_time = self.history.times[-1]
            self.scalars_seq += 1
        self._ended = False
        self._dropped = False
        self.error = None
        self._changed()

    def detach_link(self, link: Any, ended: bool) -> None:
        """The publisher left (``ended``: it said so; else its connection dropped)."""
        if self.link is not link:
            return  # a newer connection took over
        self.link = None
        self.captures.fail_all(f"the publisher of run {self.id!r} disconnected before the "
                               "capture finished")
        self._dropped = not ended
        if not ended:
            self.error = "publisher disconnected"
        self._ended = True
        self._changed()

    def apply_steps(self, steps: list[list[Any]]) -> None:
        """``[[step, time, {name: value}, batch_size, seq_len], ...]`` from the publisher."""
        history = self.history
        for step, t, values, batch, length in steps:
            if history.times and float(t) <= history.times[-1]:
                continue  # already in the history the publisher announced
            values = {str(k): math.nan if v is None else float(v) for k, v in values.items()}
            if batch is not None:
                self.batch_size = int(batch)
            if length is not None:
                self.seq_len = int(length)
            self.record_step(int(step), values, float(t))
        if self.proxy is not None and steps:
            self.proxy.notify()

    def deliver(self, cap: Capture, valid: list[int] | None) -> None:
        """A capture from the publisher: into the viewers' latest-value slot."""
        if not 0 <= cap.layer < len(self.sites):
            raise ValueError(f"layer: capture for layer {cap.layer}, run has {len(self.sites)}")
        if cap.kind == "head_stats" and valid is not None:
            cap.masks = _masks_from_counts(valid, cap.data.shape[-1])
        if self.proxy is not None:
            self.proxy.put(cap)


def _masks_from_counts(valid: list[int], keys: int) -> MaskInfo:
    """A mask with the same number of unmasked keys per query row as the publisher saw."""
    counts = torch.tensor(valid, dtype=torch.long)  # (L,)
    matrix = torch.arange(keys)[None, :] < counts[:, None]  # (L, S)
    return MaskInfo(FullMask(matrix), None, "full")


class RemoteStream:
    """The hub's publisher for a :class:`RemoteRun`: forwards plans, holds the slots."""

    def __init__(self, run: RemoteRun, notify: Callable[[str], None]) -> None:
        self.run = run
        self.slots: dict[SlotKey, Capture] = {}
        self._notify = notify
        self._plan = EMPTY_PLAN
        self._seq = itertools.count(1)
        run.proxy = self

    @property
    def plan(self) -> Plan:
        return self._plan

    def set_plan(self, plan: Plan) -> None:
        self._plan = plan
        self.run.plan = plan
        link = self.run.link
        if link is not None:
            link.send_plan(plan)

    def close(self) -> None:
        self.set_plan(EMPTY_PLAN)
        self.slots.clear()
        if self.run.proxy is self:
            self.run.proxy = None

    def flush_stale(self, max_age: float) -> None:
        """Nothing pending here: the publisher sends whole steps."""

    def put(self, cap: Capture) -> None:
        cap.seq = next(self._seq)
        self.slots[(cap.kind, cap.layer, cap.sample)] = cap
        self.notify()

    def notify(self) -> None:
        self._notify(self.run.id)

