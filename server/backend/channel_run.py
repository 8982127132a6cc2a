"""The server process's view of the run whose training process started it:
:class:`ChannelRun`, fed through the shared-memory channel.

It is a :class:`~attnscope.backend.remote.run.RemoteRun` (its layout from the ``hello``, its
frames in the hub's latest-value slots, its captures answered by the training process)
whose link is the channel instead of a websocket, plus what only a run of our own has:
pause and resume, the training side's cost budget (:class:`BudgetView`), a tokenizer,
and a history recorded by this process's writer from the sample copies the training
process sends (:class:`RecorderProxy`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ..contract.channel import Channel, Message
from ..contract.messages import MessageError, read_frames, read_snapshot, read_step
from ..contract.plan import Plan
from ..contract.wire import plan_to_message
from ..core.captured import deferred_captures
from ..core.history_config import HistoryConfig
from ..core.jsonsafe import json_safe
from ..core.run_base import RunStateError
from .remote.run import RemoteRun

logger = logging.getLogger(__name__)


class BudgetView:
    """The training process's cost budget as this process sees it: its last ``budget``
    message, and the CPU this process spends for the run (sent back as ``helper_cpu``)."""

    def __init__(self) -> None:
        self.version = 0
        self._status: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._helper: dict[str, float] = {}

    def update(self, status: dict[str, Any]) -> None:
        self._status = status
        self.version += 1

    def status(self) -> dict[str, Any]:
        return {k: v for k, v in self._status.items() if k != "version"}

    def view_side(self, side: int) -> int:
        """A subscriber's pooled view side, thinned as the training side's budget says."""
        scale = (self._status.get("thinned") or {}).get("view_scale", 1.0)
        return side if scale >= 1 else max(min(side, 16), int(side * scale))

    def spend_helper(self, component: str, seconds: float) -> None:
        with self._lock:
            self._helper[component] = self._helper.get(component, 0.0) + seconds

    def take_helper(self) -> dict[str, float]:
        """CPU seconds spent here since the last call, per component."""
        with self._lock:
            out, self._helper = self._helper, {}
        return out


class RecorderProxy:
    """What the history writer holds for a :class:`ChannelRun`: the recorder runs in the
    training process (asked for with a ``history`` message); the session it records into
    is one of this process's store."""

    def __init__(self, run: ChannelRun, service: Any) -> None:
        self.run = run
        self.service = service
        self.session: str | None = None
        config: HistoryConfig = service.config
        alerts = getattr(service, "alerts", None)  # the book its writer feeds
        self._alerts = None if alerts is None else alerts.listeners
        if self._alerts is not None:
            self._alerts.append(self._alert)
        run.send("history", {"config": {
            f: getattr(config, f) for f in ("every", "probe_samples", "probe_budget",
                                            "snapshot_max_side", "queue_size", "queue_bytes")}})

    def _alert(self, message: dict[str, Any]) -> None:
        """An alert of this run (the writer's thread): to the training process, where
        ``dash.on_alert`` callbacks get it at its next step."""
        if message.get("run") == self.run.id and self.run.link is not None:
            self.run.send("alert", json_safe(message))  # NaN values travel as null

    def detach(self) -> None:
        if self._alerts is not None and self._alert in self._alerts:
            self._alerts.remove(self._alert)
        self.run.send("history", {"config": None})
        if self.run.recorder is self:
            self.run.recorder = None


class _ChannelLink:
    """The link object a RemoteRun sends through: here, the channel's down ring."""

    def __init__(self, run: ChannelRun) -> None:
        self.run = run

    def send_plan(self, plan: Plan) -> None:
        self.run.send("plan", plan_to_message(plan, with_sides=True))

    def send_threadsafe(self, message: dict[str, Any]) -> None:
        self.run.send(str(message.pop("type")), message)


class ChannelRun(RemoteRun):
    """The run of the training process at the other end of ``channel`` (see the module
    docstring). Fed by :meth:`receive` on the event loop; any thread may call the rest."""

    def __init__(self, hello: dict[str, Any], channel: Channel, tokenizer: Any = None) -> None:
        super().__init__(str(hello["run"]), str(hello["name"]), hello["model"],
                         str(hello.get("host", "")), hello.get("config"))
        self.controls = tuple(c for c in ("pause", "resume", "restart")
                              if c in (hello.get("controls") or ()))
        self.channel = channel
        self.budget = BudgetView()
        self.budget.update(dict(hello.get("budget") or {}))
        self.tokenizer = tokenizer
        self.set_capture_info(hello.get("capture"))
        self.recorder: RecorderProxy | None = None
        self._sessions: dict[str, str] = {}  # the training side's session id -> the store's
        self._send_lock = threading.Lock()  # the down ring has one producer at a time
        self._paused = False
        self._stopped = False
        self.history_dropped = 0
        self.attach(_ChannelLink(self), hello.get("history"))

    @property
    def status(self) -> str:
        if self._ended:
            return super().status
        return "paused" if self._paused else "idle" if self._stopped else "live"

    def send(self, kind: str, header: dict[str, Any]) -> bool:
        """A message to the training process (any thread)."""
        with self._send_lock:
            return self.channel.send(kind, header)

    # -- controls and history (any thread) -----------------------------------------

    def pause(self) -> None:
        """Paused from now on: the training loop waits at its next step (as a run in the
        server's own process does); its confirmation comes as a ``status`` message."""
        self._check_control("pause")
        self.send("control", {"action": "pause"})
        self._paused = True
        self._changed()

    def resume(self) -> None:
        self._check_control("resume")
        self.send("control", {"action": "resume"})
        self._paused = False
        self._changed()

    def restart(self) -> None:
        if "restart" not in self.controls:
            raise RunStateError(f"run {self.id!r} does not support restart")
        self.send("control", {"action": "restart"})

    def capture(self, inputs: Any, kinds: list[str], layers: list[int],
                heads: list[int] | None, max_bytes: int, timeout: float,
                attention_mask: Any = None) -> tuple[dict[str, Any], int | None]:
        """A capture in the training process, at its next step boundary (or at once when
        it is not training); ``TimeoutError`` when none comes within ``timeout``."""
        if self.link is None:
            raise RunStateError(f"run {self.id!r} has ended: there is no model to run")
        given = {"tokens" if not inputs.is_floating_point() else "features": inputs.tolist()}
        if attention_mask is not None:
            given["attention_mask"] = attention_mask.tolist()
        request = {"input": given, "kinds": kinds, "layers": layers, "heads": heads}
        return self.captures.request(self.link.send_threadsafe, request, max_bytes, timeout,
                                     acknowledged=True)

    def new_recorder(self, sink: Any) -> RecorderProxy | None:
        """History is recorded in the training process (sample copies, probe passes) and
        written here: a proxy that asks the training side to record."""
        if self._ended:
            return None
        self.recorder = RecorderProxy(self, sink)
        return self.recorder

    # -- from the training process (event loop) ----------------------------------------

    def receive(self, message: Message) -> None:
        """Apply one message from the training process; ``MessageError`` (or another
        ``ValueError``) for one that does not fit."""
        kind, body = message.kind, message.header
        if kind == "steps":
            self.apply_steps(body["steps"])
            if self._stopped:
                self._stopped = False
                self._changed()
        elif kind == "frames":
            for cap in read_frames(body, message.tensors, deferred_captures):
                self.deliver(cap, None)
        elif kind == "budget":
            self.budget.update(body)
        elif kind == "status":
            self._paused = body.get("state") == "paused"
            self._stopped = body.get("state") == "stopped"
            if body.get("reset"):
                self.reset()  # the run started over: its steps and scalars too
            self._changed()
        elif kind == "capture_result":
            self.captures.receive_chunk(body, memoryview(message.tensors["bytes"].numpy()))
        elif kind == "capture_error":
            self.captures.receive_error(body)
        elif kind == "capture_started":
            self.captures.started(body.get("id"))
        elif kind in ("history_session", "history_step", "history_snapshot"):
            self._history(kind, body, message)
        elif kind == "close":
            if body.get("error"):
                self.error = str(body["error"])[:2000]
            self.detach_link(self.link, ended=True)
        else:
            raise MessageError("kind", f"unknown message {kind!r} from the training process")

    def _history(self, kind: str, body: dict[str, Any], message: Message) -> None:
        recorder = self.recorder
        if recorder is None:
            return  # the writer stopped recording this run; late records are dropped
        service = recorder.service
        if kind == "history_session":
            theirs = str(body["session"])
            self._sessions[theirs] = service.new_session(self.id, body.get("name") or self.name,
                                                         dict(body.get("meta") or {}))
            recorder.session = self._sessions[theirs]
            return
        item = read_step(body, message.tensors) if kind == "history_step" \
            else read_snapshot(body, message.tensors)
        session = self._sessions.get(item.session)
        if session is None:
            raise MessageError("session", f"unknown history session {item.session!r}")
        item.session = session
        if service.submit(item) is False:
            # the writer is behind: the training side's budget thins the history's work
            self.history_dropped += 1
            self.send("queue_full", {"dropped": self.history_dropped})

    def gone(self) -> None:
        """The training process is gone (its doorbell read EOF)."""
        if self.link is not None:
            self.detach_link(self.link, ended=True)
