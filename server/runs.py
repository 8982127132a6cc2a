"""The run registry: runs (a model, its dispatchers, step counter, status) by id.

A :class:`Run` is fed from the training thread (:meth:`Run.step`) and read
and controlled from the server (REST, websocket). Its "layers" are the
``transformer_core`` inner-attention modules of the model, in
``model.named_modules()`` order, so a model wrapped in a bigger ``nn.Module``
and decoders (self- then cross-attention per layer) work alike.

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

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, Literal

import torch
import torch.nn as nn

from transformer_core.events import EventDispatcher

from .layout import LocalModel, ModelLayout, SiteLayout
from .model_inputs import TextTokenizer

logger = logging.getLogger(__name__)

Status = Literal["live", "paused", "idle", "ended"]
CONTROLS = ("pause", "resume", "restart")


class RunStateError(RuntimeError):
    """A control the run does not support, or one impossible in its current state (HTTP 409)."""


class UnknownRunError(KeyError):
    """No run has this id (HTTP 404)."""

    def __init__(self, run_id: str, known: Sequence[str]) -> None:
        super().__init__(run_id)
        self.run_id = run_id
        self.message = f"unknown run {run_id!r}; known runs: {', '.join(known) or 'none'}"

    def __str__(self) -> str:
        return self.message


def slugify(name: str) -> str:
    """A run id from a display name: lower-case letters, digits, ``-``, ``_``, ``/``.

    >>> slugify("Alice / lr 3e-4!")
    'alice-/-lr-3e-4'
    """
    slug = re.sub(r"[^a-z0-9_/-]+", "-", name.lower()).strip("-")
    return slug or "run"


def _scalar(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"scalar {name!r} must be a number or a 1-element tensor, "
                        f"got {type(value).__name__}") from exc


class ScalarHistory:
    """Every step's scalars, thinned to at most ``max_points`` (bounded memory).

    When full, every other point is dropped and from then on only every
    second (fourth, ...) step is kept, so the series always spans the whole run.

    >>> h = ScalarHistory(max_points=4)
    >>> for step in range(10):
    ...     h.append(step, 0.0, {"loss": 1.0 / (step + 1)})
    >>> h.steps
    [0, 4, 8]
    """

    def __init__(self, max_points: int = 2048) -> None:
        self.max_points = max_points
        self.clear()

    def clear(self) -> None:
        self.steps: list[int] = []
        self.times: list[float] = []
        self.values: list[dict[str, float]] = []
        self._stride = 1
        self._seen = 0

    def append(self, step: int, time_: float, values: dict[str, float]) -> None:
        keep = self._seen % self._stride == 0
        self._seen += 1
        if not keep:
            return
        self.steps.append(step)
        self.times.append(time_)
        self.values.append(values)
        if len(self.steps) > self.max_points:
            self.steps, self.times, self.values = \
                self.steps[::2], self.times[::2], self.values[::2]
            self._stride *= 2

    def to_dict(self) -> dict[str, Any]:
        """``{"steps": [...], "time": [...], "values": {name: [value or None, ...]}}``."""
        steps, times, values = list(self.steps), list(self.times), list(self.values)
        names = sorted({name for v in values for name in v})
        return {"steps": steps, "time": times,
                "values": {n: [finite_or_none(v[n]) if n in v else None for v in values]
                           for n in names}}


class Run:
    """A model being trained, as the server sees it.

    Arguments
    ---------
    model: any ``nn.Module`` with attention that
        :func:`transformer_core.instrument.instrument` finds (ours, Hugging Face,
        ``nn.MultiheadAttention``, modules calling ``F.scaled_dot_product_attention``).
    run_id: the id used in URLs and the protocol; name: the display name.
    controls: which of ``pause``, ``resume``, ``restart`` the run accepts.
    on_restart: called (from a server thread) by :meth:`restart`.
    symbols: the run's vocabulary (token id -> label), if it has one; (N, L)
        tensors of token ids given to :meth:`step` are labelled with it.
    labeler: turns a (L,) tensor of token ids into labels (default: the tokenizer's,
        else ``symbols``, else ``str`` of each id).
    tokenizer: a Hugging Face tokenizer: token labels, and captures given as ``text``.

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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        unknown = set(controls) - set(CONTROLS)
        if unknown:
            raise ValueError(f"controls: unknown {sorted(unknown)}; allowed: {list(CONTROLS)}")
        self.local = LocalModel(model)  # raises ValueError when it has no attention site
        self.layout: ModelLayout = self.local.layout
        self.model = model
        self.id = run_id
        self.name = name or run_id
        self.controls = tuple(c for c in CONTROLS if c in controls)
        self.started = datetime.now(UTC)
        self.error: str | None = None
        self.step_index: int | None = None  # the last step marked with step()
        self.scalars: dict[str, float] = {}
        self.scalars_time = 0.0
        self.scalars_seq = 0  # bumped by every step(); senders compare it
        self.history = ScalarHistory()
        self.seq_len: int | None = None
        self.batch_size: int | None = None
        self._tokens: Any = None
        self.symbols = None if symbols is None else [str(s) for s in symbols]
        self.tokenizer = None if tokenizer is None else TextTokenizer(tokenizer)
        self._labeler = labeler or (None if self.tokenizer is None else self.tokenizer.labels)
        self._on_restart = on_restart
        self._ended = False
        self._paused = False
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._step_hooks: tuple[Callable[[Run], None], ...] = ()
        self._change_listeners: tuple[Callable[[Run], None], ...] = ()
        # Batch size and length from our own first attention's queries. Not on a foreign
        # model's modules: a hook there would switch off nn.TransformerEncoderLayer's fused
        # fast path; such runs learn them from step(tokens=...).
        first = self.local.sites[0]
        self._seq_hook = None if first.kind != "transformer_core" \
            else first.module.register_forward_pre_hook(self._see_input)

    # -- read side ---------------------------------------------------------

    @property
    def status(self) -> Status:
        if self._ended:
            return "ended"
        return "paused" if self._paused else "live"

    @property
    def sites(self) -> tuple[SiteLayout, ...]:
        """The run's attention sites (its "layers"): ``self.layout.sites``."""
        return self.layout.sites

    @property
    def dispatchers(self) -> list[EventDispatcher]:
        """The distinct dispatchers this run's modules talk to."""
        return self.local.dispatchers()

    def model_summary(self) -> dict[str, Any]:
        """layers, heads, attention_type, d_model, seq_len (and per-layer details)."""
        return self.layout.summary(self.seq_len)

    def summary(self) -> dict[str, Any]:
        """The RunSummary of docs/protocol.md."""
        return {
            "id": self.id, "name": self.name, "status": self.status, "step": self.step_index,
            "started": self.started.isoformat().replace("+00:00", "Z"), "error": self.error,
            "controls": list(self.controls), "model": self.model_summary(),
        }

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

    # -- training thread -----------------------------------------------------

    def step(self, step: int, loss: Any = None, tokens: Any = None, **scalars: Any) -> None:
        """Mark the end of training step ``step``: record scalars and this batch's tokens.

        ``tokens`` (optional) are the token labels of this step's batch: a list
        of N lists of L strings, or an (N, L) tensor of token ids. Cheap: no
        copy of the tokens unless they are on a GPU. Blocks while the run is
        paused (the user asked for it), and runs jobs queued with
        :meth:`call_between_steps`.
        """
        if self._ended:
            return
        values = {} if loss is None else {"loss": _scalar("loss", loss)}
        for key, value in scalars.items():
            values[key] = _scalar(key, value)
        if tokens is not None:
            self._set_tokens(tokens)
        self.step_index = int(step)
        self.scalars = values
        self.scalars_time = time.time()
        self.scalars_seq += 1
        if values:
            self.history.append(self.step_index, self.scalars_time, values)
        for hook in self._step_hooks:
            hook(self)
        if self._jobs or self._paused:
            self._wait_between_steps()

    def _set_tokens(self, tokens: Any) -> None:
        if isinstance(tokens, torch.Tensor):
            if tokens.ndim != 2:
                raise ValueError(f"tokens: expected shape (N, L), got {tuple(tokens.shape)}")
            tokens = tokens.detach()
            if tokens.device.type != "cpu":
                tokens = tokens.cpu()
            n, length = tokens.shape
        else:
            try:
                n, length = len(tokens), len(tokens[0])
            except (TypeError, IndexError, KeyError) as exc:
                raise ValueError("tokens: expected a list of N lists of L labels "
                                 "or an (N, L) tensor of token ids") from exc
        self._tokens = tokens
        self.batch_size, self.seq_len = n, length

    def _see_input(self, module: nn.Module, args: tuple) -> None:
        # forward pre-hook on the first attention: queries are (N, L, H, E).
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            self.batch_size, self.seq_len = args[0].shape[0], args[0].shape[1]

    def _wait_between_steps(self) -> None:
        while True:
            with self._cond:
                if not self._jobs and (not self._paused or self._ended):
                    return
                if not self._jobs:
                    self._cond.wait(timeout=1.0)
                    continue
                fn, future = self._jobs.popleft()
            _run_job(fn, future)

    # -- server threads ------------------------------------------------------

    def call_between_steps(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn()`` in the training thread between two steps and return its result.

        When the run has ended (no training thread), ``fn`` runs right here.
        Raises ``TimeoutError`` if the training thread does not reach a step
        boundary within ``timeout`` seconds (the job is then dropped if it has
        not started).
        """
        future: Future = Future()
        with self._cond:
            queued = not self._ended
            if queued:
                self._jobs.append((fn, future))
                self._cond.notify_all()
        if not queued:
            _run_job(fn, future)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"run {self.id!r}: the training thread did not reach a step boundary in "
                f"{timeout:g} s (is the training loop still calling step()?)"
            ) from None

    def pause(self) -> None:
        self._check_control("pause")
        with self._cond:
            self._paused = True
        self._changed()

    def resume(self) -> None:
        self._check_control("resume")
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        self._changed()

    def restart(self) -> None:
        """Start over (only runs created with ``on_restart``); also resumes a paused run."""
        if "restart" not in self.controls or self._on_restart is None:
            raise RunStateError(f"run {self.id!r} does not support restart")
        self._on_restart()
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        self._changed()

    def reset(self) -> None:
        """Forget the step counter and scalars (called by a restarting trainer)."""
        self.step_index = None
        self.scalars = {}
        self.scalars_seq += 1
        self.history.clear()
        self.error = None
        self._ended = False
        self._changed()

    def fail(self, exc: BaseException) -> None:
        """Mark the run ended by ``exc`` (its text is shown as ``error``)."""
        self.error = f"{type(exc).__name__}: {exc}"
        self.close()

    def close(self) -> None:
        """Mark the run ended; a paused training thread is released; queued jobs run here."""
        with self._cond:
            if self._ended:
                return
            self._ended = True
            self._paused = False
            jobs = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for fn, future in jobs:
            _run_job(fn, future)
        self._changed()

    def detach(self) -> None:
        """Remove the hook this run put on the model (when it leaves the registry)."""
        if self._seq_hook is not None:
            self._seq_hook.remove()

    def add_step_hook(self, hook: Callable[[Run], None]) -> None:
        """Call ``hook(run)`` in the training thread at the end of every :meth:`step`."""
        self._step_hooks = (*self._step_hooks, hook)

    def remove_step_hook(self, hook: Callable[[Run], None]) -> None:
        self._step_hooks = tuple(h for h in self._step_hooks if h != hook)

    def add_change_listener(self, listener: Callable[[Run], None]) -> None:
        """Call ``listener(run)`` (from any thread) when status or error changes."""
        self._change_listeners = (*self._change_listeners, listener)

    def remove_change_listener(self, listener: Callable[[Run], None]) -> None:
        self._change_listeners = tuple(x for x in self._change_listeners if x != listener)

    def _check_control(self, control: str) -> None:
        if control not in self.controls:
            raise RunStateError(f"run {self.id!r} does not support {control}")
        if self._ended:
            raise RunStateError(f"run {self.id!r} has ended; it cannot {control}")

    def _changed(self) -> None:
        for listener in self._change_listeners:
            try:
                listener(self)
            except Exception:  # a listener's bug must not stop training
                logger.exception("run change listener failed")

    def __repr__(self) -> str:
        return f"Run({self.id!r}, status={self.status}, step={self.step_index})"


def _run_job(fn: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)


class RunRegistry:
    """The runs a server knows, by id; thread-safe.

    Listeners added with :meth:`add_listener` are called (from any thread)
    when a run is added, removed or changes status.
    """

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._listeners: tuple[Callable[[], None], ...] = ()

    def add(self, run: Run) -> Run:
        with self._lock:
            if run.id in self._runs:
                raise ValueError(f"run id {run.id!r} is already registered")
            self._runs[run.id] = run
        run.add_change_listener(self._run_changed)
        self._notify()
        return run

    def remove(self, run_id: str) -> Run:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is None:
            raise UnknownRunError(run_id, self.ids())
        run.remove_change_listener(self._run_changed)
        run.detach()
        self._notify()
        return run

    def get(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None:
            raise UnknownRunError(run_id, self.ids())
        return run

    def ids(self) -> list[str]:
        return list(self._runs)

    def list(self) -> list[Run]:
        return list(self._runs.values())

    def unique_id(self, base: str) -> str:
        """``base`` or ``base-2``, ``base-3``... whichever is free."""
        candidate, n = base, 1
        while candidate in self._runs:
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        self._listeners = tuple(x for x in self._listeners if x != listener)

    def _run_changed(self, run: Run) -> None:
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                logger.exception("registry listener failed")


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Infinity: non-finite floats become null."""
    return value if math.isfinite(value) else None
