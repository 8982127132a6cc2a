"""Response models of the REST API (the RunSummary of docs/protocol.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class LayerPublic(BaseModel):
    index: int
    name: str
    role: str
    attention_type: str
    heads: int | None


class ModelPublic(BaseModel):
    layers: int
    heads: int | None
    attention_type: str
    d_model: int | None
    seq_len: int | None
    layer_details: list[LayerPublic]


class RunPublic(BaseModel):
    id: str
    name: str
    status: Literal["live", "paused", "idle", "ended"]
    step: int | None
    started: str
    error: str | None
    controls: list[str]
    model: ModelPublic
    # Remote runs (Dashboard.connect): the publisher's "hostname:pid" and its config.
    host: str | None = None
    config: dict[str, Any] | None = None


class HealthPublic(BaseModel):
    status: Literal["ok"]
    version: str
    runs: int


class ScalarsPublic(BaseModel):
    """A run's scalar history: one entry per kept step; a name missing at a step is null."""

    run: str
    steps: list[int]
    time: list[float]
    values: dict[str, list[float | None]]
