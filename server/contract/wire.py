"""What publishers and the server say to each other on ``/ws/publish`` (docs/teams.md).

Publisher -> server: a JSON ``announce`` (run id, name, host, model, what captures
need to know of it, history), JSON ``steps`` batches, binary stream frames
(:func:`encode_capture`), results of capture requests (binary chunks of a
safetensors file, or a JSON ``capture_result`` with an error), JSON ``close``.
Server -> publisher: JSON ``welcome``, ``plan`` (:func:`plan_to_message`): what the
run's viewers subscribe to, so the publisher captures and sends only that, and
``capture`` requests (``POST /api/v1/captures`` naming the run; docs/teams.md).

Every binary message is the one envelope of :func:`attnscope.contract.protocol.pack` (uint32
header length, JSON header, payload), whose header's ``kind`` says what follows
(:func:`unpack_binary` checks it).

>>> plan = Plan(interval=0.1, sources=frozenset({("attn", 0)}), scalars=True,
...             needs={0: (SampleNeed(sample=0, attention=True, attention_heads=(1,)),)})
>>> back = plan_from_message(plan_to_message(plan))
>>> back == plan, back.needs[0][0].attention_heads
(True, (1,))
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch

from .plan import EMPTY_PLAN, Capture, Plan, SampleNeed
from .protocol import pack, unpack

WIRE_VERSION = 1
_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def plan_to_message(plan: Plan, with_sides: bool = False) -> dict[str, Any]:
    """A :class:`Plan` as JSON (its sources as ``[what, layer]`` pairs). Without
    ``with_sides`` (a remote publisher) no ``max_side``: views are sent at full resolution
    (the frame checks hold them to the run's L x S); the server's own training process
    pools them where they are computed."""
    return {
        "type": "plan", "interval": plan.interval, "scalars": plan.scalars,
        "sources": sorted(plan.sources),
        "needs": {str(layer): [{k: v for k, v in dataclasses.asdict(n).items()
                                if with_sides or k != "max_side"} for n in needs]
                  for layer, needs in plan.needs.items()},
    }


def _tuple(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(v) for v in value)


def plan_from_message(message: dict[str, Any]) -> Plan:
    """The inverse of :func:`plan_to_message`."""
    sources = frozenset((str(what), int(layer)) for what, layer in message.get("sources", []))
    needs = {}
    for layer, items in message.get("needs", {}).items():
        needs[int(layer)] = tuple(SampleNeed(
            sample=int(n["sample"]), attention=bool(n["attention"]),
            attention_heads=_tuple(n["attention_heads"]), logits=bool(n["logits"]),
            logits_heads=_tuple(n["logits_heads"]), stats=bool(n["stats"]),
            qkv=bool(n["qkv"]), qkv_heads=_tuple(n["qkv_heads"]),
            max_side=None if n.get("max_side") is None else int(n["max_side"])) for n in items)
    plan = Plan(interval=float(message.get("interval", 1.0)), sources=sources, needs=needs,
                scalars=bool(message.get("scalars", False)))
    return EMPTY_PLAN if plan.empty else plan


def unpack_binary(message: bytes) -> tuple[dict[str, Any], memoryview]:
    """A publisher's binary message: (header with a ``kind``, payload); ValueError if not."""
    header, payload = unpack(message)
    if not isinstance(header.get("kind"), str):
        raise ValueError("binary message header: expected a JSON object with a 'kind'")
    return header, payload


def encode_capture(cap: Capture, valid: torch.Tensor | None) -> bytes:
    """A published capture as one binary message (:func:`~attnscope.contract.protocol.pack`).

    ``valid`` (head_stats only): unmasked keys per query row (L,), or None.
    """
    data = cap.wait()
    dtype = "float16" if data.dtype == torch.float16 else "float32"
    array = data.to(torch.float16 if dtype == "float16" else torch.float32).numpy()
    header = {
        "kind": cap.kind, "layer": cap.layer, "sample": cap.sample, "heads": list(cap.heads),
        "role": cap.role, "time": cap.time, "step": cap.step, "dtype": dtype,
        "shape": list(array.shape),
        "labels": None if cap.labels is None else list(cap.labels),
        "valid": None if valid is None else [int(v) for v in valid.tolist()],
    }
    return pack(header, np.ascontiguousarray(array).astype(_DTYPES[dtype], copy=False).tobytes())


STREAM_KINDS = ("attention", "qk_logits", "qkv_norms", "head_stats")


def decode_capture(header: dict[str, Any], payload: memoryview) -> tuple[Capture, list[int] | None]:
    """The inverse of :func:`encode_capture`, from :func:`unpack_binary`'s parts:
    (capture without masks, valid key counts)."""
    kind = header["kind"]
    if kind not in STREAM_KINDS:
        raise ValueError(f"kind: unknown capture kind {kind!r}")
    dtype = _DTYPES[header["dtype"]]
    shape = [int(s) for s in header["shape"]]
    array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    labels = header.get("labels")
    cap = Capture(kind=kind, layer=int(header["layer"]), sample=int(header["sample"]),
                  heads=tuple(int(h) for h in header["heads"]),
                  data=torch.from_numpy(array.copy()), role=str(header["role"]),
                  time=float(header["time"]), step=int(header["step"]),
                  labels=None if labels is None else (labels[0], labels[1]))
    return cap, header.get("valid")


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
