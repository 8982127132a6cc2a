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


class BudgetThinned(BaseModel):
    stats_every: int  # history statistics every this many steps
    snapshot_stride: int  # snapshots this many times further apart than history_every
    stream_factor: int  # stream frames at 1/this of the rate asked for
    view_scale: float  # pooled views at this fraction of the side asked for


class BudgetPublic(BaseModel):
    """What watching costs the training loop and what is thinned (attnscope.training.budget)."""

    max_overhead: float | None
    overhead: float | None  # the last window's dashboard time / training time
    overhead_total: float | None  # the same since the run started
    costs: dict[str, float]  # the last window's, per part (stats, snapshots, stream)
    thinned: BudgetThinned
    thinning: list[str]  # what is thinned, in words ("stats every 4 steps")
    dropped: int  # history records dropped because the writer was behind
    text: str  # in words, for a person


class RunPublic(BaseModel):
    id: str
    name: str
    status: Literal["live", "paused", "idle", "ended"]
    step: int | None
    started: str
    error: str | None
    controls: list[str]
    model: ModelPublic
    # A local run's cost budget (None: a remote run, whose publisher keeps its own).
    budget: BudgetPublic | None = None
    # Remote runs (Dashboard.connect): the publisher's "hostname:pid" and its config.
    host: str | None = None
    config: dict[str, Any] | None = None
    # A run known only from the data dir's history (its process has ended): the session shown.
    session: str | None = None


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
