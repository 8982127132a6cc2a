"""The demo run: :class:`attnscope.training.demo.DemoTraining` in a background thread, as a
:class:`Run`.

Controls: pause / resume (the training thread waits inside ``Run.step``),
restart (start over from the same seed; also revives a run that failed).
An exception in the training thread ends the run with its text as ``error``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from transformer_core.events import EventDispatcher

from .collapse import CollapseConfig, CollapseStep, CollapseTraining
from .demo import DemoConfig, DemoTraining
from .induction import InductionConfig, InductionStep, InductionTraining
from .run import Run

logger = logging.getLogger(__name__)

TASKS = ("reverse", "induction", "collapse")


class DemoRun:
    """Owns the demo's training, its thread and its :class:`Run` (``self.run``)."""

    def __init__(self, config: DemoConfig | InductionConfig | CollapseConfig | None = None,
                 run_id: str = "demo", max_rate: float | None = None,
                 task: str = "reverse", max_overhead: float | None = None,
                 idle_overhead: float | None = None) -> None:
        """``max_rate``: at most this many steps per second (None: as fast as possible).
        ``task``: ``reverse`` (:mod:`attnscope.training.demo`), ``induction``
        (:mod:`attnscope.training.induction`)
        or ``collapse`` (:mod:`attnscope.training.collapse`).
        ``max_overhead``: the run's cost budget (:mod:`attnscope.training.budget`; None:
        measured only); ``idle_overhead``: the budget while nobody watches.

        The reversal demo converges in ~50 steps; paced, a viewer can watch the heads form.
        """
        if max_rate is not None and not max_rate > 0:
            raise ValueError(f"max_rate must be None or a positive number, got {max_rate!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        self.task_name = task
        self.period = 1.0 / max_rate if max_rate is not None else 0.0
        # A private dispatcher: nothing else in the process listens to the demo.
        self.dispatcher = EventDispatcher()
        self.training: DemoTraining | InductionTraining | CollapseTraining
        if task == "collapse":
            self.config = config if config is not None else CollapseConfig()
            self.training = CollapseTraining(self.config, event_dispatcher=self.dispatcher)
            name = (f"demo: entropy collapse ({self.config.n_layers} layers x "
                    f"{self.config.n_heads} heads, rising learning rate)")
        elif task == "induction":
            self.config = config if config is not None else InductionConfig()
            self.training = InductionTraining(self.config, event_dispatcher=self.dispatcher)
            name = (f"demo: induction heads ({self.config.n_layers} layers x "
                    f"{self.config.n_heads} heads, attention only)")
        else:
            self.config = config if config is not None else DemoConfig()
            self.training = DemoTraining(self.config, event_dispatcher=self.dispatcher)
            name = f"demo: reverse {self.config.seq_len} symbols"
        self.run = Run(
            self.training.model, run_id=run_id,
            name=name,
            controls=("pause", "resume", "restart"), on_restart=self._request_restart,
            symbols=self.training.task.symbols, max_overhead=max_overhead,
            idle_overhead=idle_overhead,
        )
        self.task = self.training.task
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._thread: threading.Thread | None = None
        self._here = False  # training in the caller's thread (train_here)
        self._after_step: Callable[[], None] | None = None
        # How a step is marked: the run's own step(), or a dashboard's (train_here).
        self.mark: Callable[..., None] = self.run.step

    @property
    def model(self):
        return self.training.model

    def start(self) -> DemoRun:
        self._stop.clear()
        self._thread = threading.Thread(target=self._train, name="attnscope-demo", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop training (unblocking a pause) and wait for the thread."""
        self._stop.set()
        self.run.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def train_here(self, mark: Callable[..., None] | None = None,
                   after_step: Callable[[], None] | None = None) -> None:
        """Train in the calling thread until :meth:`close` (from another thread or a signal
        handler) or an exception; ``mark(step, loss=..., tokens=..., **scalars)`` marks each
        step (a dashboard's ``step``), then ``after_step()`` runs."""
        self._here = True
        self.mark = mark or self.run.step
        self._after_step = after_step
        self._stop.clear()
        try:
            self._train()
        finally:
            self._here = False

    def _request_restart(self) -> None:
        # Called from a server thread (or, training here, at a step); the training loop
        # resets between steps.
        if (self.alive or self._here) and self.run.status != "ended":
            self._restart.set()
            return
        if self._stop.is_set():
            return
        self.training.reset()
        self.run.reset()
        self.start()

    def _train(self) -> None:
        logger.info("demo training started on %s", self.training.device)
        try:
            deadline = time.monotonic()  # when the next step may start
            while not self._stop.is_set():
                if self.period:
                    delay = deadline - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        break
                    deadline = max(deadline, time.monotonic()) + self.period
                if self._restart.is_set():
                    self._restart.clear()
                    self.training.reset()
                    self.run.reset()
                result = self.training.step()
                extra = {"repeat_loss": result.repeat_loss} \
                    if isinstance(result, InductionStep) else \
                    {"lr": result.lr} if isinstance(result, CollapseStep) else {}
                self.mark(result.step, loss=result.loss, tokens=result.tokens,
                          accuracy=result.accuracy, **extra)
                if self._after_step is not None:
                    self._after_step()
        except Exception as exc:
            logger.exception("demo training failed")
            self.run.fail(exc)
