"""The demo run: :class:`attnscope.demo.DemoTraining` in a background thread, as a :class:`Run`.

Controls: pause / resume (the training thread waits inside ``Run.step``),
restart (start over from the same seed; also revives a run that failed).
An exception in the training thread ends the run with its text as ``error``.
"""

from __future__ import annotations

import logging
import threading
import time

from transformer_core.events import EventDispatcher

from .demo import DemoConfig, DemoTraining
from .runs import Run

logger = logging.getLogger(__name__)


class DemoRun:
    """Owns the demo's training, its thread and its :class:`Run` (``self.run``)."""

    def __init__(self, config: DemoConfig | None = None, run_id: str = "demo",
                 max_rate: float | None = None) -> None:
        """``max_rate``: at most this many steps per second (None: as fast as possible).

        The demo converges in ~50 steps; paced, a viewer can watch the heads form.
        """
        if max_rate is not None and not max_rate > 0:
            raise ValueError(f"max_rate must be None or a positive number, got {max_rate!r}")
        self.config = config if config is not None else DemoConfig()
        self.period = 1.0 / max_rate if max_rate is not None else 0.0
        # A private dispatcher: nothing else in the process listens to the demo.
        self.dispatcher = EventDispatcher()
        self.training = DemoTraining(self.config, event_dispatcher=self.dispatcher)
        self.run = Run(
            self.training.model, run_id=run_id,
            name=f"demo: reverse {self.config.seq_len} symbols",
            controls=("pause", "resume", "restart"), on_restart=self._request_restart,
            symbols=self.training.task.symbols,
        )
        self.task = self.training.task
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._thread: threading.Thread | None = None

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

    def _request_restart(self) -> None:
        # Called from a server thread; the training thread resets between steps.
        if self.alive and self.run.status != "ended":
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
                self.run.step(result.step, loss=result.loss, tokens=result.tokens,
                              accuracy=result.accuracy)
        except Exception as exc:
            logger.exception("demo training failed")
            self.run.fail(exc)
