"""Every message of the channel between a training process and its server process
(:mod:`attnscope.contract.channel`), in one place: what each kind holds, how it is built
and how it is read back, with the checks a reader needs.

Up (training process -> server process):

- ``boot``: what the server process is to be (``{"role": "server", "settings": {...}}``
  or ``{"role": "relay", "url", "token", ...}``); the first message, once.
- ``hello``: the run: ``{run, name, model, capture, controls, symbols, config,
  records_history}`` (the publisher protocol's ``announce``, docs/teams.md).
- ``steps``: ``{"steps": [[step, time, {name: value}, batch, seq_len], ...]}``.
- ``frames``: stream captures of one step (:func:`frames_message`).
- ``history_session``, ``history_step``, ``history_snapshot``: what the history recorder
  recorded (:func:`step_message`, :func:`snapshot_message`).
- ``capture_started`` (``{id}``: running it now), ``capture_result`` (chunks of a
  safetensors file) and ``capture_error``.
- ``budget``: the cost budget's status; ``status``: ``{"state": "live" | "paused" |
  "stopped"}``; ``close``: the run ended.

Down (server process -> training process):

- ``ready`` (``{"pid"}``: serving) or ``failed`` (``{"error"}``), once, first;
- ``plan`` (:func:`attnscope.contract.wire.plan_to_message`, views' sides included),
  ``capture`` (a capture request), ``control`` (``{"action": "pause" | "resume" |
  "restart"}``), ``history`` (``{"config": {...} | null}``: record or stop), ``helper_cpu``
  (``{"stream": s, "stats": s, ...}``: the server process's CPU spent for this run),
  ``link`` (a relay's connection to its team server: ``{connected, connections,
  refused, dropped, history_dropped}``), ``alert`` (an alert of the run:
  ``attnscope.backend.alerts.rules.Alert.to_message``, for ``dash.on_alert`` callbacks),
  ``queue_full`` (the history writer dropped a record: the budget thins history work).

Tensors travel beside the header (``Channel.send``); events travel as
:class:`~transformer_core.events.portable.Portable` data, their tensors named
``e<i>.<name>``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from transformer_core.events.portable import Portable, from_portable, to_portable

from ..core.jsonsafe import json_safe
from .plan import Capture, SampleNeed

UP = ("boot", "hello", "steps", "frames", "history_session", "history_step",
      "history_snapshot", "capture_started", "capture_result", "capture_error", "budget",
      "status", "close")
DOWN = ("ready", "failed", "plan", "capture", "control", "history", "helper_cpu", "link",
        "alert", "queue_full")
CONTROLS = ("pause", "resume", "restart")
STATES = ("live", "paused", "stopped")


class MessageError(ValueError):
    """A message that does not fit its kind; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# -- events ----------------------------------------------------------------------------

def add_event(event: Any, events: list[dict[str, Any]],
              tensors: dict[str, torch.Tensor]) -> int:
    """Put ``event`` (a :class:`Portable`, or an event: a sample copy) into a message's
    ``events`` and ``tensors``; its index."""
    portable = event if isinstance(event, Portable) else to_portable(event)
    index = len(events)
    events.append(portable.header())
    tensors.update({f"e{index}.{k}": v for k, v in portable.all_tensors().items()})
    return index


def read_events(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[Any]:
    """The events of a message, built again (their ``source`` is None)."""
    out = []
    for i, head in enumerate(header.get("events") or []):
        prefix = f"e{i}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            out.append(from_portable(Portable.from_parts(head, own)))
        except (KeyError, TypeError) as exc:
            raise MessageError(f"events[{i}]", f"does not build an event: {exc}") from None
    return out


# -- stream frames -----------------------------------------------------------------------

def _need_dict(need: SampleNeed | None) -> dict[str, Any] | None:
    return None if need is None else dataclasses.asdict(need)


def _need_of(value: dict[str, Any] | None) -> SampleNeed | None:
    if value is None:
        return None
    tuples = {k: None if v is None else tuple(int(x) for x in v)
              for k, v in value.items() if k.endswith("_heads")}
    return SampleNeed(**{**value, **tuples})


def frames_message(caps: list[Capture]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Published captures as one ``frames`` message: each capture's metadata, with its
    data, or (computed when first read) the index of the sample copy it comes from; a
    copy shared by two captures (statistics and view) travels once."""
    frames, events, tensors = [], [], {}
    seen: dict[int, int] = {}
    for i, cap in enumerate(caps):
        frame = {"kind": cap.kind, "layer": cap.layer, "sample": cap.sample,
                 "heads": list(cap.heads), "role": cap.role, "time": cap.time,
                 "step": cap.step, "labels": None if cap.labels is None else list(cap.labels),
                 "pool": cap.pool, "full_shape": None if cap.full_shape is None
                 else list(cap.full_shape), "event": None, "need": _need_dict(cap.need)}
        if cap.event is not None:
            key = id(cap.event)
            if key not in seen:
                seen[key] = add_event(cap.event, events, tensors)
            frame["event"] = seen[key]
        else:
            tensors[f"d{i}"] = cap.wait()
        if cap.masks is not None and cap.kind == "head_stats":
            frame["masks"] = True  # rows of a recurrent site: the row store's own masks
        frames.append(frame)
    return {"frames": frames, "events": events}, tensors


def read_frames(header: dict[str, Any], tensors: dict[str, torch.Tensor],
                deferred: Any) -> list[Capture]:
    """The captures of a ``frames`` message. ``deferred(copy, layer, need, heads, role,
    time)`` makes the captures of a sample copy (computed when first read, in this
    process): :func:`attnscope.training.stream.deferred_captures`."""
    events = read_events(header, tensors)
    out: list[Capture] = []
    made: dict[tuple[int, str], Capture] = {}
    for i, frame in enumerate(header.get("frames") or []):
        kind, layer = str(frame["kind"]), int(frame["layer"])
        heads = tuple(int(h) for h in frame["heads"])
        labels = frame.get("labels")
        if frame.get("event") is not None:
            index = int(frame["event"])
            if not 0 <= index < len(events):
                raise MessageError(f"frames[{i}].event", f"no event {index}")
            need = _need_of(frame.get("need"))
            if need is None:
                raise MessageError(f"frames[{i}].need", "a deferred capture needs its need")
            if (index, kind) not in made:
                for cap in deferred(events[index], layer, need, heads, str(frame["role"]),
                                    float(frame["time"])):
                    made[(index, cap.kind)] = cap
            cap = made.get((index, kind))
            if cap is None:
                raise MessageError(f"frames[{i}].kind", f"{kind!r} is not made from an event")
        else:
            data = tensors.get(f"d{i}")
            if data is None:
                raise MessageError(f"frames[{i}]", "neither data nor an event")
            cap = Capture(kind, layer, int(frame["sample"]), heads, data, str(frame["role"]),
                          float(frame["time"]), pool=int(frame.get("pool") or 1),
                          full_shape=None if frame.get("full_shape") is None
                          else tuple(int(s) for s in frame["full_shape"]))
        cap.step = int(frame["step"])
        cap.labels = None if labels is None else (labels[0], labels[1])
        out.append(cap)
    return out


# -- history -------------------------------------------------------------------------------

def step_message(item: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A recorder's :class:`~attnscope.training.recorder.StepItem` as ``history_step``: per
    layer its sample copy (an event) or its statistics (R, H), already on the host."""
    events: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    layers = {str(layer): add_event(e, events, tensors) for layer, e in item.attention.items()}
    for layer, copy in item.stats.items():
        tensors[f"s{layer}"] = copy.wait()
    return {"session": item.session, "step": item.step, "time": item.time,
            "scalars": json_safe(item.scalars), "n_layers": item.n_layers, "layers": layers,
            "stats": sorted(item.stats), "events": events}, tensors


def read_step(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    """The :class:`StepItem` of a ``history_step`` message (its session: the sender's)."""
    from ..core.history_items import StepItem
    from ..core.reduce import HostCopy

    events = read_events(header, tensors)
    attention = {int(layer): events[int(i)] for layer, i in (header.get("layers") or {}).items()}
    stats = {int(layer): HostCopy(tensors[f"s{layer}"]) for layer in header.get("stats") or []}
    return StepItem(str(header["session"]), int(header["step"]), float(header["time"]),
                    {str(k): math.nan if v is None else float(v)
                     for k, v in (header.get("scalars") or {}).items()},
                    attention, int(header["n_layers"]), stats)


def snapshot_message(item: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A recorder's :class:`~attnscope.training.recorder.SnapshotItem` as
    ``history_snapshot``: per layer its P probe samples' copies (events)."""
    events: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}

    def put(group: dict[int, list[Any]]) -> dict[str, list[int]]:
        return {str(layer): [add_event(e, events, tensors) for e in copies]
                for layer, copies in group.items()}

    return {"session": item.session, "step": item.step, "time": item.time,
            "labels": item.labels, "max_side": item.max_side,
            "attention": put(item.attention), "repeat": put(item.repeat),
            "events": events}, tensors


def read_snapshot(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    """The :class:`SnapshotItem` of a ``history_snapshot`` message."""
    from ..core.history_items import SnapshotItem

    events = read_events(header, tensors)

    def group(name: str) -> dict[int, list[Any]]:
        return {int(layer): [events[int(i)] for i in idx]
                for layer, idx in (header.get(name) or {}).items()}

    labels = header.get("labels")
    return SnapshotItem(str(header["session"]), int(header["step"]), float(header["time"]),
                        group("attention"), None if labels is None else [str(x) for x in labels],
                        group("repeat"), int(header.get("max_side") or 256))


__all__ = ["CONTROLS", "DOWN", "STATES", "UP", "MessageError", "add_event", "frames_message",
           "read_events", "read_frames", "read_snapshot", "read_step", "snapshot_message",
           "step_message"]
