"""The websocket protocol (docs/protocol.md): message models and the binary envelope.

Every binary message attnscope sends, to browsers (``/ws``) and from publishers
(``/ws/publish``), is one envelope (:func:`pack`): ``uint32 LE header length n |
n bytes of JSON header, space-padded so that 4 + n is a multiple of 8 | payload``.
A stream frame's payload is a raw C-order little-endian array (:func:`encode_frame`).

>>> import numpy as np
>>> header = {"kind": "attention", "dtype": "float16", "shape": [2, 2]}
>>> data = encode_frame(header, np.arange(4, dtype=np.float16).reshape(2, 2))
>>> len(data) % 8, decode_frame(data)[1].tolist()
(0, [[0.0, 1.0], [2.0, 3.0]])
"""

from __future__ import annotations

import json
import struct
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1
KINDS = ("attention", "qk_logits", "qkv_norms", "head_stats", "scalars", "head_roles")
MATRIX_KINDS = ("attention", "qk_logits")
BINARY_KINDS = ("attention", "qk_logits", "qkv_norms")
Kind = Literal["attention", "qk_logits", "qkv_norms", "head_stats", "scalars", "head_roles"]
DTYPES = {"float16": np.dtype("<f2"), "uint8": np.dtype("u1"), "float32": np.dtype("<f4")}


class Subscribe(BaseModel):
    """``{"type": "subscribe", ...}``: what one socket wants to receive (see docs/protocol.md)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["subscribe"]
    run: str = Field(min_length=1, max_length=200)
    kinds: list[Kind] = Field(default_factory=lambda: ["attention", "head_stats", "scalars"],
                              max_length=len(KINDS))
    layers: list[int] | None = Field(None, max_length=4096)
    heads: list[int] | None = Field(None, max_length=4096)
    sample: int = Field(0, ge=0, le=2**31 - 1)
    max_fps: float = Field(10.0, gt=0, le=60)
    max_side: int = Field(128, ge=4, le=1024)
    dtype: Literal["float16", "uint8"] = "float16"


class ProtocolError(ValueError):
    """An invalid client message; ``field`` names the offending field."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def to_message(self) -> dict[str, Any]:
        return {"type": "error", "field": self.field, "message": self.message}


def parse_subscribe(data: dict[str, Any]) -> Subscribe:
    """Validate a subscribe message; raise :class:`ProtocolError` naming the first bad field."""
    try:
        return Subscribe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(part) for part in err["loc"]]
        field = loc[0] if loc else None
        where = ".".join(loc)
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(Subscribe.model_fields)
            raise ProtocolError(field, f"unknown field {field!r}; allowed: {allowed}") from None
        raise ProtocolError(field, f"{where}: {err['msg']}") from None


def pack(header: dict[str, Any], payload: bytes | memoryview) -> bytes:
    """One binary message: uint32 header length, JSON ``header`` (padded), ``payload``.

    >>> header, payload = unpack(pack({"kind": "x"}, b"abc"))
    >>> header, bytes(payload), len(pack({"kind": "x"}, b"")) % 8
    ({'kind': 'x'}, b'abc', 0)
    """
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    raw += b" " * ((-4 - len(raw)) % 8)  # the payload starts 8-byte aligned
    return b"".join((struct.pack("<I", len(raw)), raw, payload))


def unpack(message: bytes) -> tuple[dict[str, Any], memoryview]:
    """The inverse of :func:`pack`: (header, payload); ``ValueError`` if malformed."""
    if len(message) < 4:
        raise ValueError("binary message shorter than its header length")
    (n,) = struct.unpack_from("<I", message, 0)
    if 4 + n > len(message):
        raise ValueError(f"binary message header of {n} bytes runs past the message")
    header = json.loads(message[4 : 4 + n])
    if not isinstance(header, dict):
        raise ValueError("binary message header: expected a JSON object")
    return header, memoryview(message)[4 + n :]


def encode_frame(header: dict[str, Any], array: np.ndarray) -> bytes:
    """Header + array bytes as one binary frame (the array is written C-order, little-endian)."""
    return pack(header, np.ascontiguousarray(array).tobytes())


def decode_frame(data: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """The inverse of :func:`encode_frame`: (header, array of ``header["shape"]``).

    uint8 frames are returned as bytes; apply ``offset + scale * byte`` to get values.
    """
    header, payload = unpack(data)
    array = np.frombuffer(payload, dtype=DTYPES[header["dtype"]]).reshape(header["shape"])
    return header, array


def dequantise(header: dict[str, Any], array: np.ndarray) -> np.ndarray:
    """float32 values of a decoded frame, whatever its dtype."""
    if header["dtype"] == "uint8":
        return header["offset"] + header["scale"] * array.astype(np.float32)
    return array.astype(np.float32)
