"""A run whose model is in this process: :class:`Run` (training side).

What every run has (identity, layout, status, steps, scalars, listeners, summary)
is :class:`~attnscope.core.run_base.BaseRun`'s; a local run adds the model (its
:class:`~attnscope.contract.layout.LocalModel`: the layout and the modules behind it), its
:class:`StepGate` (pause, resume, and jobs run in the training thread between two
steps) and its forward pre-hook (batch size and sequence length). The training
thread calls :meth:`Run.step`; everything else is called from other threads.

>>> from transformer_core.builders import TransformerEncoderBuilder
>>> model = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=2,
...     query_dimensions=4, value_dimensions=4, feed_forward_dimensions=8).get()
>>> run = Run(model, run_id="toy")
>>> [site.name for site in run.sites]
['layers.0.attention.inner_attention', 'layers.1.attention.inner_attention']
>>> run.step(0, loss=1.5, tokens=[["a", "b", "c"]])
>>> run.status, run.step_index, run.scalars, run.summary()["model"]["seq_len"]
('live', 0, {'loss': 1.5}, 3)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from transformer_core.events import EventDispatcher

from ..contract.layout import LocalModel
from ..core.capture import run_capture
from ..core.jsonsafe import finite_or_none
from ..core.model_inputs import TextTokenizer
from ..core.run_base import (
    CONTROLS,
    BaseRun,
    RunRegistry,
    RunStateError,
    ScalarHistory,
    Status,
    UnknownRunError,
    slugify,
)
from .budget import Budget
from .recorder import RecorderSink, RunRecorder
from .stream import StreamTap
from .tokens import check_batch, token_rows

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# What this module has always offered, now living in the core modules.
__all__ = ["CONTROLS", "Run", "RunRegistry", "RunStateError", "ScalarHistory", "Status",
           "StepGate", "UnknownRunError", "finite_or_none", "slugify"]


def _scalar(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"scalar {name!r} must be a number or a 1-element tensor, "
                        f"got {type(value).__name__}") from exc


def _run_job(fn: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed back to the caller; never into the training loop
        future.set_exception(exc)


class StepGate:
    """Where the training thread waits between two steps: while paused, and to run
    jobs other threads queue with :meth:`call` (captures), in the training thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self.paused = False
        self.closed = False  # no training thread any more: jobs run in the caller

    @property
    def due(self) -> bool:
        """Whether :meth:`wait` has something to do (read without a lock: a hint)."""
        return bool(self._jobs) or self.paused

    def wait(self) -> None:
        """Training thread: run queued jobs; while paused, wait for resume or close."""
        while True:
            with self._cond:
                if not self._jobs and (not self.paused or self.closed):
                    return
                if not self._jobs:
                    self._cond.wait(timeout=1.0)
                    continue
                fn, future = self._jobs.popleft()
            _run_job(fn, future)

    def serve(self, timeout: float) -> None:
        """Run jobs queued for the training thread from the calling thread, for up to
        ``timeout`` seconds (a thread with no training loop to run: ``Dashboard.wait``)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if not self._jobs:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._cond.wait(timeout=left)
                    continue
                fn, future = self._jobs.popleft()
            _run_job(fn, future)

    def call(self, fn: Callable[[], Any], timeout: float, owner: str) -> Any:
        """Run ``fn()`` in the training thread between two steps; return its result or
        raise its exception here. When closed, ``fn`` runs right here. ``TimeoutError``
        (naming ``owner``) if no step boundary comes within ``timeout`` seconds; the
        job is then dropped if it has not started."""
        future: Future = Future()
        with self._cond:
            queued = not self.closed
            if queued:
                self._jobs.append((fn, future))
                self._cond.notify_all()
        if not queued:
            _run_job(fn, future)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done() and not future.cancelled():
                raise  # fn's own TimeoutError
            future.cancel()
            raise TimeoutError(
                f"{owner}: the training thread did not reach a step boundary in "
                f"{timeout:g} s (is the training loop still calling step()?)"
            ) from None

    def set_paused(self, paused: bool) -> None:
        with self._cond:
            self.paused = paused
            self._cond.notify_all()

    def close(self) -> None:
        """Release a paused training thread; queued jobs run here, now."""
        with self._cond:
            self.closed = True
            self.paused = False
            jobs = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for fn, future in jobs:
            _run_job(fn, future)

    def reopen(self) -> None:
        with self._cond:
            self.closed = False


class Run(BaseRun):
    """A model being trained in this process, as the server sees it.

    Arguments
    ---------
    model: any ``nn.Module`` with attention sites (see
        :func:`transformer_core.instrument.instrument`).
    run_id: the id used in URLs and the protocol; name: the display name.
    controls: which of ``pause``, ``resume``, ``restart`` the run accepts.
    on_restart: called (from a server thread) by :meth:`restart`.
    symbols: the run's vocabulary (token id -> label), if it has one; (N, L)
        tensors of token ids given to :meth:`step` are labelled with it.
    labeler: turns a (L,) tensor of token ids into labels (default: the tokenizer's,
        else ``symbols``, else ``str`` of each id).
    tokenizer: a Hugging Face tokenizer: token labels, and captures given as ``text``.
    max_overhead: the dashboard's cost budget, a fraction of training time (see
        :mod:`attnscope.training.budget`); None (the default here): measured and reported, never
        thinned. ``Dashboard.start`` / ``connect`` and the demo pass the setting.
    idle_overhead: the budget while nobody watches the run (None: ``max_overhead``).

    Thread model: :meth:`step` is called by the training thread, everything
    else by server threads. ``step`` is the only place the training thread may
    wait, and only while the run is paused (or running a job queued with
    :meth:`call_between_steps`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        run_id: str = "run",
        name: str | None = None,
        controls: Sequence[str] = ("pause", "resume"),
        on_restart: Callable[[], None] | None = None,
        symbols: Sequence[str] | None = None,
        labeler: Callable[[torch.Tensor], list[str]] | None = None,
        tokenizer: Any = None,
        max_overhead: float | None = None,
        idle_overhead: float | None = None,
    ) -> None:
        # before anything can fail: ValueError names it
        self.budget = Budget(max_overhead, idle_overhead=idle_overhead)
        local = LocalModel(model)  # TypeError / ValueError for a model it cannot watch
        super().__init__(run_id, local.layout, name=name, controls=controls, symbols=symbols)
        self.model = model
        self.local = local
        self._tokens: Any = None
        self.tokenizer = None if tokenizer is None else TextTokenizer(tokenizer)
        self._labeler = labeler or (None if self.tokenizer is None else self.tokenizer.labels)
        self._on_restart = on_restart
        self._gate = StepGate()
        # Batch size and length from our own first attention's queries. Not on a foreign
        # model's modules: a hook there would switch off nn.TransformerEncoderLayer's fused
        # fast path; such runs learn them from step(tokens=...). Nor on a recurrent one:
        # its queries are one position (N, H, E), with no length.
        first = local.sites[0]
        self._seq_hook = None if first.kind != "transformer_core" or first.recurrent \
            else first.module.register_forward_pre_hook(self._see_input)
        # Bumped by new_sequence(): the stream starts recurrent sites' rows over.
        self.sequence = 0

    # -- read side ---------------------------------------------------------

    @property
    def status(self) -> Status:
        if self._ended:
            return "ended"
        return "paused" if self._gate.paused else "live"

    @property
    def dispatchers(self) -> list[EventDispatcher]:
        """The distinct dispatchers this run's modules talk to."""
        return self.local.dispatchers()

    def last_tokens(self, sample: int) -> torch.Tensor | None:
        """The token ids (L,) of ``sample`` of the last batch given to :meth:`step`, if ids
        were given."""
        tokens = self._tokens
        if not isinstance(tokens, torch.Tensor) or not 0 <= sample < tokens.shape[0]:
            return None
        return tokens[sample].detach().cpu()

    def call_idle(self, timeout: float) -> None:
        """Run, from the calling thread, what waits for the training thread (captures) for
        up to ``timeout`` seconds: for a process with no training loop running."""
        self._gate.serve(timeout)

    def labels(self, sample: int) -> list[str] | None:
        """Token labels of ``sample`` of the last batch given to :meth:`step`, or None."""
        tokens = self._tokens
        if tokens is None:
            return None
        try:
            row = tokens[sample]
        except (IndexError, KeyError, TypeError):
            return None
        if isinstance(row, torch.Tensor):
            if self._labeler is not None:
                return list(self._labeler(row))
            ids = row.tolist()
            symbols = self.symbols
            if symbols is not None:
                return [symbols[i] if 0 <= i < len(symbols) else str(i) for i in ids]
            return [str(i) for i in ids]
        return [str(t) for t in row]

    # -- the run interface (hub, history, captures) ---------------------------

    def open_stream(self, notify: Callable[[str], None]) -> StreamTap:
        """An in-process publisher listening to this run's model (see stream.publisher)."""
        return StreamTap(self, notify)

    def capture(self, inputs: torch.Tensor, kinds: list[str], layers: list[int],
                heads: list[int] | None, max_bytes: int, timeout: float,
                attention_mask: torch.Tensor | None = None,
                ) -> tuple[dict[str, np.ndarray], int | None]:
        """The capture in the training thread, between two steps (see BaseRun.capture);
        ``attention_mask`` (N, L): which token positions are not padding."""

        def job() -> tuple[dict[str, torch.Tensor], int | None]:
            return self.capture_now(inputs, kinds, layers, heads, max_bytes,
                                    attention_mask=attention_mask)

        out, step = self.call_between_steps(job, timeout)
        return {k: v.numpy() for k, v in out.items()}, step

    def capture_now(self, inputs: torch.Tensor, kinds: list[str], layers: list[int] | None,
                    heads: list[int] | None, max_bytes: int,
                    attention_mask: torch.Tensor | None = None,
                    ) -> tuple[dict[str, torch.Tensor], int | None]:
        """One forward pass on ``inputs`` right here (the caller is the training thread
        between two steps, or nobody trains): (name -> CPU tensor, the last step)."""
        out = run_capture(self.model, inputs, kinds, layers, heads, max_bytes,
                          local=self.local, attention_mask=attention_mask)
        return out, self.step_index

    def new_recorder(self, sink: RecorderSink) -> RunRecorder:
        """A history recorder of this run (in its training thread) into ``sink``."""
        return RunRecorder(self, sink)

    # -- training thread -----------------------------------------------------

    def step(self, step: int, loss: Any = None, tokens: Any = None, **scalars: Any) -> None:
        """Mark the end of training step ``step``: record scalars and this batch's tokens.

        ``tokens`` (optional) are the token labels of this step's batch: a list
        of N lists of L strings, an (N, L) tensor of token ids, or a mapping
        holding ``input_ids`` (a ``BatchEncoding``); anything else raises, naming
        it (:mod:`attnscope.training.tokens`). Cheap: no copy of the tokens (a GPU batch is
        read only when its labels are shown). Blocks while the run is
        paused (the user asked for it), and runs jobs queued with
        :meth:`call_between_steps`.
        """
        if self._ended:
            return
        budget = self.budget
        budget.step_begin()
        values = {} if loss is None else {"loss": _scalar("loss", loss)}
        for key, value in scalars.items():
            values[key] = _scalar(key, value)
        if tokens is not None:
            self._set_tokens(tokens)
        self.record_step(step, values, time.time())
        for hook in self._step_hooks:
            hook(self)
        if self._gate.due:
            self._gate.wait()
        budget.step_end()

    def new_sequence(self) -> None:
        """Say that a new sequence starts (recurrent inference): the stream's heatmaps of
        recurrent sites drop the rows of the last one. Also detected on its own when the
        step index goes back or a self-attention's keys stop growing."""
        self.sequence += 1

    def _set_tokens(self, tokens: Any) -> None:
        tokens, n, length = token_rows(tokens)  # TypeError / ValueError naming the mistake
        # The batch the attention saw is known (our hook): the labels must fit it.
        if self._seq_hook is not None and not check_batch(self, length, self.seq_len,
                                                          first=self._tokens is None):
            return
        self._tokens = tokens
        self.batch_size, self.seq_len = n, length

    def _see_input(self, module: nn.Module, args: tuple) -> None:
        # Forward pre-hook on the first attention site: (N, L, ...) inputs.
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 3:
            self.batch_size, self.seq_len = args[0].shape[0], args[0].shape[1]

    # -- server threads ------------------------------------------------------

    def call_between_steps(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn()`` in the training thread between two steps and return its result
        (or raise its exception here). When the run has ended (no training thread),
        ``fn`` runs right here. Raises ``TimeoutError`` if the training thread does not
        reach a step boundary within ``timeout`` seconds."""
        return self._gate.call(fn, timeout, f"run {self.id!r}")

    def pause(self) -> None:
        self._check_control("pause")
        self._gate.set_paused(True)
        self._changed()

    def resume(self) -> None:
        self._check_control("resume")
        self._gate.set_paused(False)
        self._changed()

    def restart(self) -> None:
        """Start over (only runs created with ``on_restart``); also resumes a paused run."""
        if "restart" not in self.controls or self._on_restart is None:
            raise RunStateError(f"run {self.id!r} does not support restart")
        self._on_restart()
        self._gate.set_paused(False)
        self._changed()

    def reset(self) -> None:
        """Forget the step counter and scalars (called by a restarting trainer)."""
        self._gate.reopen()
        super().reset()

    def close(self) -> None:
        """Mark the run ended; a paused training thread is released; queued jobs run here."""
        if self._ended:
            return
        self._gate.close()
        super().close()

    def detach(self) -> None:
        """Remove the hook this run put on the model (when it leaves the registry)."""
        if self._seq_hook is not None:
            self._seq_hook.remove()
