"""The training process's end of a run watched from another process (the dashboard's
server process, or a relay to a team server): :class:`TrainingLink`.

It keeps what must touch the model, and nothing else: the :class:`~attnscope.training.run.Run`
(instrumentation, pause, step marks), the stream :class:`~attnscope.training.stream.StreamTap`
(slicing what is watched) and, when history is recorded, the
:class:`~attnscope.training.recorder.RunRecorder` (sample copies, probe passes). All of it
runs in the training thread, inside ``step()``; there is no thread here. What they
produce leaves through the shared-memory :class:`~attnscope.contract.channel.Channel`
(:mod:`attnscope.contract.messages`); statistics, pooling, encoding, history writing and
the web server run in the other process.

At each ``step()`` the link: publishes device copies that have arrived (never waiting
for the device), reads the server's messages when there are any (two loads from shared
memory when there are none), sends the step, and, on steps the stream captured, the
frames. While the run is paused it blocks on the channel's doorbell in ``step()``; a
server that goes away releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

import safetensors.torch
import torch

from ..contract.captures import (
    CHUNK_BYTES,
    capture_request_input,
    classify_capture_error,
    model_info_message,
)
from ..contract.channel import Channel, Message
from ..contract.messages import frames_message, snapshot_message, step_message
from ..contract.plan import EMPTY_PLAN, Capture, SlotKey
from ..contract.wire import plan_from_message
from ..core.history_config import HistoryConfig
from ..core.jsonsafe import json_safe
from .recorder import RunRecorder, SnapshotItem, StepItem
from .run import Run
from .staging import Arrival, HostStaging
from .stream import StreamTap

logger = logging.getLogger(__name__)

# Steps alone ring the server's doorbell at most this often (20 wake-ups a second).
STEPS_RING_S = 0.05
# While paused, the training thread wakes this often to see whether the server is gone.
PAUSE_POLL_S = 0.5
# A capture result waits at most this long for room in the ring (the server process
# drains it at once; only a stopped server leaves it full). The training thread runs the
# capture anyway; only its answer is lost.
RESULT_ROOM_S = 10.0


def _ipython_kernel_shell() -> Any:
    """The IPython shell of a Jupyter kernel this code runs in, or None."""
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    shell = get_ipython()
    return shell if shell is not None and getattr(shell, "kernel", None) is not None else None


def hello_message(run: Run, config: dict[str, Any] | None = None,
                  records_history: bool = True) -> dict[str, Any]:
    """The ``hello`` of ``run``: what the server process serves it as (the publisher
    protocol's ``announce``: layout, what captures need, its scalars so far)."""
    model = run.model_summary()
    for site, layer in zip(run.sites, model["layer_details"], strict=True):
        layer["qkv"] = site.qkv
    return {"run": run.id, "name": run.name, "model": model,
            "host": f"{socket.gethostname()}:{os.getpid()}", "config": dict(config or {}),
            "capture": model_info_message(run.layout, run.symbols, run.tokenizer),
            "controls": list(run.controls), "symbols": run.symbols,
            "records_history": records_history, "history": run.history.to_dict(),
            "budget": json_safe(run.budget.status())}


class ChannelSink:
    """The history recorder's sink in a training process: records leave through the
    channel as ``history_*`` messages (:mod:`attnscope.contract.messages`); the server
    process computes and writes them. ``submit`` never blocks: False when the ring has no
    room (the budget then thins, as for a full writer queue)."""

    def __init__(self, link: TrainingLink, config: HistoryConfig) -> None:
        self.link = link
        self.config = config
        self._sessions = 0

    def new_session(self, run_id: str, name: str | None, meta: dict[str, Any]) -> str:
        self._sessions += 1
        self.link.recorded = True
        session = f"{self.link.process_tag}-{self._sessions}"
        self.link.channel.send("history_session",
                               {"session": session, "name": name, "meta": json_safe(meta)})
        return session

    def submit(self, item: Any) -> bool:
        try:
            return self._submit(item)
        except Exception:  # noqa: BLE001 (our bug must never stop the user's training)
            self.link.failed("history record")
            return True  # not a full queue: the budget should not thin for it

    def _submit(self, item: Any) -> bool:
        if not arrived(item):
            self.link.later.append(item)  # copies still coming from the device
            return True
        if isinstance(item, StepItem):
            header, tensors = step_message(item)
            sent = self.link.channel.send("history_step", header, tensors)
        elif isinstance(item, SnapshotItem):
            header, tensors = snapshot_message(item)
            sent = self.link.channel.send("history_snapshot", header, tensors)
        else:
            raise TypeError(f"history: cannot send a {type(item).__name__}")
        self.link.release(arrivals(item))
        return sent


def arrivals(item: Any) -> list[Any]:
    """The device copies a history item waits for."""
    if isinstance(item, StepItem):
        copies = list(item.attention.values())
    else:
        copies = [c for group in (item.attention, item.repeat) for cs in group.values()
                  for c in cs]
    return [c.arrival for c in copies if getattr(c, "arrival", None) is not None]


def arrived(item: Any) -> bool:
    """Whether a history item's device copies have all arrived (never waits)."""
    stats = item.stats.values() if isinstance(item, StepItem) else ()
    return all(a.query() for a in arrivals(item)) and all(c.ready() for c in stats)


class TrainingLink:
    """A run's training-process end (see the module docstring). Made by ``Dashboard``;
    :meth:`close` ends the run and sends what is left."""

    def __init__(self, run: Run, channel: Channel, *, records_history: bool = True) -> None:
        self.run = run
        self.channel = channel
        self.records_history = records_history
        self.process_tag = f"{time.time_ns():x}"
        self.staging = HostStaging()
        self.publisher = StreamTap(run, self._published, staging=self.staging)
        self.paused = False
        self.closed = False
        self.recorded = False  # a history session was recorded (the server process has it)
        self.later: list[Any] = []  # captures and history steps whose device copies run
        self._sent: dict[SlotKey, int] = {}
        self._recorder: RunRecorder | None = None
        self._budget_version = -1
        # Handlers of further message kinds (a relay's ``link``), applied by :meth:`poll`
        # from any thread; other messages that poll reads wait for the next step.
        self.extra: dict[str, Any] = {}
        self._deferred: list[Message] = []
        self._failures: set[str] = set()
        self.alert_callbacks: list[Any] = []  # dash.on_alert
        self._state = "live"  # what the server was last told: live, paused or stopped
        self._rung = 0.0  # when a step last rang the server's doorbell
        self._loop: Any = None  # a notebook kernel's event loop serving requests between cells
        self._notebook = False  # served from a kernel's loop (again after a restart)
        self._shell: Any = None
        self._mail_lock = threading.Lock()
        run.add_step_hook(self._on_step)
        run.add_change_listener(self._run_changed)

    def _run_changed(self, run: Run) -> None:
        """The run started over (``Run.reset``, in the training thread): so does the
        server's copy of its steps and scalars."""
        if self.closed:
            return
        try:
            if run.status == "ended" and run.error:  # the training failed: the page says so
                self.channel.send("close", {"error": run.error})
            elif run.step_index is None:
                self.channel.send("status", {"state": "live", "reset": True})
        except Exception:  # noqa: BLE001 (our bug must never stop the user's training)
            self.failed("status")

    # -- training thread ---------------------------------------------------------

    def _on_step(self, run: Run) -> None:
        try:
            self._step(run)
        except Exception:  # noqa: BLE001 (our bug must never stop the user's training)
            self.failed("step")

    def failed(self, what: str) -> None:
        """Log a failure of ours in the training thread once per kind (with its traceback);
        training goes on."""
        if what not in self._failures:
            logger.exception("attnscope: sending the %s to the dashboard failed; training "
                             "goes on (said once)", what)
        self._failures.add(what)

    def _step(self, run: Run) -> None:
        if self._state != "live" and not self.paused:
            self.set_state("live")  # steps again (after a cell ended, say)
        if self.later:
            self._send_arrived()
        if self.channel.has_mail or self._deferred:
            self._read_mail()
        # A step alone does not wake the server process more often than STEPS_RING_S (each
        # wake-up costs a fast loop's steps on a machine with few cores); what else is sent
        # rings at once, and the server reads what a stopped loop left unrung within 1 s.
        now = time.monotonic()
        ring = now - self._rung >= STEPS_RING_S
        self.channel.send("steps", {"steps": [[run.step_index, run.scalars_time,
                                               json_safe(run.scalars), run.batch_size,
                                               run.seq_len]]}, ring=ring)
        if ring:
            self._rung = now
        budget = run.budget
        if budget.version != self._budget_version:
            self._budget_version = budget.version
            self.channel.send("budget", {"version": budget.version, **json_safe(budget.status())})
        while self.paused and not self.closed:
            if not self.channel.wait(PAUSE_POLL_S):  # the server process is gone: go on
                logger.warning("attnscope: the dashboard's server went away while the run "
                               "was paused; training resumes")
                self._set_paused(False)
                break
            self._read_mail()

    def _published(self, run_id: str) -> None:
        """The publisher's notify (training thread, at a step): send new captures."""
        try:
            self._send_published()
        except Exception:  # noqa: BLE001 (our bug must never stop the user's training)
            self.failed("frames")

    def _send_published(self) -> None:
        fresh = []
        for key, cap in list(self.publisher.slots.items()):
            if cap.seq > self._sent.get(key, 0):
                self._sent[key] = cap.seq
                fresh.append(cap)
        ready = [c for c in fresh if c.ready is None or c.ready.query()]
        self.later.extend(c for c in fresh if c not in ready)
        if ready:
            self._send_frames(ready)

    def _send_frames(self, caps: list[Capture]) -> None:
        header, tensors = frames_message(caps)
        self.channel.send("frames", header, tensors)
        self.release(c.ready for c in caps)

    def release(self, arrivals: Any) -> None:
        """Give the staging buffers of what was just written to the ring back (once each)."""
        for arrival in {id(a): a for a in arrivals if isinstance(a, Arrival)}.values():
            self.staging.release(arrival)

    def _send_arrived(self) -> None:
        """Send captures and history steps whose device copies have arrived (in order)."""
        waiting, self.later = self.later, []
        frames = []
        for item in waiting:
            if isinstance(item, Capture):
                if item.ready is None or item.ready.query():
                    frames.append(item)
                else:
                    self.later.append(item)
            elif arrived(item):
                if self._recorder is not None:
                    self._recorder.service.submit(item)
            else:
                self.later.append(item)
        if frames:
            self._send_frames(frames)

    def _read_mail(self) -> None:
        with self._mail_lock:
            deferred, self._deferred = self._deferred, []
            self.handle(deferred)
            self.handle(self.channel.receive())

    def poll(self) -> None:
        """From any thread (not the training thread's step): apply what the server sent,
        plans and controls too (as a server in this process's threads did), except
        capture requests, which wait for the training thread (its next step)."""
        if not self._mail_lock.acquire(blocking=False):
            return
        try:
            for message in self.channel.receive():
                if message.kind in self.extra:
                    self.extra[message.kind](message.header)
                elif message.kind == "capture":
                    self._deferred.append(message)
                else:
                    self.handle([message])
        finally:
            self._mail_lock.release()

    def handle(self, messages: Any) -> None:
        """Apply the server's ``messages`` (training thread)."""
        for message in messages:
            try:
                self._handle(message)
            except (ValueError, TypeError, KeyError) as exc:  # the server's bug: not ours
                logger.warning("attnscope: ignored a %s message from the server: %s",
                               message.kind, exc)

    def _handle(self, message: Message) -> None:
        kind, body = message.kind, message.header
        if kind == "plan":
            self.publisher.set_plan(plan_from_message(body))
            self._sent = {}
        elif kind == "capture":
            self._capture(body)
        elif kind == "control":
            action = body.get("action")
            if action in ("pause", "resume"):
                self._set_paused(action == "pause")
            elif action == "restart":
                self.run.restart()  # its trainer starts over at the next step (raises if none)
                self._set_paused(False)
            else:
                raise ValueError(f"action: unknown {action!r}")
        elif kind == "history":
            self._follow_history(body.get("config"))
        elif kind == "helper_cpu":
            for component, seconds in body.items():
                self.run.budget.spend_helper(str(component), float(seconds))
        elif kind == "alert":
            self.alerted(body)
        elif kind == "queue_full":
            self.run.budget.queue_full()
        elif kind in self.extra:
            self.extra[kind](body)
        else:
            raise ValueError(f"kind: unknown message {kind!r}")

    def alerted(self, alert: dict[str, Any]) -> None:
        """An alert of the run: each ``dash.on_alert`` callback gets it, here (the training
        thread, at a step boundary or between notebook cells); a callback that fails is
        logged and the others still run."""
        for callback in list(self.alert_callbacks):
            try:
                callback(alert)
            except Exception:  # noqa: BLE001 (the user's callback: logged, training goes on)
                logger.exception("attnscope: the on_alert callback %r failed", callback)

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.set_state("paused" if paused else "live")

    def _follow_history(self, config: dict[str, Any] | None) -> None:
        if config is not None and self._recorder is None and self.records_history:
            values = {k: v for k, v in config.items() if k in HistoryConfig.__dataclass_fields__}
            sink = ChannelSink(self, HistoryConfig(**values).validate())
            self._recorder = RunRecorder(self.run, sink, staging=self.staging)
        elif config is None and self._recorder is not None:
            self._recorder.detach()
            self._recorder = None

    def _capture(self, request: dict[str, Any]) -> None:
        """Run a capture request here, between two steps, and send its answer."""
        capture_id = str(request.get("id"))
        deadline = request.get("deadline")
        if isinstance(deadline, int | float) and time.monotonic() > deadline:
            logger.info("capture %s: its requester gave up before this step; not run",
                        capture_id)
            return
        self.channel.send("capture_started", {"id": capture_id})
        try:
            x, mask, text = capture_request_input(request, self.run.tokenizer)
            out, step = self.run.capture_now(
                x, [str(k) for k in request.get("kinds", [])], request.get("layers"),
                request.get("heads"), int(request["max_bytes"]), attention_mask=mask)
            if text:  # the server labels the positions from these ids
                out["tokens"] = x
            data = safetensors.torch.save({k: v.contiguous() for k, v in out.items()})
        except Exception as exc:  # noqa: BLE001 (answered to the server, which answers 4xx/5xx)
            kind, field, text = classify_capture_error(exc)
            if kind == "failed":
                logger.exception("capture %s for run %r failed", capture_id, self.run.id)
            self.channel.send("capture_error", {"id": capture_id, "error": {
                "kind": kind, "field": field, "message": text}})
            return
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        for offset in range(0, len(data), CHUNK_BYTES):
            chunk = raw[offset : offset + CHUNK_BYTES]
            header = {"id": capture_id, "offset": offset, "total": len(data), "step": step}
            deadline = time.monotonic() + RESULT_ROOM_S
            while not self.channel.send("capture_result", header, {"bytes": chunk}):
                if time.monotonic() > deadline or self.channel.peer_gone:
                    logger.warning("capture %s: no room in the channel for its result",
                                   capture_id)
                    return
                time.sleep(0.002)

    # -- no training loop running -----------------------------------------------------

    def serve_here(self, timeout: float | None = None) -> None:
        """Serve the server's messages (captures above all) from the calling thread until
        ``timeout``, Ctrl-C, the end of the run or the server's: a process with no training
        loop running (``Dashboard.wait``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.set_state("stopped")
        while not self.closed:
            left = PAUSE_POLL_S if deadline is None else min(PAUSE_POLL_S,
                                                              deadline - time.monotonic())
            if left <= 0:
                return
            if not self.channel.wait(left):
                return  # the server process is gone
            self._read_mail()

    def serve_notebook(self) -> None:
        """In a Jupyter kernel: between cells, the kernel's event loop (in the thread that
        runs the cells) serves the server's messages, so a capture runs at once when no
        cell is running; a cell that ends (or is interrupted) leaves the run stopped, not
        live. Outside a kernel, nothing."""
        shell = _ipython_kernel_shell()
        if shell is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._loop = loop
        self._notebook = True
        loop.add_reader(self.channel.bell_in, self._idle_bell)
        shell.events.register("post_run_cell", self._cell_ended)
        self._shell = shell

    def _idle_bell(self) -> None:
        """The doorbell rang while the kernel waits between cells: nobody is training."""
        if not self.channel.drain_bell():
            self._stop_serving()  # the server process is gone
            return
        try:
            self._read_mail()
        except Exception:  # noqa: BLE001 (never into the kernel's event loop)
            self.failed("idle requests")

    def _cell_ended(self, result: Any = None) -> None:
        if not self.closed and self.run.step_index is not None:
            self.set_state("stopped")

    def channel_closing(self) -> None:
        """The channel is about to close (its server process died): stop watching it."""
        self._stop_serving()

    def _stop_serving(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.channel.bell_in)
            self._loop = None
        if self._shell is not None:
            with contextlib.suppress(ValueError):
                self._shell.events.unregister("post_run_cell", self._cell_ended)
            self._shell = None

    def set_state(self, state: str) -> None:
        """Tell the server whether the run trains (``live``), is paused or stopped."""
        if state != self._state:
            self._state = state
            self.channel.send("status", {"state": state})

    def reconnect(self, channel: Channel) -> None:
        """A new server process (the last one died): nobody watches yet, history starts
        over when it asks, frames and steps go to ``channel`` from now on."""
        self._stop_serving()
        self.channel = channel
        if self._notebook:
            self.serve_notebook()
        self._state = "live"
        self.publisher.set_plan(EMPTY_PLAN)
        self._sent = {}
        self.later = []
        if self._recorder is not None:
            self._recorder.detach()
            self._recorder = None
        self._budget_version = -1
        if self.paused:
            self.paused = False

    # -- end ----------------------------------------------------------------------

    def end_run(self) -> None:
        """The run ended, the page stays served (the server process keeps running)."""
        if not self.closed:
            self._send_arrived()
            self.channel.send("close", {"keep_serving": True})

    def close(self) -> None:
        """End the run: stop listening, send what has arrived and ``close``."""
        if self.closed:
            return
        self.closed = True
        self._stop_serving()
        self.run.remove_step_hook(self._on_step)
        self.run.remove_change_listener(self._run_changed)
        if self._recorder is not None:
            self._recorder.detach()
            self._recorder = None
        self.publisher.set_plan(EMPTY_PLAN)
        for item in self.later:  # device copies: waiting is fine now, training is over
            waits = [item.ready] if isinstance(item, Capture) else \
                [*arrivals(item), *(c.done for c in item.stats.values())]
            for ready in waits:
                if ready is not None:
                    ready.synchronize()
        self._send_arrived()
        self.channel.send("close", {})
