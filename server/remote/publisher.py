"""The training side of remote publishing: ``Dashboard.connect(model, url, run=...)``.

:class:`RemotePublisher` keeps a local :class:`~attnscope.runs.Run` of the model and a
stream :class:`~attnscope.stream.publisher.Publisher` on it, exactly as an in-process
dashboard does; only the plan comes from the server (what the run's viewers
subscribe to right now) and the captures leave over one websocket, from a
background thread. The training thread never touches the network:

- captures wait in a bounded buffer (``buffer_frames``); when it is full the
  oldest is dropped (:attr:`RemotePublisher.dropped` counts them);
- with nobody watching, the plan is empty: no listener on the model at all;
- when the server is unreachable or goes away the thread reconnects with
  exponential backoff (0.25 s doubling to 10 s) and, once back, sends the run's
  scalar history, so the server's copy continues where it stopped;
- capture requests (``POST /api/v1/captures`` on the server) run in the training
  thread between two steps, as local ones do; their results are encoded and
  sent from the background (:mod:`attnscope.remote.captures`);
- when the server records history, the run's history is recorded here, as the
  server records a local run's, and sent from the background
  (:mod:`attnscope.remote.history`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import torch.nn as nn
import websockets

from ..history.recorder import RunRecorder
from ..jsonsafe import json_safe
from ..runs import Run
from ..stream.publisher import EMPTY_PLAN, Publisher
from ..stream.stats import valid_key_counts
from ..tokens import warn_step_after_close
from .captures import answer_capture, model_info_message
from .history import HistoryOutbox, config_from_message
from .wire import WIRE_VERSION, encode_capture, plan_from_message

logger = logging.getLogger(__name__)

BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0
# At most this many steps wait to be sent (about a minute of a fast loop); the scalar
# history sent on reconnection covers anything dropped.
MAX_PENDING_STEPS = 4096
# Steps (their scalars) leave in batches at most this often: waking the sending thread
# at every step of a fast loop costs the training thread more than the steps weigh.
STEPS_PERIOD_S = 0.1


class RunRefused(ValueError):
    """The server refused this run (its id belongs to another publisher, or a bad announce)."""


# Dashboard.connect waits this long for the server's first answer, to report a refusal.
FIRST_ANSWER_S = 3.0


def publish_url(url: str) -> str:
    """``http://host:8000`` -> ``ws://host:8000/ws/publish`` (https -> wss).

    >>> publish_url("https://dash.example.org/prefix/")
    'wss://dash.example.org/prefix/ws/publish'
    """
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"url: expected http(s)://host:port, got {url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/publish", "", ""))


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
    """

    def __init__(self, model: nn.Module, url: str, run_id: str, *, name: str | None = None,
                 token: str | None = None, config: dict[str, Any] | None = None,
                 buffer_frames: int = 256, symbols: Sequence[str] | None = None,
                 history: bool = True, max_overhead: float | None = 0.03,
                 tokenizer: Any = None) -> None:
        if buffer_frames < 1:
            raise ValueError(f"buffer_frames must be >= 1, got {buffer_frames}")
        self.url = url
        self.ws_url = publish_url(url)
        self.model = model
        self.run = Run(model, run_id=run_id, name=name or run_id, controls=(), symbols=symbols,
                       max_overhead=max_overhead, tokenizer=tokenizer)
        self._model_info = model_info_message(self.run.layout, self.run.symbols,
                                              self.run.tokenizer)
        self.config = dict(config or {})
        self._token = token
        self._publisher = Publisher(self.run, self._wake)
        self._frames: deque[bytes] = deque(maxlen=buffer_frames)
        self._steps: deque[list[Any]] = deque(maxlen=MAX_PENDING_STEPS)
        self._answers: deque[bytes | str] = deque()  # capture results: never dropped
        self._sent: dict[Any, int] = {}
        self.dropped = 0
        self.refused: str | None = None  # the server's reason when it refused the run
        self._secret: str | None = None  # from the first welcome: proves the run is ours
        self.connected = threading.Event()
        self.connections = 0  # successful connections so far (reconnections included)
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._wake_pending = False
        self._steps_sent = 0.0  # the event loop's time of the last steps batch
        # History: what the server's welcome asked for (None: none); the recorder and its
        # outbox are made and removed in the training thread, at a step boundary.
        self._history_wanted: dict[str, Any] | None = None
        self._record_history = history  # False: never, whatever the server records
        self._history: HistoryOutbox | None = None
        self._recorder: RunRecorder | None = None
        self._ready = threading.Event()
        self._answered = threading.Event()  # the first connection attempt has an outcome
        self.run.add_step_hook(self._on_step)
        self._thread = threading.Thread(target=self._main, name=f"attnscope-publish-{run_id}",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(5)
        # A refusal (the run id is another publisher's) is final: say so here. An
        # unreachable server is not: training goes on and the thread keeps trying.
        self._answered.wait(FIRST_ANSWER_S)
        if self.refused is not None:
            self.close(timeout=1.0)
            raise RunRefused(f"run {run_id!r}: the server at {url} refused it: {self.refused}")

    # -- training thread -------------------------------------------------------

    def step(self, step: int, loss: Any = None, tokens: Any = None, **scalars: Any) -> None:
        """Mark the end of training step ``step`` (as :meth:`attnscope.Dashboard.step`). Never
        waits for the network. After :meth:`close` it does nothing (and warns once)."""
        if self._closing:
            warn_step_after_close(self)
            return
        self.run.step(step, loss=loss, tokens=tokens, **scalars)

    def new_sequence(self) -> None:
        """A new sequence starts (recurrent inference): as
        :meth:`attnscope.Dashboard.new_sequence`."""
        self.run.new_sequence()

    def _on_step(self, run: Run) -> None:
        self._follow_history_plan()
        if not self.connected.is_set():
            return  # the history sent on reconnection has it
        scalars = json_safe(run.scalars)  # JSON: NaN -> null
        self._steps.append([run.step_index, run.scalars_time, scalars, run.batch_size,
                            run.seq_len])
        if len(self._steps) == 1:  # the first of a batch: the send loop sends it in time
            self._wake()

    def _follow_history_plan(self) -> None:
        """Start or stop recording history as the server asked (training thread)."""
        wanted = self._history_wanted
        if wanted is not None and self._recorder is None:
            self._history = HistoryOutbox(*config_from_message(wanted))
            self._recorder = RunRecorder(self.run, self._history)
        elif wanted is None and self._recorder is not None:
            self._recorder.detach()
            self._recorder = None

    @property
    def history_dropped(self) -> int:
        """History records dropped because the server was away too long (bounded outbox)."""
        return 0 if self._history is None else self._history.dropped

    def _wake(self, run_id: str | None = None) -> None:
        loop, event = self._loop, self._event
        if loop is None or event is None or self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # loop closed
            loop.call_soon_threadsafe(event.set)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (up to ``timeout`` s), tell the server the run ended, stop."""
        if self._closing:
            return
        self._closing = True
        self._wake_pending = False
        self._wake()
        self._thread.join(timeout)
        if self.connections:  # the user needs to know where the run went
            print(f"attnscope: run {self.run.id!r} ended; it stays browsable at "
                  f"{browse_url(self.url, self.run.id)}", flush=True)
        self._publisher.close()
        self.run.close()
        self.run.detach()
        if self._recorder is not None:
            self._recorder.detach()

    def __enter__(self) -> RemotePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemotePublisher({self.url!r}, run={self.run.id!r})"

    # -- background thread -------------------------------------------------------

    def _main(self) -> None:
        asyncio.run(self._connect_loop())

    async def _connect_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._ready.set()
        backoff = BACKOFF_START_S
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        while not self._closing:
            try:
                async with websockets.connect(self.ws_url, additional_headers=headers,
                                              open_timeout=5, max_size=None,
                                              compression=None) as ws:
                    backoff = BACKOFF_START_S
                    await self._session(ws)
            except websockets.InvalidStatus as exc:
                status = exc.response.status_code
                level = logging.ERROR if status in (401, 403) else logging.WARNING
                logger.log(level, "attnscope server at %s refused the publisher (HTTP %s)%s",
                           self.url, status, ": check the token" if status == 401 else "")
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                logger.info("publisher for run %r: %s; retrying in %.2g s", self.run.id,
                            exc, backoff)
            finally:
                self._answered.set()
                self._disconnected()
            if self._closing:
                break
            await self._sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or less if close() is called."""
        assert self._event is not None
        deadline = asyncio.get_running_loop().time() + seconds
        while not self._closing:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self._event.clear()
            self._wake_pending = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), remaining)

    def _disconnected(self) -> None:
        self.connected.clear()
        self._publisher.set_plan(EMPTY_PLAN)  # nobody to send to: stop capturing
        self._frames.clear()
        self._steps.clear()
        self._answers.clear()  # the server failed those requests when the link dropped

    def _announce(self) -> str:
        model = self.run.model_summary()
        for site, layer in zip(self.run.sites, model["layer_details"], strict=True):
            layer["qkv"] = site.qkv
        return json.dumps({
            "type": "announce", "wire": WIRE_VERSION, "run": self.run.id, "name": self.run.name,
            "host": f"{socket.gethostname()}:{os.getpid()}", "model": model,
            "config": self.config, "capture": self._model_info,
            "records_history": self._record_history,
            "history": self.run.history.to_dict(), "secret": self._secret,
        }, separators=(",", ":"), allow_nan=False)

    async def _session(self, ws: Any) -> None:
        # Steps from now on are queued; the announce's history has the ones before (a step
        # in both is dropped by the server, which keeps only points newer than its last).
        self._steps.clear()
        self.connected.set()
        await ws.send(self._announce())
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if welcome.get("type") != "welcome" and welcome.get("retry"):
            self.connected.clear()  # the server is full for now: retried with backoff
            logger.warning("attnscope server: %s", welcome.get("message"))
            self._answered.set()
            return
        if welcome.get("type") != "welcome":
            self.connected.clear()
            self.refused = str(welcome.get("message", welcome))
            logger.error("attnscope server refused run %r: %s", self.run.id, self.refused)
            self._answered.set()
            await self._sleep(BACKOFF_MAX_S)
            return
        self.refused = None
        self._answered.set()
        self._secret = welcome.get("secret") or self._secret
        self._sent = {}
        self.connections += 1
        self._history_wanted = welcome.get("history") if self._record_history else None
        if self._history is not None:
            self._history.reconnected()
        captures: set[asyncio.Task] = set()
        receiver = asyncio.create_task(self._receive(ws, captures))
        try:
            await self._send_loop(ws, receiver)
        finally:
            for task in (receiver, *captures):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiver

    async def _receive(self, ws: Any, captures: set[asyncio.Task]) -> None:
        async for message in ws:
            data = json.loads(message)
            if data.get("type") == "plan":
                self._publisher.set_plan(plan_from_message(data))
                self._sent = {}
            elif data.get("type") == "capture":
                task = asyncio.create_task(self._capture(data))
                captures.add(task)
                task.add_done_callback(captures.discard)
            elif data.get("type") == "error":  # the server dropped something we sent
                logger.warning("attnscope server: %s", data.get("message"))

    async def _capture(self, request: dict[str, Any]) -> None:
        """Serve a capture request: wait (in a worker thread) for the training thread to
        run it between two steps, then queue the answer for the send loop."""
        answer = await asyncio.to_thread(answer_capture, self.run, request)
        self._answers.extend(answer)
        self._wake()

    async def _send_loop(self, ws: Any, receiver: asyncio.Task) -> None:
        assert self._event is not None
        loop = asyncio.get_running_loop()
        while True:
            waiter = asyncio.ensure_future(self._event.wait())
            due = [] if not self._steps else \
                [max(0.0, self._steps_sent + STEPS_PERIOD_S - loop.time())]
            if self._history is not None and (history_in := self._history.due_in()) is not None:
                due.append(history_in)
            done, _ = await asyncio.wait({waiter, receiver}, timeout=min(due, default=None),
                                         return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                waiter.cancel()
            if receiver in done:  # the server went away
                receiver.result()
                return
            self._event.clear()
            self._wake_pending = False
            cpu = time.thread_time()
            self._collect()
            self.run.budget.spend_helper("stream", time.thread_time() - cpu)
            await self._flush(ws)
            if self._closing:
                await ws.send(json.dumps({"type": "close"}))
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.wait_closed(), 2)
                return

    def _collect(self) -> None:
        """New captures from the local slots into the bounded outgoing buffer."""
        for key, cap in list(self._publisher.slots.items()):
            if cap.seq <= self._sent.get(key, 0):
                continue
            self._sent[key] = cap.seq
            valid = None
            if cap.kind == "head_stats" and cap.masks is not None:
                L, S = cap.data.shape[-2:]
                counts = valid_key_counts(cap.masks, cap.sample, L, S)
                valid = counts
            if len(self._frames) == self._frames.maxlen:
                self.dropped += 1
            self._frames.append(encode_capture(cap, valid))

    async def _flush(self, ws: Any) -> None:
        while self._answers:
            await ws.send(self._answers.popleft())
        if self._history is not None:
            cpu = time.thread_time()
            messages = self._history.messages(now=self._closing)
            self.run.budget.spend_helper("stats", time.thread_time() - cpu)
            for message in messages:
                await ws.send(message)
        now = asyncio.get_running_loop().time()
        if self._steps and (self._closing or now >= self._steps_sent + STEPS_PERIOD_S):
            self._steps_sent = now
            steps = list(self._steps)
            self._steps.clear()
            await ws.send(json.dumps({"type": "steps", "steps": steps}, separators=(",", ":"),
                                     allow_nan=False))
        while self._frames:
            await ws.send(self._frames.popleft())


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
