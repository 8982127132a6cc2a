"""Captures of remote runs (``POST /api/v1/captures`` naming a ``Dashboard.connect`` run).

The model is in the training process, so the capture runs there. Both ends live here:

- server: :class:`CaptureRequests` sends a ``capture`` message over the run's
  ``/ws/publish`` connection and waits for the answer; the result arrives as
  binary chunks of one safetensors file (each under the smallest publish-message
  limit), which it puts back together; errors arrive as a JSON
  ``capture_result`` and are raised as the exceptions a local capture raises;
- publisher: :func:`answer_capture` runs the request in the training thread
  between two steps (as a local capture does) and returns the messages that
  answer it, encoded off the training thread.

>>> info = model_info_from_message({"vocab_size": 10, "d_model": 8, "max_len": None,
...                                 "layers": [{"name": "a", "heads": 2}], "symbols": None})
>>> info.n_layers, info.n_heads, info.vocab_size, info.d_model
(1, 2, 10, 8)
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from ..core.capture import CaptureError, CaptureTooLarge, CaptureUnavailable
from ..core.model_inputs import TextTokenizer
from .layout import ModelLayout
from .protocol import pack

logger = logging.getLogger(__name__)

# Each chunk of a result stays under the smallest publish-message limit the server
# accepts (ATTNSCOPE_MAX_PUBLISH_BYTES >= 1 MiB), with room for its header.
CHUNK_BYTES = 960 * 1024
# A safetensors file is its tensors plus a JSON header of names, shapes and offsets.
HEADER_ALLOWANCE = 1 << 20
# After the training thread's step boundary, this long for the result to travel.
TRANSFER_GRACE_S = 30.0


# -- what the server knows of the remote model -----------------------------------

def model_info_message(layout: ModelLayout, symbols: Sequence[str] | None,
                       tokenizer: TextTokenizer | None = None) -> dict[str, Any]:
    """What captures need to know of a model (the ``capture`` of a publisher's announce).
    With a ``tokenizer``: ``text: true`` (the publisher tokenizes captures given as text)
    and, unless ``symbols`` are given, its decoded vocabulary as the symbols the server
    labels token ids with (``" the"``, not ``"Ġthe"``)."""
    if symbols is None and tokenizer is not None:
        symbols = tokenizer.vocabulary()
    return {"vocab_size": layout.vocab_size, "d_model": layout.d_model,
            "max_len": layout.max_len,
            "layers": [{"name": s.name, "heads": s.heads} for s in layout.sites],
            "symbols": None if symbols is None else list(symbols),
            "text": tokenizer is not None}


def model_info_from_message(message: dict[str, Any]) -> ModelLayout:
    """The inverse of :func:`model_info_message`: the layout captures check requests by."""
    return ModelLayout.from_message(message)


# -- server end --------------------------------------------------------------------

@dataclass
class _Pending:
    future: Future = field(default_factory=Future)
    started: threading.Event = field(default_factory=threading.Event)
    max_total: int = 0
    buffer: bytearray | None = None
    step: int | None = None  # the publisher's last step when the capture ran


class CaptureRequests:
    """Capture requests sent to one remote run's publisher, waiting for their answers.

    :meth:`request` is called from a request thread; :meth:`receive_chunk`,
    :meth:`receive_error` and :meth:`fail_all` from the connection's event loop.
    """

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def request(self, send: Callable[[dict[str, Any]], None], request: dict[str, Any],
                max_bytes: int, timeout: float, acknowledged: bool = False,
                ) -> tuple[dict[str, np.ndarray], int | None]:
        """Send ``request`` with ``send`` and wait for its tensors: (name -> array, the
        publisher's last step when the capture ran). ``acknowledged``: the other end says
        ``capture_started`` (:meth:`started`) when it runs it, so a request nobody starts
        within ``timeout`` fails then (the request carries its ``deadline``, a
        ``time.monotonic()`` value of this machine, past which it is not run).

        Raises what a local capture raises: :class:`CaptureError` (a field's
        fault), ``ValueError`` (the model rejected the input), ``TimeoutError``
        (no step boundary within ``timeout`` s), and :class:`CaptureUnavailable`
        (the publisher failed or disconnected).
        """
        capture_id = uuid.uuid4().hex
        pending = _Pending(max_total=max_bytes + HEADER_ALLOWANCE)
        with self._lock:
            self._pending[capture_id] = pending
        try:
            send({"type": "capture", "id": capture_id, "max_bytes": max_bytes,
                  "timeout": timeout, "deadline": time.monotonic() + timeout, **request})
            if acknowledged and not pending.started.wait(timeout) \
                    and not pending.future.done():
                raise TimeoutError(f"the training thread did not reach a step boundary in "
                                   f"{timeout:g} s (is the training loop still calling step()?)")
            if not wait([pending.future], timeout + TRANSFER_GRACE_S).done:
                raise TimeoutError(f"the publisher did not answer within {timeout:g} s "
                                   "(is its training loop still calling step()?)")
            raw = pending.future.result()  # or what the publisher raised
        finally:
            with self._lock:
                self._pending.pop(capture_id, None)
        try:
            return safetensors.numpy.load(bytes(raw)), pending.step
        except Exception as exc:
            raise CaptureUnavailable(f"the publisher sent a result that does not parse: "
                                     f"{exc}") from None

    def _take(self, capture_id: Any) -> _Pending | None:
        with self._lock:
            return self._pending.get(str(capture_id))

    def started(self, capture_id: Any) -> None:
        """The other end started running request ``capture_id``."""
        pending = self._take(capture_id)
        if pending is not None:
            pending.started.set()

    def receive_chunk(self, header: dict[str, Any], payload: memoryview) -> None:
        """One binary ``capture_result`` chunk: ``{id, offset, total, step}`` and its bytes."""
        pending = self._take(header.get("id"))
        if pending is None or pending.future.done():
            return  # a request that timed out or failed already
        total, offset = int(header["total"]), int(header["offset"])
        if pending.buffer is None:
            if total > pending.max_total:
                pending.future.set_exception(CaptureTooLarge(
                    "tokens", f"the capture holds {total} bytes, over the limit of "
                    f"{pending.max_total - HEADER_ALLOWANCE}"))
                return
            pending.buffer = bytearray()
            step = header.get("step")
            pending.step = int(step) if isinstance(step, int) else None
        if offset != len(pending.buffer) or offset + len(payload) > total:
            pending.future.set_exception(CaptureUnavailable(
                f"the publisher's result arrived out of order (chunk at {offset}, "
                f"expected {len(pending.buffer)} of {total})"))
            return
        pending.buffer += payload
        if len(pending.buffer) == total:
            pending.future.set_result(pending.buffer)

    def receive_error(self, message: dict[str, Any]) -> None:
        """A JSON ``capture_result`` with ``error: {kind, field, message}``."""
        pending = self._take(message.get("id"))
        if pending is None or pending.future.done():
            return
        error = message.get("error") or {}
        kind, text = error.get("kind"), str(error.get("message", "unknown error"))
        exc: Exception
        if kind == "capture":
            exc = CaptureError(str(error.get("field") or "tokens"), text)
        elif kind == "input":
            exc = ValueError(text)
        elif kind == "timeout":
            exc = TimeoutError(text)
        else:
            exc = CaptureUnavailable(f"the publisher's capture failed: {text}")
        pending.future.set_exception(exc)

    def fail_all(self, reason: str) -> None:
        """The connection is gone: every waiting request fails with ``reason``."""
        with self._lock:
            waiting = list(self._pending.values())
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(CaptureUnavailable(reason))


# -- publisher end -----------------------------------------------------------------

def capture_request_input(message: dict[str, Any], tokenizer: Any = None,
                          ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The input of a capture request: tokens (N, L) long or features (N, L, d), its
    attention mask (N, L) (None: nothing padded), and whether it came as text (tokenized
    here by ``tokenizer``, a :class:`~attnscope.core.model_inputs.TextTokenizer`)."""
    given = message.get("input") or {}
    mask = given.get("attention_mask")
    mask = None if mask is None else torch.tensor(mask, dtype=torch.long)
    if given.get("tokens") is not None:
        return torch.tensor(given["tokens"], dtype=torch.long), mask, False
    if given.get("features") is not None:
        return torch.tensor(given["features"], dtype=torch.float32), mask, False
    if given.get("text") is not None:
        if tokenizer is None:
            raise CaptureError("text", "this run's publisher has no tokenizer; send tokens")
        ids, mask = tokenizer.encode([str(t) for t in given["text"]])
        return ids, mask, True
    raise CaptureError("tokens", "the capture request has neither tokens, text nor features")


def classify_capture_error(exc: BaseException) -> tuple[str, str | None, str]:
    """(kind, field, message) of a capture's failure, as the server re-raises it
    (:meth:`CaptureRequests.receive_error`): ``capture`` (a field's fault), ``timeout``,
    ``input`` (the model rejected the input) or ``failed``."""
    if isinstance(exc, CaptureError):
        return "capture", exc.field, exc.message
    if isinstance(exc, TimeoutError):
        return "timeout", None, str(exc)
    if isinstance(exc, ValueError | IndexError):
        return "input", None, str(exc)
    return "failed", None, f"{type(exc).__name__}: {exc}"


def _error(capture_id: str, kind: str, message: str, field_name: str | None = None) -> str:
    return json.dumps({"type": "capture_result", "id": capture_id,
                       "error": {"kind": kind, "field": field_name, "message": message}})


def answer_capture(run: Any, message: dict[str, Any]) -> list[bytes | str]:
    """Serve one ``capture`` request; returns the messages that answer it, in order.

    Blocks the calling (background) thread until the training thread reaches a
    step boundary and runs the forward pass there; encoding happens here, never
    in the training thread.
    """
    capture_id = str(message.get("id"))
    try:
        x, mask, text = capture_request_input(message, run.tokenizer)
        kinds = [str(k) for k in message.get("kinds", [])]
        layers, heads = message.get("layers"), message.get("heads")
        max_bytes = int(message["max_bytes"])

        masked = {} if mask is None else {"attention_mask": mask}
        out, step = run.capture(x, kinds, layers, heads, max_bytes,
                                float(message.get("timeout", 60.0)), **masked)
        if text:  # the server labels the positions from these ids
            out["tokens"] = x.numpy()
        data = safetensors.numpy.save(out)
    except Exception as exc:  # noqa: BLE001 (reported to the server, which answers 4xx/5xx)
        kind, field_name, text = classify_capture_error(exc)
        if kind == "failed":
            logger.exception("capture %s for run %r failed", capture_id, run.id)
        return [_error(capture_id, kind, text, field_name)]
    view = memoryview(data)
    return [pack({"kind": "capture_result", "id": capture_id, "offset": offset,
                         "total": len(data), "step": step}, view[offset : offset + CHUNK_BYTES])
            for offset in range(0, len(data), CHUNK_BYTES)]
