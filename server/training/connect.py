"""The training side of remote publishing: ``Dashboard.connect(model, url, run=...)``.

:class:`RemotePublisher` keeps, in the training process, exactly what a dashboard of
our own keeps there (:class:`~attnscope.training.link.TrainingLink`: the run, the stream
publisher's slicing, the history recorder's copies and probe passes); everything else
happens in a relay process of ours (:mod:`attnscope.backend.relay`), reached through
shared memory: computing frames and history records, the websocket to the server,
reconnection with backoff, capture answers. No thread of ours runs in the training
process, and it never touches the network:

- with nobody watching, the plan is empty: no listener on the model at all;
- when the server is unreachable or goes away the relay reconnects (0.25 s doubling to
  10 s) and, once back, sends the run's scalar history, so the server's copy continues
  where it stopped; frames wait in a bounded buffer there (``buffer_frames``; the oldest
  dropped: :attr:`RemotePublisher.dropped`);
- capture requests (``POST /api/v1/captures`` on the server) run in the training thread
  between two steps, as local ones do;
- when the server records history, this process records it as a local dashboard does,
  and the relay sends it (:mod:`attnscope.backend.remote.history`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import torch.nn as nn

from ..contract.wire import publish_url
from .run import Run
from .tokens import warn_step_after_close

logger = logging.getLogger(__name__)

BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0


class RunRefused(ValueError):
    """The server refused this run (its id belongs to another publisher, or a bad announce)."""


# Dashboard.connect waits this long for the server's first answer, to report a refusal.
FIRST_ANSWER_S = 3.0


class _Connected:
    """Whether the relay is connected to the server now (``is_set``, ``wait``), read from
    its latest ``link`` message."""

    def __init__(self, publisher: RemotePublisher) -> None:
        self._publisher = publisher

    def is_set(self) -> bool:
        self._publisher.poll()
        return self._publisher._state.get("connected", False)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


def browse_url(url: str, run_id: str) -> str:
    """The page of run ``run_id`` on the server at ``url``.

    >>> browse_url("http://host:8000/", "alice/lr3e-4")
    'http://host:8000/?run=alice/lr3e-4'
    """
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/",
                       urlencode({"run": run_id}, safe="/"), ""))


class RemotePublisher:
    """Publishes ``model`` as run ``run_id`` to the server at ``url``; see :meth:`step`.

    Same API as :class:`attnscope.Dashboard`: :meth:`step`, :meth:`close`, context manager.
    ``connected``, ``connections``, ``dropped``, ``history_dropped`` and ``refused`` say
    how the relay's connection fares (read from its reports; reading them is cheap).
    """

    def __init__(self, model: nn.Module, url: str, run_id: str, *, name: str | None = None,
                 token: str | None = None, config: dict[str, Any] | None = None,
                 buffer_frames: int = 256, symbols: Sequence[str] | None = None,
                 history: bool = True, max_overhead: float | None = 0.03,
                 idle_overhead: float | None = None, tokenizer: Any = None) -> None:
        from .link import TrainingLink, hello_message
        from .process import ChildProcess

        if buffer_frames < 1:
            raise ValueError(f"buffer_frames must be >= 1, got {buffer_frames}")
        self.url = url
        self.ws_url = publish_url(url)
        self.model = model
        self.run = Run(model, run_id=run_id, name=name or run_id, controls=(), symbols=symbols,
                       max_overhead=max_overhead, idle_overhead=idle_overhead,
                       tokenizer=tokenizer)
        self.config = dict(config or {})
        self.connected = _Connected(self)
        self._state: dict[str, Any] = {}
        self._closing = False
        self._link: TrainingLink | None = None
        boot = {"role": "relay", "url": url, "token": token, "buffer_frames": buffer_frames}

        def on_channel(channel: Any) -> None:
            if self._link is not None:  # a restarted relay
                self._link.reconnect(channel)
                self._link.handle(self._process.early)

        self._process = ChildProcess("attnscope.backend.relay", boot,
                                     lambda: hello_message(self.run, self.config, history),
                                     on_channel=on_channel)
        try:
            self._process.start()
        except BaseException:
            self.run.detach()
            raise
        assert self._process.channel is not None
        self._link = TrainingLink(self.run, self._process.channel, records_history=history)
        self._link.extra["link"] = self._on_link
        self._link.handle(self._process.early)
        # A refusal (the run id is another publisher's) is final: say so here. An
        # unreachable server is not: training goes on and the relay keeps trying.
        deadline = time.monotonic() + FIRST_ANSWER_S
        while not self._state and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.01)
        if self.refused is not None:
            refused = self.refused
            self.close(timeout=1.0)
            raise RunRefused(f"run {run_id!r}: the server at {url} refused it: {refused}")

    # -- what the relay reports ---------------------------------------------------------

    def _on_link(self, state: dict[str, Any]) -> None:
        """A ``link`` report from the relay: kept; a new connection error logged here too
        (the relay's own log is its stderr)."""
        error = state.get("error")
        if error and error != self._state.get("error"):
            logger.log(int(state.get("error_level") or logging.WARNING), "%s", error)
        self._state.update(state)

    def on_alert(self, callback: Any) -> Any:
        """As :meth:`attnscope.Dashboard.on_alert`: ``callback(alert)`` for each alert the
        team server raises on this run, in the training thread at its next step."""
        if self._link is not None:
            self._link.alert_callbacks.append(callback)
        return callback

    def poll(self) -> None:
        """Read the relay's reports (any thread; other messages wait for the next step)."""
        if self._link is not None:
            self._link.poll()

    @property
    def connections(self) -> int:
        """Successful connections so far (reconnections included)."""
        self.poll()
        return int(self._state.get("connections", 0))

    @property
    def dropped(self) -> int:
        """Frames dropped by the relay's outgoing buffer (the server was slow or away)."""
        self.poll()
        return int(self._state.get("dropped", 0))

    @property
    def history_dropped(self) -> int:
        """History records dropped because the server was away too long (bounded outbox)."""
        self.poll()
        return int(self._state.get("history_dropped", 0))

    @property
    def refused(self) -> str | None:
        """The server's reason when it refused the run (None: not refused)."""
        self.poll()
        return self._state.get("refused")

    # -- training thread -------------------------------------------------------

    def step(self, step: int, loss: Any = None, tokens: Any = None, **scalars: Any) -> None:
        """Mark the end of training step ``step`` (as :meth:`attnscope.Dashboard.step`). Never
        waits for the network. After :meth:`close` it does nothing (and warns once)."""
        if self._closing:
            warn_step_after_close(self)
            return
        self._process.check()
        self.run.step(step, loss=loss, tokens=tokens, **scalars)

    def new_sequence(self) -> None:
        """A new sequence starts (recurrent inference): as
        :meth:`attnscope.Dashboard.new_sequence`."""
        self.run.new_sequence()

    def close(self, timeout: float = 5.0) -> None:
        """Hand what is left to the relay, which sends it (up to ``timeout`` s) and tells
        the server the run ended."""
        if self._closing:
            return
        self._closing = True
        if self._link is not None:
            self._link.close()
        connected = self.connections
        self.run.close()
        self._process.stop(timeout)
        self.run.detach()
        if connected:  # the user needs to know where the run went
            print(f"attnscope: run {self.run.id!r} ended; it stays browsable at "
                  f"{browse_url(self.url, self.run.id)}", flush=True)

    def __enter__(self) -> RemotePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemotePublisher({self.url!r}, run={self.run.id!r})"


def select_rank(ranks: int | Sequence[int] | str) -> tuple[bool, int, int]:
    """(publish from this process?, rank, world size) under torchrun / DDP.

    ``ranks``: a rank, a list of ranks, or ``"all"``. Outside torch.distributed
    (and torchrun's ``RANK`` variable) the process is rank 0 of 1.
    """
    rank, world = 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    if ranks == "all":
        return True, rank, world
    if isinstance(ranks, str):
        raise ValueError(f"ranks must be a rank, a list of ranks or 'all', got {ranks!r}")
    chosen = {ranks} if isinstance(ranks, int) else set(ranks)
    return rank in chosen, rank, world


def rank_run_id(run_id: str, ranks: int | Sequence[int] | str, rank: int, world: int) -> str:
    """``run`` when one rank publishes, ``run/rank-N`` when several may.

    >>> rank_run_id("alice/lr3e-4", "all", 1, 2), rank_run_id("alice/lr3e-4", 0, 0, 2)
    ('alice/lr3e-4/rank-1', 'alice/lr3e-4')
    """
    several = ranks == "all" or (not isinstance(ranks, int) and len(set(ranks)) > 1)
    return f"{run_id}/rank-{rank}" if several else run_id


class SilentDashboard:
    """What a rank that does not publish gets: the same API, doing nothing."""

    run = None
    url = None

    def step(self, step: int, loss: Any = None, tokens: Any = None, **scalars: Any) -> None:
        """Nothing: this rank does not publish."""

    def new_sequence(self) -> None:
        """Nothing: this rank does not publish."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> SilentDashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
