"""What every run has, local or remote, and the registry of a server's runs.

:class:`BaseRun` is the one interface the hub, the history and the captures use:
identity, the model's :class:`~attnscope.contract.layout.ModelLayout`, status, the step
counter, scalars and their history, token labels, listeners and the summary
(docs/protocol.md's RunSummary). What differs by where the model is, each kind of
run implements:

- :class:`attnscope.training.run.Run` (training side): the model is in this process; the
  training thread calls ``step()``, which pauses and runs jobs between steps;
- :class:`attnscope.backend.remote.run.RemoteRun` (web side): the model is in a publisher's
  process (``Dashboard.connect``); steps, frames and captures arrive over a websocket.

>>> from attnscope.contract.layout import ModelLayout, SiteLayout
>>> run = BaseRun("toy", ModelLayout(sites=(SiteLayout(0, "attn", heads=2),)))
>>> run.record_step(3, {"loss": 0.5}, time_=1.0)
>>> run.status, run.step_index, run.summary()["model"]["heads"]
('live', 3, 2)
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from ..contract.layout import ModelLayout, SiteLayout
from ..contract.plan import Capture, Plan, SlotKey
from .jsonsafe import finite_or_none

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..training.recorder import RecorderSink, RunRecorder

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

    @classmethod
    def from_dict(cls, history: dict[str, Any], max_points: int = 2048) -> ScalarHistory:
        """The inverse of :meth:`to_dict` (nulls dropped)."""
        out = cls(max_points)
        values = history.get("values", {})
        for i, (step, t) in enumerate(zip(history.get("steps", []), history.get("time", []),
                                          strict=False)):
            point = {name: float(v[i]) for name, v in values.items()
                     if i < len(v) and v[i] is not None}
            out.append(int(step), float(t), point)
        return out


class StreamSource(Protocol):
    """What the hub reads a watched run's frames from (one per watched run): the
    in-process :class:`~attnscope.training.stream.StreamTap` of a local run, or the
    :class:`~attnscope.backend.remote.run.RemoteStream` of a remote one."""

    run: Any
    slots: dict[SlotKey, Capture]

    @property
    def plan(self) -> Plan: ...

    def set_plan(self, plan: Plan) -> None: ...

    def flush_stale(self, max_age: float) -> None: ...

    def close(self) -> None: ...


class BaseRun:
    """What every run has (see the module docstring); ``Run`` and ``RemoteRun`` add
    where their model is. Read from any thread; written by whoever feeds the run."""

    #: A remote run's history inbox while its publisher records (remote.history); None here.
    history_inbox: Any = None
    #: The dashboard's cost budget where the model trains in this process (a local run's
    #: :class:`attnscope.training.budget.Budget`); None here.
    budget: Any = None

    def __init__(self, run_id: str, layout: ModelLayout, *, name: str | None = None,
                 controls: Sequence[str] = (), symbols: Sequence[str] | None = None) -> None:
        unknown = set(controls) - set(CONTROLS)
        if unknown:
            raise ValueError(f"controls: unknown {sorted(unknown)}; allowed: {list(CONTROLS)}")
        self.id = run_id
        self.name = name or run_id
        self.layout = layout
        self.controls = tuple(c for c in CONTROLS if c in controls)
        self.started = datetime.now(UTC)
        self.error: str | None = None
        self.step_index: int | None = None  # the last step marked
        self.scalars: dict[str, float] = {}
        self.scalars_time = 0.0
        self.scalars_seq = 0  # bumped by every step; senders compare it
        self.history = ScalarHistory()
        self.seq_len: int | None = None
        self.batch_size: int | None = None
        self.symbols = None if symbols is None else [str(s) for s in symbols]
        # A local run's Hugging Face tokenizer (attnscope.core.model_inputs.TextTokenizer), for
        # token labels and text captures; remote runs label through ``symbols``.
        self.tokenizer: Any = None
        self._ended = False
        self._lock = threading.Lock()
        self._step_hooks: tuple[Callable[[Any], None], ...] = ()
        self._change_listeners: tuple[Callable[[Any], None], ...] = ()

    # -- read side ---------------------------------------------------------

    @property
    def status(self) -> Status:
        return "ended" if self._ended else "live"

    @property
    def sites(self) -> tuple[SiteLayout, ...]:
        """The run's attention sites (its "layers"): ``self.layout.sites``."""
        return self.layout.sites

    def model_summary(self) -> dict[str, Any]:
        """layers, heads, attention_type, d_model, seq_len (and per-layer details)."""
        return self.layout.summary(self.seq_len)

    def summary(self) -> dict[str, Any]:
        """The RunSummary of docs/protocol.md."""
        return {
            "id": self.id, "name": self.name, "status": self.status, "step": self.step_index,
            "started": self.started.isoformat().replace("+00:00", "Z"), "error": self.error,
            "controls": list(self.controls), "model": self.model_summary(),
            "budget": None if self.budget is None else self.budget.status(),
        }

    def labels(self, sample: int) -> list[str] | None:
        """Token labels of ``sample`` of the last batch, or None (none known here)."""
        return None

    # -- what each kind of run implements ------------------------------------

    def open_stream(self, notify: Callable[[str], None]) -> StreamSource:
        """A new source of this run's frames for the hub; ``notify(run_id)`` when it has
        new captures (from any thread)."""
        raise NotImplementedError

    def capture_layout(self) -> ModelLayout | None:
        """The layout captures check requests against; None when this run cannot capture."""
        return self.layout

    def capture(self, inputs: torch.Tensor, kinds: list[str], layers: list[int],
                heads: list[int] | None, max_bytes: int,
                timeout: float) -> tuple[dict[str, np.ndarray], int | None]:
        """One forward pass on ``inputs`` (N, L) ids or (N, L, d_model) features, where
        the model is, between two training steps: (name -> array, the step it ran after).
        Raises what :func:`~attnscope.core.capture.run_capture` raises,
        ``TimeoutError`` and :class:`RunStateError`."""
        raise RunStateError(f"run {self.id!r} has no model to capture from")

    def new_recorder(self, sink: RecorderSink) -> RunRecorder | None:
        """A history recorder of this run into ``sink``, or None where the run is
        recorded elsewhere (a remote run: by its publisher, into its inbox)."""
        return None

    # -- state changes ---------------------------------------------------------

    def record_step(self, step: int, values: dict[str, float], time_: float) -> None:
        """Step ``step`` happened at ``time_`` with scalars ``values``."""
        self.step_index = int(step)
        self.scalars = values
        self.scalars_time = time_
        self.scalars_seq += 1
        if values:
            self.history.append(self.step_index, time_, values)

    def pause(self) -> None:
        self._check_control("pause")

    def resume(self) -> None:
        self._check_control("resume")

    def restart(self) -> None:
        raise RunStateError(f"run {self.id!r} does not support restart")

    def reset(self) -> None:
        """Forget the step counter and scalars (a run starting over)."""
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
        """Mark the run ended."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._changed()

    def detach(self) -> None:
        """Remove what this run hooked into a model (when it leaves the registry)."""

    # -- listeners -------------------------------------------------------------

    def add_step_hook(self, hook: Callable[[Any], None]) -> None:
        """Call ``hook(run)`` in the thread that feeds the run, after every step."""
        self._step_hooks = (*self._step_hooks, hook)

    def remove_step_hook(self, hook: Callable[[Any], None]) -> None:
        self._step_hooks = tuple(h for h in self._step_hooks if h != hook)

    def add_change_listener(self, listener: Callable[[Any], None]) -> None:
        """Call ``listener(run)`` (from any thread) when status or error changes."""
        self._change_listeners = (*self._change_listeners, listener)

    def remove_change_listener(self, listener: Callable[[Any], None]) -> None:
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
        return f"{type(self).__name__}({self.id!r}, status={self.status}, step={self.step_index})"


class RunRegistry:
    """The runs a server knows, by id; thread-safe.

    Listeners added with :meth:`add_listener` are called (from any thread)
    when a run is added, removed or changes status.
    """

    def __init__(self) -> None:
        self._runs: dict[str, BaseRun] = {}
        self._lock = threading.Lock()
        self._listeners: tuple[Callable[[], None], ...] = ()

    def add(self, run: Any) -> Any:
        with self._lock:
            if run.id in self._runs:
                raise ValueError(f"run id {run.id!r} is already registered")
            self._runs[run.id] = run
        run.add_change_listener(self._run_changed)
        self._notify()
        return run

    def remove(self, run_id: str) -> BaseRun:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is None:
            raise UnknownRunError(run_id, self.ids())
        run.remove_change_listener(self._run_changed)
        run.detach()
        self._notify()
        return run

    def get(self, run_id: str) -> Any:
        run = self._runs.get(run_id)
        if run is None:
            raise UnknownRunError(run_id, self.ids())
        return run

    def ids(self) -> list[str]:
        return list(self._runs)

    def list(self) -> list[Any]:
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

    def _run_changed(self, run: BaseRun) -> None:
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                logger.exception("registry listener failed")
