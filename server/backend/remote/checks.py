"""What a publisher may say: its announce within the server's bounds, its frames and its
history records within the layout it announced. Checked on arrival, before anything
reaches a run, a slot or the history writer.

:func:`check_announce` gives the run's :class:`RunBounds`; every later message is
checked against them, whatever transport brought it: each ``check_*(bounds, ...)``
takes the message as its parsed header (a dict) and its payload (bytes), returns
what it decoded, or raises :class:`FrameError` naming the field. The endpoint
answers the publisher with an ``error`` and drops the message, so viewers and the
history never see it.

- stream frames (:func:`check_frame_header`): kind, dtype, layer, heads (each once,
  each below the layer's head count), shape (h, L, S) or (3, h, P) with h heads,
  sides within the announced bounds, payload length, labels and valid-key counts;
- ``steps`` batches (:func:`check_steps`);
- history (:func:`check_history_session`, :func:`check_history_stats`,
  :func:`check_history_snapshot`): session ids and metadata, every step an int64 and
  every time finite, statistics rows (layers, R, H) of the announced layers, snapshot
  tensors ``attention.<layer>`` (P, H, L, S) float16 and ``repeat_scores.<layer>``
  (P, 2, H) float32 with the layer's heads and sides within the bounds.

>>> bounds = RunBounds(layer_heads=(2,), max_side=64)
>>> header = {"kind": "attention", "layer": 0, "sample": 0, "heads": [0, 1], "role": "self",
...           "time": 1.0, "step": 3, "dtype": "float16", "shape": [2, 4, 4]}
>>> check_frame_header(bounds, header, 32 * 2)
(2, 4, 4)
>>> try:
...     check_frame_header(bounds, {**header, "shape": [8, 8]}, 64 * 2)
... except FrameError as exc:
...     exc.field, exc.message
('shape', 'an attention frame has shape (h, L, S) with h = 2 heads, got [8, 8]')
>>> try:
...     check_frame_header(bounds, {**header, "shape": [2, 128, 4]}, 2 * 128 * 4 * 2)
... except FrameError as exc:
...     exc.field, exc.message
('shape', 'expected an integer in [1, 64], got 128')

Shape legend: P probe samples, R statistics per head, H heads, L queries, S keys.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from ...core.limits import LimitError, check_finite, check_indices, check_int64, check_numbers
from ...core.roles import PATTERN_NAMES
from ...core.stats import HEAD_STATISTICS, STAT_NAMES
from ..history.store import StatRow

STREAM_STAT_NAMES = STAT_NAMES + PATTERN_NAMES  # the rows of a head_stats frame

STREAM_KINDS = ("attention", "qk_logits", "qkv_norms", "head_stats")
ITEMSIZE = {"float16": 2, "float32": 4}
MAX_NAME = 256  # layer names, roles, attention types: shown on the page
MAX_CONFIG_BYTES = 64 * 1024  # the run's config, echoed in every run listing
MAX_LABEL = 64  # a token label, as the captures API allows
MAX_STEPS_BATCH = 4096  # a publisher queues at most this many steps (MAX_PENDING_STEPS)
MAX_SCALARS = 256  # names per step (the page draws one chart line per name)
# Rows of one history_stats message: a publisher sends every 0.5 s, and queues at most
# history_queue_size (4096) records.
MAX_STAT_ROWS = 4096
# A publisher's own session id (uuid4().hex[:16]); never a path, never shown.
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The statistics a history row may hold: today's, or the five of publishers from before
# role scores (the store pads those with NaN).
STAT_LAYOUTS = (tuple(HEAD_STATISTICS), tuple(STAT_NAMES))


class FrameError(LimitError):
    """A publisher message that does not fit the protocol or the run's layout."""


@dataclass(frozen=True)
class AnnounceLimits:
    """Bounds on what one publisher may describe (``Settings.max_remote_*``)."""

    max_layers: int = 1024
    max_heads: int = 1024
    max_seq_len: int = 65536

    @classmethod
    def from_settings(cls, settings: Any) -> AnnounceLimits:
        return cls(settings.max_remote_layers, settings.max_remote_heads,
                   settings.max_remote_seq_len)


@dataclass(frozen=True)
class RunBounds:
    """What a run's announce allows its later messages (:func:`check_announce`), and what
    its history records may hold (:meth:`with_history`).

    A layer whose head count the announce leaves out is held to ``max_heads``.
    """

    layer_heads: tuple[int | None, ...]
    roles: tuple[str, ...] = ()
    max_heads: int = 1024
    # Every side of a frame or snapshot: the announced max_len, else ATTNSCOPE_MAX_REMOTE_SEQ_LEN.
    max_side: int = 65536
    # History: probe samples per snapshot (history_probe_samples), a stored snapshot's
    # side (history_snapshot_max_side, or the publishers' default if larger: the welcome
    # does not carry it), and a session's metadata as JSON (history_max_meta_bytes).
    probe_samples: int = 1
    snapshot_side: int = 256
    max_meta_bytes: int = 64 * 1024

    @property
    def layers(self) -> int:
        return len(self.layer_heads)

    def heads(self, layer: int) -> int:
        """The most heads layer ``layer`` may have."""
        return self.layer_heads[layer] or self.max_heads

    @property
    def widest(self) -> int:
        """The most heads of any layer (a statistics row's H)."""
        return max(self.heads(layer) for layer in range(self.layers))

    def with_history(self, probe_samples: int, snapshot_side: int,
                     max_meta_bytes: int) -> RunBounds:
        return RunBounds(self.layer_heads, self.roles, self.max_heads, self.max_side,
                         probe_samples, snapshot_side, max_meta_bytes)


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FrameError(field, f"expected an integer in [{low}, {high}], got {str(value)[:40]}")
    return value


def _optional_int(value: Any, field: str, low: int, high: int) -> int | None:
    return None if value is None else _int(value, field, low, high)


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise FrameError(field, f"expected a string of at most {MAX_NAME} characters")
    return value


def _json_size(value: Any, field: str, limit: int, setting: str) -> None:
    size = len(json.dumps(value, separators=(",", ":")))
    if size > limit:
        raise FrameError(field, f"{size} bytes as JSON, over the limit of {limit} ({setting})")


def check_announce(model: dict[str, Any], config: dict[str, Any],
                   capture: dict[str, Any] | None, limits: AnnounceLimits) -> RunBounds:
    """Raise :class:`FrameError` unless the announce's model fits ``limits``; return the
    bounds of the run's later messages."""
    layers = model.get("layer_details")
    if not isinstance(layers, list) or not 1 <= len(layers) <= limits.max_layers:
        raise FrameError("model.layer_details", f"expected a list of 1 to {limits.max_layers} "
                         "layers (ATTNSCOPE_MAX_REMOTE_LAYERS)")
    heads: list[int | None] = []
    roles: list[str] = []
    for i, layer in enumerate(layers):
        where = f"model.layer_details.{i}"
        if not isinstance(layer, dict):
            raise FrameError(where, "expected an object")
        heads.append(_optional_int(layer.get("heads"), f"{where}.heads", 1, limits.max_heads))
        for key in ("name", "role", "attention_type"):
            if key in layer:
                _name(layer[key], f"{where}.{key}")
        roles.append(str(layer.get("role") or "self"))
        _optional_int(layer.get("d_model"), f"{where}.d_model", 1, 1 << 20)
    for key in ("seq_len", "max_len"):
        _optional_int(model.get(key), f"model.{key}", 0, limits.max_seq_len)
    _optional_int(model.get("d_model"), "model.d_model", 1, 1 << 20)
    if len(json.dumps(config)) > MAX_CONFIG_BYTES:
        raise FrameError("config", f"over {MAX_CONFIG_BYTES} bytes as JSON")
    if capture is not None:
        described = capture.get("layers")
        if not isinstance(described, list) or len(described) > limits.max_layers:
            raise FrameError("capture.layers", f"expected a list of at most "
                             f"{limits.max_layers} layers")
        for i, layer in enumerate(described):
            if not isinstance(layer, dict):
                raise FrameError(f"capture.layers.{i}", "expected an object")
            _name(layer.get("name", ""), f"capture.layers.{i}.name")
            _optional_int(layer.get("heads"), f"capture.layers.{i}.heads", 1, limits.max_heads)
        for key in ("vocab_size", "d_model"):
            _optional_int(capture.get(key), f"capture.{key}", 1, 1 << 31)
        _optional_int(capture.get("max_len"), "capture.max_len", 1, limits.max_seq_len)
        symbols = capture.get("symbols")
        if symbols is not None and (not isinstance(symbols, list) or len(symbols) > 1 << 20):
            raise FrameError("capture.symbols", "expected a list of at most 2**20 labels")
    # The model's own longest sequence, when it says one (max_len): seq_len is only the
    # length of its latest batch, which changes from step to step.
    max_side = model.get("max_len") or limits.max_seq_len
    return RunBounds(tuple(heads), tuple(roles), limits.max_heads, max_side)


def check_frame_header(bounds: RunBounds, header: dict[str, Any],
                       payload_bytes: int) -> tuple[int, ...]:
    """The frame's shape, after checking ``header`` against the run and its payload."""
    kind = header.get("kind")
    if kind not in STREAM_KINDS:
        raise FrameError("kind", f"unknown frame kind {str(kind)[:40]!r}")
    dtype = header.get("dtype")
    if dtype not in ITEMSIZE:
        raise FrameError("dtype", f"expected one of {sorted(ITEMSIZE)}, got {str(dtype)[:20]!r}")
    layer = _int(header.get("layer"), "layer", 0, bounds.layers - 1)
    _int(header.get("sample"), "sample", 0, 2**31 - 1)
    check_int64("step", header.get("step"))
    check_finite("time", header.get("time"))
    _name(header.get("role"), "role")
    raw_heads = header.get("heads")
    if not isinstance(raw_heads, list) or not raw_heads:
        raise FrameError("heads", "expected a non-empty list of head indices")
    heads = check_indices("heads", raw_heads, bounds.heads(layer), where=f"layer {layer}")
    shape = header.get("shape")
    h = len(heads)
    if kind == "qkv_norms":
        ok = isinstance(shape, list) and len(shape) == 3 and shape[:2] == [3, h]
        expected = f"(3, h, P) with h = {h} heads"
    elif kind == "head_stats" and isinstance(shape, list) and len(shape) == 2:
        # statistics reduced by the publisher (older publishers send the attention)
        ok = shape == [len(STREAM_STAT_NAMES), h]
        expected = f"({len(STREAM_STAT_NAMES)}, h) with h = {h} heads"
    else:
        ok = isinstance(shape, list) and len(shape) == 3 and shape[0] == h
        expected = f"(h, L, S) with h = {h} heads"
    if not ok:
        raise FrameError("shape", f"an {kind} frame has shape {expected}, got {str(shape)[:60]}")
    for side in shape[1:]:
        _int(side, "shape", 1, bounds.max_side)
    size = math.prod(shape) * ITEMSIZE[dtype]
    if size != payload_bytes:
        raise FrameError("shape", f"shape {shape} of {dtype} is {size} bytes; the payload has "
                         f"{payload_bytes}")
    _check_labels(header.get("labels"), shape)
    valid = header.get("valid")
    if valid is not None:
        if kind != "head_stats" or not isinstance(valid, list) or len(valid) != shape[1]:
            raise FrameError("valid", "expected null or, for head_stats, L key counts")
        for count in valid:
            _int(count, "valid", 0, shape[2])
    return tuple(shape)


def _check_labels(labels: Any, shape: list[int]) -> None:
    if labels is None:
        return
    if not isinstance(labels, list) or len(labels) != 2:
        raise FrameError("labels", "expected null or [query labels, key labels]")
    for axis, side in zip(labels, shape[1:], strict=True):
        if axis is None:
            continue
        _label_list(axis, "labels", side)


def _label_list(labels: Any, field: str, most: int) -> list[str]:
    if not isinstance(labels, list) or len(labels) > most or \
            any(not isinstance(x, str) or len(x) > MAX_LABEL for x in labels):
        raise FrameError(field, f"expected null or at most {most} strings of at most "
                         f"{MAX_LABEL} characters")
    return labels


def check_scalars(values: Any, field: str) -> dict[str, float]:
    """A step's ``{name: number | null}`` as floats (null: NaN, as the publisher sent NaN)."""
    if not isinstance(values, dict) or len(values) > MAX_SCALARS or any(
            not isinstance(k, str) or len(k) > MAX_NAME for k in values):
        raise FrameError(field, f"expected at most {MAX_SCALARS} names of at most {MAX_NAME} "
                         "characters, each mapped to a number or null")
    return {k: math.nan if v is None else check_finite(f"{field}.{k}", v)
            for k, v in values.items()}


def check_steps(steps: Any) -> list[list[Any]]:
    """A ``steps`` batch: ``[[step, time, {name: number|null}, batch|null, seq_len|null]]``."""
    if not isinstance(steps, list) or len(steps) > MAX_STEPS_BATCH:
        raise FrameError("steps", f"expected a list of at most {MAX_STEPS_BATCH} steps")
    for item in steps:
        if not isinstance(item, list) or len(item) != 5:
            raise FrameError("steps", "each step is [step, time, values, batch, seq_len]")
        step, t, values, batch, length = item
        check_int64("steps", step)
        check_finite("steps", t)
        check_scalars(values, "steps")
        _optional_int(batch, "steps", 1, 2**31 - 1)
        _optional_int(length, "steps", 0, 2**31 - 1)
    return steps


# -- history records ------------------------------------------------------------------

@dataclass(frozen=True)
class SessionRecord:
    """A checked ``history_session``: the publisher's session id, its name, and the
    metadata to store (the layout's keys taken from the announce)."""

    session: str
    name: str | None
    meta: dict[str, Any]

    @property
    def stat_rows(self) -> int:
        """R, the statistics per head of this session's rows."""
        return len(self.meta["stat_names"])


def check_session_id(value: Any, field: str = "session") -> str:
    if not isinstance(value, str) or SESSION_ID.fullmatch(value) is None:
        raise FrameError(field, "expected 1 to 64 letters, digits, '-' or '_'")
    return value


def check_history_session(bounds: RunBounds, message: dict[str, Any]) -> SessionRecord:
    """A ``history_session`` ``{session, name, meta}``: the metadata within
    ``max_meta_bytes`` with numbers that store, and what it says of the layout
    (``layers``, ``layer_heads``) the announce's."""
    session = check_session_id(message.get("session"))
    name = message.get("name")
    if name is not None:
        _name(name, "name")
    meta = message.get("meta")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise FrameError("meta", "expected an object")
    _json_size(meta, "meta", bounds.max_meta_bytes, "ATTNSCOPE_HISTORY_MAX_META_BYTES")
    check_numbers("meta", meta)
    if meta.get("layers", bounds.layers) != bounds.layers:
        raise FrameError("meta.layers", f"the announce has {bounds.layers} layers, the session "
                         f"{str(meta['layers'])[:20]}")
    said = meta.get("layer_heads")
    if said is not None and (not isinstance(said, list) or len(said) != bounds.layers or any(
            known is not None and h != known
            for h, known in zip(said, bounds.layer_heads, strict=True))):
        raise FrameError("meta.layer_heads", "expected the announced heads of each layer")
    names = tuple(meta.get("stat_names") or STAT_NAMES)
    if names not in STAT_LAYOUTS:
        raise FrameError("meta.stat_names", f"expected {list(HEAD_STATISTICS)}")
    for key, most in (("every", 2**31 - 1), ("probe_samples", bounds.probe_samples)):
        _optional_int(meta.get(key), f"meta.{key}", 1, most)
    heads = list(bounds.layer_heads)
    layout = {"layers": bounds.layers, "heads": max((h or 0 for h in heads), default=0),
              "layer_heads": heads, "roles": list(bounds.roles) or ["self"] * bounds.layers,
              "stat_names": list(names)}
    return SessionRecord(session, name, {**meta, **layout})


def check_history_stats(bounds: RunBounds, header: dict[str, Any], payload: bytes | memoryview,
                        stat_rows: int) -> tuple[str, list[StatRow]]:
    """A ``history_stats`` message: (the publisher's session id, its rows), each row's
    statistics (layers, R, H) float32 with ``R = stat_rows`` and H at most the widest
    layer's heads, one after another in ``payload``."""
    session = check_session_id(header.get("session"))
    rows = header.get("rows")
    if not isinstance(rows, list) or len(rows) > MAX_STAT_ROWS:
        raise FrameError("rows", f"expected a list of at most {MAX_STAT_ROWS} rows")
    out, offset = [], 0
    for i, row in enumerate(rows):
        where = f"rows.{i}"
        if not isinstance(row, list) or len(row) != 4:
            raise FrameError(where, "each row is [step, time, scalars, shape]")
        step, t, scalars, shape = row
        heads = None
        if shape is not None:
            if not isinstance(shape, list) or len(shape) != 3 or \
                    shape[:2] != [bounds.layers, stat_rows]:
                raise FrameError(f"{where}.shape", f"expected [{bounds.layers}, {stat_rows}, H] "
                                 f"(layers, statistics, heads), got {str(shape)[:60]}")
            _int(shape[2], f"{where}.shape", 1, bounds.widest)
            count = math.prod(shape)
            if offset + 4 * count > len(payload):
                raise FrameError("payload", f"{len(payload)} bytes, too few for the rows' shapes")
            heads = np.frombuffer(payload, "<f4", count, offset).reshape(shape).copy()
            offset += 4 * count
        out.append(StatRow(check_int64(f"{where}.step", step),
                           check_finite(f"{where}.time", t),
                           check_scalars(scalars, f"{where}.scalars"), heads))
    if offset != len(payload):
        raise FrameError("payload", f"{len(payload)} bytes for {offset} bytes of rows")
    return session, out


# A snapshot's tensors: name prefix -> (dtype, shape after P given the layer's heads H).
_SNAPSHOT_TENSORS = {"attention": ("float16", "(P, H, L, S)"),
                     "repeat_scores": ("float32", "(P, 2, H)")}


def check_history_snapshot(bounds: RunBounds, header: dict[str, Any],
                           payload: bytes | memoryview) -> tuple[
        str, int, float, dict[str, np.ndarray], list[str] | None]:
    """A ``history_snapshot`` message: (the publisher's session id, step, time, tensors,
    probe labels); the payload a safetensors file of ``attention.<layer>`` (P, H, L, S)
    float16 and ``repeat_scores.<layer>`` (P, 2, H) float32, at least one attention."""
    session = check_session_id(header.get("session"))
    step = check_int64("step", header.get("step"))
    t = check_finite("time", header.get("time"))
    labels = header.get("labels")
    if labels is not None:
        _label_list(labels, "labels", bounds.max_side)
        _json_size(labels, "labels", bounds.max_meta_bytes, "ATTNSCOPE_HISTORY_MAX_META_BYTES")
    try:
        tensors = safetensors.numpy.load(bytes(payload))
    except SafetensorError as exc:
        raise FrameError("payload", f"not a safetensors file: {str(exc)[:100]}") from None
    if not any(name.startswith("attention.") for name in tensors):
        raise FrameError("tensors", "expected attention.<layer> tensors")
    for name, array in tensors.items():
        _check_snapshot_tensor(bounds, name, array)
    return session, step, t, tensors, labels


def _check_snapshot_tensor(bounds: RunBounds, name: str, array: np.ndarray) -> None:
    kind, _, index = name.partition(".")
    if kind not in _SNAPSHOT_TENSORS or not index.isdigit() or str(int(index)) != index \
            or int(index) >= bounds.layers:
        raise FrameError("tensors", f"unknown tensor {name[:40]!r}: expected attention.<layer> "
                         f"or repeat_scores.<layer> with a layer below {bounds.layers}")
    layer = int(index)
    dtype, expected = _SNAPSHOT_TENSORS[kind]
    heads, side = bounds.heads(layer), min(bounds.max_side, bounds.snapshot_side)
    shape = array.shape
    if kind == "attention":  # (P, H, L, S)
        ok = len(shape) == 4 and all(1 <= s <= side for s in shape[2:])
        h = shape[1] if ok else 0
    else:  # (P, 2, H)
        ok = len(shape) == 3 and shape[1] == 2
        h = shape[2] if ok else 0
    # A layer of unknown head count is held to max_heads; a known one has all its heads.
    ok = ok and 1 <= shape[0] <= bounds.probe_samples and \
        (h == heads if bounds.layer_heads[layer] else 1 <= h <= heads)
    if array.dtype != np.dtype(dtype) or not ok:
        raise FrameError(f"tensors.{name}", f"expected {expected} {dtype} with P <= "
                         f"{bounds.probe_samples}, H = {heads} and sides <= {side}, got "
                         f"{list(shape)} {array.dtype}")
