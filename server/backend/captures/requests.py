"""From a validated request to a stored capture: checks, input tensor, forward pass, store.

Every client mistake becomes a :class:`CaptureRejected` (the router answers it with its
HTTP status) whose detail has the shape of FastAPI's validation errors (``[{"loc":
["body", field], "msg", "type"}]``), so a client finds the field and the limit in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...contract.layout import ModelLayout
from ...core.capture import CaptureError, CaptureUnavailable, check_selection, estimate_bytes
from ...core.model_inputs import TextTokenizer, padding_mask
from ...core.run_base import BaseRun, RunStateError
from ..remote.run import RemoteRun
from .models import CaptureCreate
from .store import CaptureRecord, CaptureStore, StoreFull

logger = logging.getLogger(__name__)
MiB = 1 << 20


@dataclass(frozen=True)
class CaptureLimits:
    """Limits of one capture request; each default carries its reason."""

    # 64 sequences: a notebook's batch; larger batches belong in a training loop.
    max_batch: int = 64
    # 4096 positions: a 4096 x 4096 float32 matrix is 64 MiB per head, the most a
    # download should reasonably carry; models may accept fewer (their seq_len).
    max_length: int = 4096
    # 1 GiB of tensors per capture: what the 12-layer, 12-head model at L=512
    # needs for attention + qk_logits (~302 MiB) with room, far from filling a disk.
    max_capture_bytes: int = 1024 * MiB
    # 16 MiB request body: 4096 x 64 token ids as JSON is ~2 MiB; features at
    # L=512, d_model=768 are ~4 MiB. Larger bodies get 413 before parsing.
    max_body_bytes: int = 16 * MiB
    # 32 MiB of tensors for format=json (~3x that as text): past it, npz is the answer.
    max_json_bytes: int = 32 * MiB
    # 60 s to wait for the training thread to reach a step boundary.
    timeout_s: float = 60.0
    # 20 GiB of capture files in all (settings.max_capture_bytes); past it: 507.
    max_total_bytes: int = 20 * 1024 * MiB

    @classmethod
    def from_settings(cls, settings: Any) -> CaptureLimits:
        """Read ``captures_<field>`` attributes of the server settings where present
        (and ``max_capture_bytes``, the store's total budget)."""
        values = {f: getattr(settings, f"captures_{f}") for f in cls.__dataclass_fields__
                  if hasattr(settings, f"captures_{f}")}
        if hasattr(settings, "max_capture_bytes"):
            values["max_total_bytes"] = settings.max_capture_bytes
        return cls(**values)


class CaptureRejected(Exception):
    """A capture that cannot be taken: ``status`` is the HTTP status the router answers,
    ``detail`` a string or FastAPI's list of ``{"loc", "msg", "type"}``."""

    def __init__(self, status: int, detail: str | list[dict[str, Any]]) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    @property
    def message(self) -> str:
        """One line: the detail's messages, each after the field it names."""
        if isinstance(self.detail, str):
            return self.detail
        return "; ".join(f"{'.'.join(str(p) for p in d['loc'][1:])}: {d['msg']}"
                         for d in self.detail)


def field_error(loc: Sequence[str | int], msg: str, status: int = 422) -> CaptureRejected:
    """A :class:`CaptureRejected` shaped like FastAPI's validation errors, at ``["body", *loc]``.

    >>> field_error(["text"], "empty text").message
    'text: empty text'
    """
    detail = [{"loc": ["body", *loc], "msg": msg, "type": "value_error"}]
    return CaptureRejected(status, detail)


def tokenize(text: str, symbols: Sequence[str], loc: Sequence[str | int]) -> list[int]:
    """Text -> token ids: symbols separated by whitespace, else one symbol per character.

    >>> tokenize("ABBA", ["A", "B"], ["text"]), tokenize("A #62", ["A", "#62"], ["text"])
    ([0, 1, 1, 0], [0, 1])
    """
    index = {s: i for i, s in enumerate(symbols)}
    parts = text.split() if any(c.isspace() for c in text.strip()) else list(text.strip())
    ids = []
    for part in parts:
        if part not in index:
            shown = " ".join(symbols[:40]) + (" ..." if len(symbols) > 40 else "")
            raise field_error(loc, f"unknown symbol {part[:20]!r}; this run's symbols: {shown}")
        ids.append(index[part])
    return ids


def _check_rows(rows: list[list], field: str, limits: CaptureLimits, info: ModelLayout) -> int:
    """Check a batch is non-empty, rectangular and within limits; return L."""
    if not rows:
        raise field_error([field], "empty input: give at least one sequence")
    if len(rows) > limits.max_batch:
        raise field_error([field], f"batch of {len(rows)} is over the limit of "
                          f"{limits.max_batch} sequences")
    length = len(rows[0])
    for i, row in enumerate(rows):
        if not row:
            raise field_error([field, i], "empty sequence: give at least one position")
        if len(row) != length:
            raise field_error([field, i], f"sequence {i} has length {len(row)}, sequence 0 "
                              f"has {length}: all sequences must have one length")
    max_len = min(limits.max_length, info.max_len or limits.max_length)
    if length > max_len:
        raise field_error([field], f"length {length} is over the limit of {max_len} positions")
    return length


def prepare_input(body: CaptureCreate, info: ModelLayout, symbols: list[str] | None,
                  limits: CaptureLimits,
                  tokenizer: TextTokenizer | None = None,
                  ) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """The input tensor (N, L) long or (N, L, d_model) float, the body field it came
    from, and its attention mask (N, L) (None: nothing padded). ``text`` goes through
    the run's ``tokenizer`` when it has one (texts of different lengths right-padded,
    masked), else through ``symbols``; token rows holding the tokenizer's pad token
    are masked there."""
    if body.features is not None:
        if info.vocab_size is not None:
            raise field_error(["features"], "this run's model reads token ids "
                              f"(vocabulary of {info.vocab_size}); send tokens instead")
        _check_rows(body.features, "features", limits, info)
        for i, row in enumerate(body.features):
            for j, vec in enumerate(row):
                if len(vec) != info.d_model:
                    raise field_error(["features", i, j], f"feature vector of length {len(vec)}; "
                                      f"the model's d_model is {info.d_model}")
        return torch.tensor(body.features, dtype=torch.float32), "features", None
    field = "tokens" if body.tokens is not None else "text"
    if info.vocab_size is None:
        raise field_error([field], "this run's model does not read token ids (it has no "
                          f"nn.Embedding); send features (N, L, {info.d_model}) instead")
    mask = None
    if body.tokens is not None:
        rows = body.tokens
    elif tokenizer is not None:
        texts = [body.text] if isinstance(body.text, str) else body.text
        ids, mask = tokenizer.encode(texts)
        rows = ids.tolist()
    elif symbols is None:
        raise field_error(["text"], "this run has no tokenizer (no symbols); send tokens instead")
    else:
        texts = [body.text] if isinstance(body.text, str) else body.text
        rows = [tokenize(t, symbols, ["text", i] if len(texts) > 1 else ["text"])
                for i, t in enumerate(texts)]
    _check_rows(rows, field, limits, info)
    for i, row in enumerate(rows):
        for j, token in enumerate(row):
            if token >= info.vocab_size:
                raise field_error([field, i, j], f"token id {token} is out of the vocabulary: "
                                  f"ids must be in [0, {info.vocab_size - 1}]")
    x = torch.tensor(rows, dtype=torch.long)
    if mask is None and tokenizer is not None:
        mask = padding_mask(x, tokenizer.pad_id)
    return x, field, mask


def resolve_labels(body: CaptureCreate, shape: tuple[int, ...], tokens: torch.Tensor | None,
                   symbols: list[str] | None,
                   tokenizer: TextTokenizer | None = None) -> list[list[str]] | None:
    """Position labels (N lists of L strings): the body's, else the run's tokenizer's or
    symbols', else None."""
    n, length = shape[0], shape[1]
    labels = body.labels
    if labels is None:
        if tokens is not None and tokenizer is not None:
            return [tokenizer.labels(row) for row in tokens]
        if tokens is None or symbols is None:
            return None
        return [[symbols[t] if t < len(symbols) else str(t) for t in row]
                for row in tokens.tolist()]
    if all(isinstance(x, str) for x in labels):
        if len(labels) != length:
            raise field_error(["labels"], f"{len(labels)} labels for {length} positions")
        return [list(labels) for _ in range(n)]
    if len(labels) != n or any(len(row) != length for row in labels):
        raise field_error(["labels"], f"labels must be {length} strings or {n} lists of "
                          f"{length} strings, one per position")
    return [list(row) for row in labels]


def _layout(body: CaptureCreate, run: BaseRun) -> ModelLayout:
    try:
        layout = run.capture_layout()
    except RunStateError as exc:
        raise field_error(["run"], str(exc), status=409) from None
    if layout is None:
        raise field_error(["run"], f"run {body.run!r} is published from another process "
                          "whose publisher did not describe its model (an older attnscope "
                          "on the training side): update it to capture", status=409)
    return layout


def create_capture(body: CaptureCreate, run: BaseRun, store: CaptureStore,
                   limits: CaptureLimits, extra_meta: dict[str, Any] | None = None,
                   ) -> CaptureRecord:
    """Validate ``body`` against ``run``'s model, capture between steps, store the result
    (its metadata gets ``extra_meta``, such as the heads' roles).

    A run published with ``Dashboard.connect`` has its model in the training
    process: the capture runs there, between two of its steps, and comes back here;
    so does its ``text``, when the publisher has a tokenizer (``tokenizer=``).
    """
    info = _layout(body, run)
    if _tokenized_there(body, run):
        return _remote_text_capture(body, run, info, store, limits, extra_meta)
    symbols = run.symbols or None
    tokenizer = run.tokenizer  # a local run's; a remote run has none
    x, field, mask = prepare_input(body, info, symbols, limits, tokenizer)
    tokens = x if x.dtype == torch.long else None
    labels = resolve_labels(body, tuple(x.shape), tokens, symbols, tokenizer)
    layers, heads, kinds = _selection(body, info)
    expected = estimate_bytes(info, x.shape[0], x.shape[1], kinds, layers, heads)
    if expected > limits.max_capture_bytes:
        raise field_error([field], f"the capture would hold about {expected} bytes, over the "
                          f"limit of {limits.max_capture_bytes}: ask for fewer kinds, layers, "
                          "heads or positions")
    masked = {} if mask is None else {"attention_mask": mask}  # only a local run's

    def forward() -> tuple[dict[str, Any], int | None]:
        return run.capture(x, kinds, layers, heads, limits.max_capture_bytes,
                           limits.timeout_s, **masked)

    try:  # the budget is checked before the forward pass; only reserve() raises StoreFull
        with store.reserve(expected + x.numel() * 8, limits.max_total_bytes):
            arrays, step = _captured(body, forward, field, limits)
            if tokens is not None:
                arrays["tokens"] = tokens.numpy()  # (N, L)
            return _save(body, store, arrays, step, kinds, layers, heads, field,
                         list(x.shape), labels, info, extra_meta)
    except StoreFull as exc:
        raise CaptureRejected(507, str(exc)) from None


def _selection(body: CaptureCreate, info: ModelLayout,
               ) -> tuple[list[int], list[int] | None, list[str]]:
    try:
        layers, heads = check_selection(info, body.layers, body.heads)
    except CaptureError as exc:
        raise field_error([exc.field], exc.message) from None
    return layers, heads, list(dict.fromkeys(body.kinds))


def _remote_text_capture(body: CaptureCreate, run: RemoteRun, info: ModelLayout,
                         store: CaptureStore, limits: CaptureLimits,
                         extra_meta: dict[str, Any] | None) -> CaptureRecord:
    """``text`` of a remote run whose publisher tokenizes it: the texts travel to the
    training process, the token ids (N, L) come back with the tensors."""
    texts = _texts(body, limits)
    layers, heads, kinds = _selection(body, info)
    # The length is known once tokenized there: reserve for about 3 bytes a token here;
    # the publisher checks the real size against max_capture_bytes before keeping it.
    guess = min(limits.max_length, max(len(t.encode()) for t in texts) // 3 + 2)
    expected = estimate_bytes(info, len(texts), guess, kinds, layers, heads)

    def forward() -> tuple[dict[str, Any], int | None]:
        return run.capture_text(texts, kinds, layers, heads, limits.max_capture_bytes,
                                limits.timeout_s)

    try:
        with store.reserve(expected, limits.max_total_bytes):
            arrays, step = _captured(body, forward, "text", limits)
            ids = arrays.get("tokens")
            if ids is None or ids.ndim != 2 or ids.shape[0] != len(texts):
                raise CaptureRejected(502, "the publisher's text capture came back without "
                                           "its token ids")
            tokens = torch.from_numpy(ids.astype("int64"))
            labels = resolve_labels(body, tuple(tokens.shape), tokens, run.symbols or None)
            return _save(body, store, arrays, step, kinds, layers, heads, "text",
                         list(tokens.shape), labels, info, extra_meta)
    except StoreFull as exc:
        raise CaptureRejected(507, str(exc)) from None


def _texts(body: CaptureCreate, limits: CaptureLimits) -> list[str]:
    """``body.text`` as a list of 1 to ``max_batch`` texts, none empty."""
    texts = [body.text] if isinstance(body.text, str) else list(body.text or [])
    if not texts or len(texts) > limits.max_batch:
        raise field_error(["text"], f"give 1 to {limits.max_batch} texts")
    for i, text in enumerate(texts):
        if not text.strip():
            raise field_error(["text", i] if len(texts) > 1 else ["text"], "empty text")
    return texts


def check_input(body: CaptureCreate, run: BaseRun, limits: CaptureLimits) -> None:
    """Check ``body`` against ``run`` as :func:`create_capture` does, without the forward
    pass: raises :class:`CaptureRejected`. Text that a remote run's publisher tokenizes is
    only checked for emptiness here (the rest there, at its capture)."""
    info = _layout(body, run)
    _selection(body, info)
    if _tokenized_there(body, run):
        _texts(body, limits)
        return
    prepare_input(body, info, run.symbols or None, limits, run.tokenizer)


def input_of(run: BaseRun, limits: CaptureLimits) -> dict[str, Any]:
    """What input a capture of ``run`` takes (the fields of ``CaptureInput``): none, with
    the reason as ``message``, when it cannot capture at all (it has ended, its
    publisher is away)."""
    try:
        info = _layout(CaptureCreate(run=run.id, tokens=[[0]]), run)
    except CaptureRejected as exc:
        return {"run": run.id, "text": False, "tokens": False, "features": False,
                "vocab_size": None, "d_model": None, "max_length": 0,
                "message": "; ".join(d["msg"] for d in exc.detail)}
    tokens = info.vocab_size is not None
    text = tokens and (run.tokenizer is not None or bool(run.symbols)
                       or (isinstance(run, RemoteRun) and run.text_captures))
    message = None
    if not tokens:
        message = (f"this run's model does not read token ids (it has no nn.Embedding): "
                   f"its captures take features (N, L, {info.d_model}), not text")
    elif not text:
        message = ("this run has no tokenizer (give Dashboard.start / connect a tokenizer=): "
                   f"type token ids instead, numbers in [0, {info.vocab_size - 1}]")
    return {"run": run.id, "text": text, "tokens": tokens, "features": not tokens,
            "vocab_size": info.vocab_size, "d_model": info.d_model,
            "max_length": min(limits.max_length, info.max_len or limits.max_length),
            "message": message}


def _tokenized_there(body: CaptureCreate, run: BaseRun) -> bool:
    """Whether ``body.text`` goes to a remote run's publisher to be tokenized."""
    return body.text is not None and run.tokenizer is None and isinstance(run, RemoteRun) \
        and run.text_captures


def _captured(body: CaptureCreate, forward: Any, field: str,
              limits: CaptureLimits) -> tuple[dict[str, Any], int | None]:
    """``forward()`` (here or in a publisher's process), its failures as HTTP errors."""
    try:
        return forward()
    except TimeoutError:
        raise CaptureRejected(503, f"run {body.run!r} did not reach a step boundary within "
                              f"{limits.timeout_s:g} s; try again") from None
    except CaptureError as error:
        raise field_error([error.field if error.field != "tokens" else field],
                          error.message) from None
    except (ValueError, IndexError) as error:
        raise field_error([field], f"the model rejected this input: {error}") from None
    except RunStateError as error:
        raise field_error(["run"], str(error), status=409) from None
    except CaptureUnavailable as error:
        raise CaptureRejected(502, str(error)) from None


def _save(body: CaptureCreate, store: CaptureStore, arrays: dict[str, Any], step: int | None,
          kinds: list[str], layers: list[int], heads: list[int] | None, field: str,
          shape: list[int], labels: list[list[str]] | None, info: ModelLayout,
          extra_meta: dict[str, Any] | None) -> CaptureRecord:
    meta = {
        "step": step,
        "kinds": kinds,
        "layers": layers,
        "heads": heads,
        "input": {"kind": "text" if body.text is not None else field, "shape": shape},
        "labels": labels,
        "text": body.text,
        # self or cross per layer: a cross-attention's keys are not the input's tokens
        "roles": [site.role for site in info.sites],
        **(extra_meta or {}),
    }
    return store.save(arrays, run=body.run, name=body.name, meta=meta)
