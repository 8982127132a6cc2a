"""Response models of the history REST resource."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class SessionPublic(BaseModel):
    """One recorded run start: its snapshots' step range and the bytes they use."""

    session: str
    run: str
    name: str | None
    started: str
    snapshots: int
    first_step: int | None
    last_step: int | None
    bytes: int
    live: bool
    meta: dict[str, Any]


class StatsPublic(BaseModel):
    """Every recorded step (thinned by halving on long runs) of one layer.

    ``entropy`` etc. are one list per step with one value per selected head
    (null where non-finite or missing); ``scalars`` one list per name.
    """

    steps: list[int]
    time: list[float]
    entropy: list[list[float | None]]
    max_weight: list[list[float | None]]
    first_token: list[list[float | None]]
    nan: list[list[float | None]]
    inf: list[list[float | None]]
    scalars: dict[str, list[float | None]]


class SnapshotPublic(BaseModel):
    """One kept snapshot: its step and the Unix time it was recorded."""

    step: int
    time: float


class HistoryIndex(BaseModel):
    """``GET /api/v1/runs/{id}/history``: the snapshots kept and the per-step statistics."""

    run: str
    session: str | None  # null: the run is recorded but has not finished a step yet
    name: str | None
    started: str | None
    layer: int
    heads: list[int]
    layers: int
    every: int
    probe: dict[str, Any]
    snapshots: list[SnapshotPublic]
    stats: StatsPublic
    urls: dict[str, str]
