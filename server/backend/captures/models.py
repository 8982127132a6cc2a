"""Request and response models of the captures API (separate in and out models)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...core.limits import Finite
from ..history.models import HeadPublic

Kind = Literal["attention", "qkv", "qk_logits", "intermediate"]
Format = Literal["npz", "safetensors", "json"]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Index = Annotated[int, Field(ge=0, le=65535)]
Label = Annotated[str, Field(max_length=64)]
Feature = Finite  # NaN, Infinity and 1e999 are 422 (limits.check_finite)


class CaptureCreate(BaseModel):
    """What to capture: a run, one input (``tokens``, ``text`` or ``features``), a selection.

    ``tokens`` is a batch of token-id lists, all of one length (N, L); ``text``
    one string or a batch of strings, tokenised with the run's symbols (one
    symbol per character, or symbols separated by spaces); ``features`` a float
    input (N, L, d_model) for models that do not read token ids. ``layers`` and
    ``heads`` default to all. ``labels`` name the L positions (one list for the
    batch, or one list per sequence); by default the run's symbols are used.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"run": "demo", "tokens": [[1, 2, 3, 4]], "kinds": ["attention"], "name": "first"},
            {"run": "demo", "text": "ABCD", "kinds": ["attention", "qkv"], "layers": [0],
             "heads": [0, 1]},
        ]},
    )

    run: str = Field(min_length=1, max_length=200, description="run id, as in GET /api/v1/runs")
    tokens: list[list[TokenId]] | None = Field(None, description="token ids (N, L)")
    text: str | list[str] | None = Field(None, description="input text, or one per sample")
    features: list[list[list[Feature]]] | None = Field(
        None, description="float input (N, L, d_model) for models without token ids")
    kinds: list[Kind] = Field(["attention"], min_length=1, max_length=4,
                              description="what to capture")
    layers: list[Index] | None = Field(None, min_length=1, max_length=1024,
                                       description="0-based; null: all")
    heads: list[Index] | None = Field(None, min_length=1, max_length=1024,
                                      description="0-based, in the order wanted; null: all")
    name: str | None = Field(None, max_length=200, description="a name for listings and files")
    labels: list[Label] | list[list[Label]] | None = Field(
        None, description="position labels: L strings, or N lists of L strings")

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        given = [k for k in ("tokens", "text", "features") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one input of tokens, text or features (got {given or 'none'})")
        return self


class TensorInfo(BaseModel):
    """One captured tensor: its shape and numpy dtype name."""

    shape: list[int]
    dtype: str


class InputInfo(BaseModel):
    """The input the capture ran on: which field, and its shape (N, L) or (N, L, d_model)."""

    kind: Literal["tokens", "text", "features"]
    shape: list[int]


class CapturePublic(BaseModel):
    """A stored capture as the API shows it.

    ``tensors`` names every tensor (``attention.0`` (N, h, L, S), ``queries.0``
    (N, L, h, E), ``keys.0`` (N, S, h, E), ``values.0`` (N, S, h, D),
    ``qk_logits.0`` (N, h, L, S), ``intermediate.0`` (N, L, d_model), and
    ``tokens`` (N, L) for token input). ``heads`` null means all heads.
    ``tensor_bytes`` is the raw size of the tensors, ``file_bytes`` the stored file's.
    """

    id: str
    name: str | None
    run: str
    step: int | None
    created: datetime
    kinds: list[Kind]
    layers: list[int]
    heads: list[int] | None
    input: InputInfo
    labels: list[list[str]] | None
    tensors: dict[str, TensorInfo]
    tensor_bytes: int
    file_bytes: int
    head_roles: dict[str, Any] | None = Field(
        None, description="the heads' roles when captured (history on): step, roles and "
                          "since (layers x heads; docs/history.md)")
    text: str | list[str] | None = Field(None, description="the input text, when given as text")
    pin: str | None = Field(None, description="the pinned input it was taken for "
                                              "(GET /api/v1/pins/{id}), or null")
    urls: dict[str, str] = Field(description="root-relative URLs: metadata, npz, safetensors, "
                                 "json (downloads)")


class CaptureList(BaseModel):
    """A page of captures, newest first; ``total`` counts all that match the filter."""

    items: list[CapturePublic]
    total: int
    limit: int
    offset: int


class Message(BaseModel):
    """An error that is not about one field (unknown capture, body too large, busy run)."""

    detail: str


class CaptureInput(BaseModel):
    """``GET /api/v1/captures/input?run=``: what input a capture of a run takes, so a page can
    ask for the right one (``message`` says why text cannot be given, when it cannot; all
    false when the run cannot capture at all: it has ended, its publisher is away)."""

    run: str
    text: bool = Field(description="text is tokenized (the run's tokenizer or symbols)")
    tokens: bool = Field(description="the model reads token ids (it has an nn.Embedding)")
    features: bool = Field(description="the model reads features (N, L, d_model)")
    vocab_size: int | None
    d_model: int | None
    max_length: int = Field(description="the longest input a capture takes")
    message: str | None


class CaptureHeads(BaseModel):
    """``GET /api/v1/captures/{id}/heads``: every captured head's statistics, role scores
    and role on this input, as ``GET /api/v1/runs/{id}/heads`` gives them for the history
    (``events`` is empty: one input has no history; induction scores are null)."""

    run: str
    capture: str
    step: int | None
    sample: int
    layers: int
    roles: list[str]
    heads: list[HeadPublic]
    events: list[Any] = Field(default_factory=list)


class PinCreate(BaseModel):
    """Pin an input of a run: it is captured now and again every ``every`` steps.

    Give ``text`` (tokenized as for captures) or ``tokens`` (one sequence of ids)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"run": "demo", "text": "ABCDEFGH", "every": 50}]})

    run: str = Field(min_length=1, max_length=200, description="run id")
    text: str | None = Field(None, min_length=1, max_length=20_000)
    tokens: list[TokenId] | None = Field(None, min_length=1, max_length=65536)
    every: int | None = Field(None, ge=1, le=1_000_000,
                              description="steps between captures (default: pinned_every)")
    name: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.text is None) == (self.tokens is None):
            raise ValueError("give exactly one input: text or tokens")
        return self


class PinUpdate(BaseModel):
    """Change a pin's cadence (a pin stopped by a failure tries again)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(ge=1, le=1_000_000, description="steps between captures")


class PinnedCapturePublic(BaseModel):
    """One capture of a pinned input (``GET /api/v1/captures/{id}`` for the rest)."""

    id: str
    step: int | None
    created: datetime


class PinPublic(BaseModel):
    """A pinned input, its captures (oldest first) and when the next one comes.

    ``state``: ``waiting`` (for ``next_step`` and ``not_before``), ``capturing`` (waiting
    for the run's next step boundary), ``paused`` (the run is paused or its publisher
    away), ``ended`` (the run ended or is gone) or ``failed`` (the input was refused:
    ``error`` says why). ``error`` is also the last transient failure (a timeout)."""

    id: str
    run: str
    name: str | None
    text: str | None
    tokens: list[int] | None
    every: int
    created: datetime
    captures: list[PinnedCapturePublic]
    taken: int = Field(description="captures taken so far; older ones thinned past the limit")
    state: Literal["waiting", "capturing", "paused", "ended", "failed"]
    next_step: int | None
    not_before: datetime | None
    message: str
    error: str | None
    error_status: int | None
    min_interval_s: float


class PinList(BaseModel):
    items: list[PinPublic]
