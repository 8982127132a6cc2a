"""What a publisher may say: its announce within the server's bounds, its frames within
the layout it announced. Checked on arrival, before anything reaches a run or a slot.

A frame is checked against its header *and* the run: kind, dtype, layer, heads (each
once, each below the layer's head count), shape (h, L, S) or (3, h, P) with h heads,
sides within the announced bounds, payload length, labels and valid-key counts.
Anything else raises :class:`FrameError`; the endpoint answers the publisher with an
``error`` and drops the frame, so viewers never see it.

>>> limits = AnnounceLimits(max_layers=4, max_heads=8, max_seq_len=64)
>>> header = {"kind": "attention", "layer": 0, "sample": 0, "heads": [0, 1], "role": "self",
...           "time": 1.0, "step": 3, "dtype": "float16", "shape": [2, 4, 4]}
>>> check_frame_header(header, 32 * 2, [2], limits)
(2, 4, 4)
>>> try:
...     check_frame_header({**header, "shape": [8, 8]}, 64 * 2, [2], limits)
... except FrameError as exc:
...     exc.field, exc.message
('shape', 'an attention frame has shape (h, L, S) with h = 2 heads, got [8, 8]')
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..limits import LimitError, check_indices
from ..stream.roles import PATTERN_NAMES
from ..stream.stats import STAT_NAMES

STREAM_STAT_NAMES = STAT_NAMES + PATTERN_NAMES  # the rows of a head_stats frame

STREAM_KINDS = ("attention", "qk_logits", "qkv_norms", "head_stats")
ITEMSIZE = {"float16": 2, "float32": 4}
MAX_NAME = 256  # layer names, roles, attention types: shown on the page
MAX_CONFIG_BYTES = 64 * 1024  # the run's config, echoed in every run listing
MAX_LABEL = 64  # a token label, as the captures API allows
MAX_STEPS_BATCH = 4096  # a publisher queues at most this many steps (MAX_PENDING_STEPS)


class FrameError(ValueError):
    """A publisher message that does not fit the protocol or the run's layout."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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


def check_announce(model: dict[str, Any], config: dict[str, Any],
                   capture: dict[str, Any] | None, limits: AnnounceLimits) -> list[int | None]:
    """Raise :class:`FrameError` unless the announce's model fits ``limits``; return the
    heads of each layer (None: unknown)."""
    layers = model.get("layer_details")
    if not isinstance(layers, list) or not 1 <= len(layers) <= limits.max_layers:
        raise FrameError("model.layer_details", f"expected a list of 1 to {limits.max_layers} "
                         "layers (ATTNSCOPE_MAX_REMOTE_LAYERS)")
    heads: list[int | None] = []
    for i, layer in enumerate(layers):
        where = f"model.layer_details.{i}"
        if not isinstance(layer, dict):
            raise FrameError(where, "expected an object")
        heads.append(_optional_int(layer.get("heads"), f"{where}.heads", 1, limits.max_heads))
        for key in ("name", "role", "attention_type"):
            if key in layer:
                _name(layer[key], f"{where}.{key}")
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
    return heads


def check_frame_header(header: dict[str, Any], payload_bytes: int,
                       layer_heads: Sequence[int | None], limits: AnnounceLimits) -> tuple[
        int, ...]:
    """The frame's shape, after checking ``header`` against the run and its payload."""
    kind = header.get("kind")
    if kind not in STREAM_KINDS:
        raise FrameError("kind", f"unknown frame kind {str(kind)[:40]!r}")
    dtype = header.get("dtype")
    if dtype not in ITEMSIZE:
        raise FrameError("dtype", f"expected one of {sorted(ITEMSIZE)}, got {str(dtype)[:20]!r}")
    layer = _int(header.get("layer"), "layer", 0, len(layer_heads) - 1)
    _int(header.get("sample"), "sample", 0, 2**31 - 1)
    _int(header.get("step"), "step", -(2**63), 2**63 - 1)
    t = header.get("time")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise FrameError("time", "expected a finite number")
    _name(header.get("role"), "role")
    n_heads = layer_heads[layer] or limits.max_heads
    raw_heads = header.get("heads")
    if not isinstance(raw_heads, list) or not raw_heads:
        raise FrameError("heads", "expected a non-empty list of head indices")
    try:
        heads = check_indices("heads", raw_heads, n_heads, where=f"layer {layer}")
    except LimitError as exc:
        raise FrameError(exc.field, exc.message) from None
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
        _int(side, "shape", 1, limits.max_seq_len)
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
        if not isinstance(axis, list) or len(axis) > side or \
                any(not isinstance(x, str) or len(x) > MAX_LABEL for x in axis):
            raise FrameError("labels", f"expected null or at most {side} strings of at most "
                             f"{MAX_LABEL} characters per axis")


def check_steps(steps: Any) -> list[list[Any]]:
    """A ``steps`` batch: ``[[step, time, {name: number|null}, batch|null, seq_len|null]]``."""
    if not isinstance(steps, list) or len(steps) > MAX_STEPS_BATCH:
        raise FrameError("steps", f"expected a list of at most {MAX_STEPS_BATCH} steps")
    for item in steps:
        if not isinstance(item, list) or len(item) != 5:
            raise FrameError("steps", "each step is [step, time, values, batch, seq_len]")
        step, t, values, batch, length = item
        _int(step, "steps", -(2**63), 2**63 - 1)
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise FrameError("steps", "a step's time must be a finite number")
        if not isinstance(values, dict) or len(values) > 256 or any(
                not isinstance(k, str) or len(k) > MAX_NAME or not (
                    v is None or (isinstance(v, int | float) and not isinstance(v, bool)))
                for k, v in values.items()):
            raise FrameError("steps", "a step's values map at most 256 names to numbers")
        _optional_int(batch, "steps", 1, 2**31 - 1)
        _optional_int(length, "steps", 0, 2**31 - 1)
    return steps
