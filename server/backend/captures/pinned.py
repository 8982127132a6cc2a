"""Pinned inputs: one input (a text, or token ids) captured again every k steps of its run,
so the page can scrub how *that* input's heads evolve while the model trains.

:class:`PinnedCaptures` is started by the app's lifespan. Its thread looks at every pin's
run a few times a second (``run.status``, ``run.step_index``: what every kind of run
has) and takes a due capture through :func:`~attnscope.backend.captures.requests.create_capture`,
that is through ``BaseRun.capture``: a forward pass where the model is, between two of
its training steps, whatever the kind of run (in this process, a publisher's, or the
training process of a server process). One capture per run at a time.

Cost: each capture is a forward pass in the training process. A pin's next capture
waits for ``every`` more steps (default 50), at least ``min_interval_s`` (5 s), and long
enough that pinned captures take at most :data:`PINNED_SHARE` of the cost budget
(``max_overhead``): a capture's wall time (its wait for the step boundary included, so
an upper bound of the pass) over the time between two captures.

Pins and the ids of their captures are kept in ``pins.json`` beside the capture store's
index (written atomically), so they survive a restart of the server; each keeps at most
``keep`` captures, thinned as the history's snapshots are (the first and the newest
stay, older ones get sparser). Unpinning deletes its captures.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ...core.run_base import RunRegistry, UnknownRunError
from ...core.storage import fsync_dir
from ..history.thinning import thinning_victim
from .models import CaptureCreate
from .requests import CaptureLimits, CaptureRejected, check_input, create_capture
from .store import CaptureStore

logger = logging.getLogger(__name__)

# Pinned captures may take a third of the dashboard's cost budget (1 % of training time
# at the default 3 %): the rest is the stream's and the history's.
PINNED_SHARE = 1 / 3
# How often the thread looks at the runs: a step boundary is what a capture waits for
# anyway; this only adds up to 0.25 s to "every k steps".
TICK_S = 0.25
# Captures deleted behind the pins' back (DELETE /runs/{id}) are noticed this often.
PRUNE_S = 10.0
# Statuses of a failed capture worth trying again at the next due point: the run ended
# or its publisher is away (409), it failed there (502), no step came in time (503), the
# store is full until someone deletes captures (507). Others are the input's fault.
TRANSIENT = (409, 502, 503, 507)
PINS_FILE = "pins.json"

State = Literal["waiting", "capturing", "paused", "ended", "failed"]


class PinError(Exception):
    """A pin request that cannot be done: ``status`` (HTTP) and a ``detail`` for the client."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class PinnedCapture:
    """One capture of a pin: the stored capture's id, the step it ran after, when."""

    id: str
    step: int | None
    created: str  # ISO 8601
    seq: int  # 0, 1, 2...: its place among all the pin's captures (thinning uses it)


@dataclass
class Pin:
    """An input captured every ``every`` steps of run ``run``. ``text`` or ``tokens``."""

    id: str
    run: str
    text: str | None
    tokens: list[int] | None
    every: int
    name: str | None
    created: str
    captures: list[PinnedCapture] = field(default_factory=list)
    taken: int = 0  # captures taken so far (kept or thinned)
    base_step: int | None = None  # the step of the last attempt: the next is due k after it
    last_end: float = 0.0  # time.time() at the end of the last attempt
    cost_s: float = 0.0  # the last attempt's wall time
    error: str | None = None  # the last attempt's failure, for the page
    error_status: int | None = None
    failed: bool = False  # the input itself was refused: no more attempts
    capturing: bool = False

    def request(self) -> CaptureCreate:
        """The capture request of this pin (attention only: pins are kept many times)."""
        name = self.name or f"pin: {(self.text or ' '.join(map(str, self.tokens or [])))[:80]}"
        given = {"text": self.text} if self.text is not None else {"tokens": [self.tokens]}
        return CaptureCreate(run=self.run, kinds=["attention"], name=name[:200], **given)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["capturing"]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pin:
        data = dict(data)
        captures = [PinnedCapture(**c) for c in data.pop("captures", [])]
        known = {f for f in cls.__dataclass_fields__ if f != "captures"}
        return cls(**{k: v for k, v in data.items() if k in known}, captures=captures)


class PinnedCaptures:
    """The pins of a server's runs and the thread that captures them (see the module
    docstring). Thread-safe; :meth:`start` and :meth:`close` from the app's lifespan.

    ``clock`` is ``time.time`` (injected so tests can move time on)."""

    def __init__(self, registry: RunRegistry, store: CaptureStore, limits: CaptureLimits,
                 *, every: int, min_interval_s: float, keep: int, max_per_run: int,
                 max_overhead: float, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.store = store
        self.limits = limits
        self.every = every
        self.min_interval_s = min_interval_s
        self.keep = keep
        self.max_per_run = max_per_run
        self.share = max_overhead * PINNED_SHARE
        self.clock = clock
        self.path = Path(store.root) / PINS_FILE
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._pins: dict[str, Pin] = {}
        self._busy: set[str] = set()  # runs with a capture in flight
        self._closed = False
        self._thread: threading.Thread | None = None
        self._load()

    @classmethod
    def from_settings(cls, registry: RunRegistry, store: CaptureStore, settings: Any,
                      clock: Callable[[], float] = time.time) -> PinnedCaptures:
        """With the server's settings (``pinned_*``, ``max_overhead``, ``captures_*``)."""
        return cls(registry, store, CaptureLimits.from_settings(settings),
                   every=settings.pinned_every, min_interval_s=settings.pinned_min_interval_s,
                   keep=settings.pinned_keep, max_per_run=settings.pinned_max_per_run,
                   max_overhead=settings.max_overhead, clock=clock)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> PinnedCaptures:
        self._thread = threading.Thread(target=self._loop, name="attnscope-pins", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (a capture in flight finishes on its own; its result is kept)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- what the routes call ------------------------------------------------------

    def add(self, run_id: str, *, text: str | None = None, tokens: list[int] | None = None,
            every: int | None = None, name: str | None = None) -> Pin:
        """Pin an input of run ``run_id``; its first capture is taken at once (at the run's
        next step boundary). Raises :class:`PinError` (unknown run, too many pins) or
        :class:`CaptureRejected` (the input does not fit the run's model)."""
        run = self._run(run_id)
        pin = Pin(id=uuid.uuid4().hex, run=run_id, text=text, tokens=tokens,
                  every=every or self.every, name=name,
                  created=datetime.now(UTC).isoformat().replace("+00:00", "Z"))
        check_input(pin.request(), run, self.limits)
        with self._wake:
            held = sum(1 for p in self._pins.values() if p.run == run_id)
            if held >= self.max_per_run:
                raise PinError(409, f"run {run_id!r} has {held} pinned inputs, the most it may "
                                    f"have (ATTNSCOPE_PINNED_MAX_PER_RUN): unpin one first")
            self._pins[pin.id] = pin
            self._save()
            self._wake.notify_all()
        return pin

    def get(self, pin_id: str) -> Pin:
        with self._lock:
            pin = self._pins.get(pin_id)
        if pin is None:
            raise PinError(404, f"no pinned input with id {pin_id!r}")
        return pin

    def list(self, run_id: str | None = None) -> list[Pin]:
        """Pins (of one run), oldest first."""
        with self._lock:
            return [p for p in self._pins.values() if run_id is None or p.run == run_id]

    def update(self, pin_id: str, every: int) -> Pin:
        """Capture pin ``pin_id`` every ``every`` steps from now on (a failed pin tries again)."""
        with self._wake:
            pin = self.get(pin_id)
            pin.every = every
            pin.failed = False
            self._save()
            self._wake.notify_all()
        return pin

    def remove(self, pin_id: str) -> None:
        """Unpin: forget the pin and delete its captures."""
        with self._lock:
            pin = self._pins.pop(pin_id, None)
            if pin is None:
                raise PinError(404, f"no pinned input with id {pin_id!r}")
            self._save()
        for capture in pin.captures:
            self.store.delete(capture.id)

    def state(self, pin: Pin) -> tuple[State, int | None, float | None, str]:
        """What the page says of ``pin``: its state, the step after which its next capture
        is due, the time before which it is not, and that as a sentence."""
        try:
            run = self.registry.get(pin.run)
        except UnknownRunError:
            return "ended", None, None, f"run {pin.run!r} is gone: no more captures"
        if run.status == "ended":  # a capture still in flight is kept
            return "ended", None, None, "the run has ended: no more captures"
        if pin.capturing:
            return "capturing", None, None, "capturing at the run's next step boundary…"
        if pin.failed:
            return "failed", None, None, f"stopped: {pin.error}"
        if run.status in ("paused", "idle"):
            return "paused", None, None, f"the run is {run.status}: captures resume with it"
        next_step, not_before = self._next(pin)
        if next_step is None:
            return "waiting", None, None, "first capture at the run's next step boundary"
        wait = None if not_before is None else max(0.0, not_before - self.clock())
        later = f", not before {wait:.0f} s from now" if wait is not None and wait >= 1 else ""
        return "waiting", next_step, not_before, f"next capture after step {next_step}{later}"

    # -- the thread ------------------------------------------------------------------

    def _loop(self) -> None:
        pruned = self.clock()
        while True:
            if self.clock() - pruned > PRUNE_S:
                pruned = self.clock()
                self.prune()
            with self._wake:
                if self._closed:
                    return
                due = [p for p in self._pins.values() if p.run not in self._busy and self._due(p)]
                for pin in due:
                    if pin.run in self._busy:
                        continue  # two pins of one run: one at a time
                    self._busy.add(pin.run)
                    pin.capturing = True
                    threading.Thread(target=self._take, args=(pin,), daemon=True,
                                     name=f"attnscope-pin-{pin.id[:8]}").start()
                self._wake.wait(TICK_S)

    def _next(self, pin: Pin) -> tuple[int | None, float | None]:
        """The step after which, and the time before which, the next capture is not due
        (None, None: the first capture, due at once)."""
        if pin.base_step is None and not pin.last_end:
            return None, None
        spacing = max(self.min_interval_s, pin.cost_s / self.share if self.share else 0.0)
        base = -1 if pin.base_step is None else pin.base_step
        return base + pin.every, pin.last_end + spacing

    def _due(self, pin: Pin) -> bool:
        if pin.failed or pin.capturing:
            return False
        try:
            run = self.registry.get(pin.run)
        except UnknownRunError:
            return False
        if run.status != "live":
            return False
        next_step, not_before = self._next(pin)
        if next_step is None:
            return True
        step = run.step_index
        if step is None or (not_before is not None and self.clock() < not_before):
            return False
        restarted = pin.base_step is not None and step < pin.base_step
        return step >= next_step or restarted

    def _take(self, pin: Pin) -> None:
        """One capture of ``pin`` (its own thread: it may wait for a step boundary)."""
        started = self.clock()
        record, error, status = None, None, None
        try:
            run = self._run(pin.run)
            record = create_capture(pin.request(), run, self.store, self.limits,
                                    {"pin": pin.id})
        except (CaptureRejected, PinError) as exc:
            error = exc.message if isinstance(exc, CaptureRejected) else str(exc.detail)
            status = exc.status
        except Exception as exc:  # a bug must not stop the other pins
            logger.exception("pinned capture of run %r failed", pin.run)
            error, status = f"{type(exc).__name__}: {exc}", 500
        ended = self.clock()
        with self._wake:
            pin.capturing = False
            self._busy.discard(pin.run)
            pin.last_end, pin.cost_s = ended, ended - started
            if record is not None:
                step = record.meta.get("step")
                pin.base_step = step if step is not None else pin.base_step
                pin.captures.append(PinnedCapture(record.id, step, record.created.isoformat(),
                                                  pin.taken))
                pin.taken += 1
                pin.error = pin.error_status = None
            else:
                pin.error, pin.error_status = error, status
                pin.failed = status not in TRANSIENT
                run_step = self._step_of(pin.run)
                pin.base_step = run_step if run_step is not None else pin.base_step
                logger.info("pinned capture of run %r: %s (%s)", pin.run, error, status)
            gone = self._thin(pin) if pin.id in self._pins else []
            if record is not None and pin.id not in self._pins:  # unpinned meanwhile
                gone.append(record.id)
            self._save()
            self._wake.notify_all()
        for capture_id in gone:
            self.store.delete(capture_id)

    def _thin(self, pin: Pin) -> list[str]:
        """Drop captures past ``keep`` (see :func:`thinning_victim`); their ids to delete."""
        gone = []
        while len(pin.captures) > self.keep:
            victim = pin.captures.pop(thinning_victim([c.seq for c in pin.captures]))
            gone.append(victim.id)
        return gone

    def _run(self, run_id: str) -> Any:
        try:
            return self.registry.get(run_id)
        except UnknownRunError as exc:
            raise PinError(422, [{"loc": ["body", "run"], "msg": exc.message,
                                  "type": "value_error"}]) from None

    def _step_of(self, run_id: str) -> int | None:
        try:
            return self.registry.get(run_id).step_index
        except UnknownRunError:
            return None

    # -- pins.json ---------------------------------------------------------------------

    def _load(self) -> None:
        """Pins of an earlier server on this store; captures deleted meanwhile are dropped."""
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.warning("pinned inputs: cannot read %s (%s); starting without pins",
                           self.path, exc)
            return
        for data in saved.get("pins", []):
            try:
                pin = Pin.from_json(data)
            except (TypeError, ValueError) as exc:
                logger.warning("pinned inputs: skipped a pin of %s (%s)", self.path, exc)
                continue
            pin.captures = [c for c in pin.captures if self.store.get(c.id) is not None]
            self._pins[pin.id] = pin

    def _save(self) -> None:
        """Write pins.json atomically (caller holds the lock)."""
        tmp = self.path.with_suffix(".json.tmp")
        text = json.dumps({"version": 1, "pins": [p.to_json() for p in self._pins.values()]})
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def prune(self) -> None:
        """Forget captures deleted behind the pins' back (``DELETE /runs/{id}`` deletes a
        run's captures) and pins of runs that are gone with all their captures."""
        with self._lock:
            changed = False
            for pin in list(self._pins.values()):
                kept = [c for c in pin.captures if self.store.get(c.id) is not None]
                changed |= len(kept) != len(pin.captures)
                pin.captures = kept
                if not kept and pin.run not in self.registry.ids() and not pin.capturing:
                    del self._pins[pin.id]
                    changed = True
            if changed:
                self._save()

