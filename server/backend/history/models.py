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
    # Role scores (attnscope.core.roles); null in sessions recorded before them.
    distance: list[list[float | None]] = []
    previous_token: list[list[float | None]] = []
    diagonal: list[list[float | None]] = []
    local: list[list[float | None]] = []
    sink: list[list[float | None]] = []
    uniform: list[list[float | None]] = []
    induction: list[list[float | None]] = []
    duplicate_token: list[list[float | None]] = []
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


class HeadPublic(BaseModel):
    """One head at one step: its statistics, role scores, role and since when it holds it."""

    layer: int
    head: int
    stats: dict[str, float | None]
    scores: dict[str, float | None]
    role: str | None
    since: int | None
    # One statistic (``curve`` of GET /heads, e.g. entropy) at each of ``curve_steps``.
    curve: list[float | None] | None = None


class RoleEventPublic(BaseModel):
    """A head gained or lost a role, collapsed, or went non-finite (``text`` says which)."""

    step: int
    layer: int
    head: int
    kind: str
    role: str | None
    text: str


class AlertPublic(BaseModel):
    """One alert (attnscope.backend.alerts.rules.Alert.to_message): a rule's episode on a head
    (``head`` null: the whole layer), with the values that raised it."""

    type: str = "alert"
    id: str
    run: str
    session: str
    seq: int
    step: int
    layer: int
    head: int | None
    scope: str
    rule: str
    severity: str
    values: dict[str, float | None]
    text: str
    time: float


class AlertsPublic(BaseModel):
    """``GET /api/v1/runs/{id}/alerts``: a run's alerts, oldest first, and the rules."""

    run: str
    session: str | None
    rules: dict[str, Any]
    alerts: list[AlertPublic]


class HeadsPublic(BaseModel):
    """``GET /api/v1/runs/{id}/heads``: every head's statistics, role scores and role."""

    run: str
    session: str | None  # null: the run is recorded but has not finished a step yet
    step: int | None  # of the statistics shown
    probe_step: int | None  # the snapshot whose induction probe gave the induction scores
    layers: int
    roles: list[str]
    thresholds: dict[str, float]
    heads: list[HeadPublic]
    events: list[RoleEventPublic]
    alerts: list[AlertPublic] = []  # the latest alerts up to ``step`` (GET /alerts: all)
    curve_stat: str | None = None  # the statistic of every head's ``curve``
    curve_steps: list[int] | None = None  # the steps of every head's ``curve``
