"""``GET /api/v1/runs/{id}/heads``: per head, statistics, role scores, role and since when.

Served from the history writer's role trackers (:mod:`.roles`): live for a run
being recorded, replayed from the stored rows for a past one. ``step=`` gives
the heads as they were at that step (the page's history slider).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query

from ...core.limits import Int64
from ...core.roles import ROLES, RoleRule
from ...core.stats import HEAD_STATISTICS
from .models import AlertPublic, HeadPublic, HeadsPublic, RoleEventPublic
from .roles import RoleTracker
from .router import ServiceDep, SessionQ, _session
from .store import StatRow
from .writer import HistoryWriter

router = APIRouter(prefix="/api/v1", tags=["history"])
_COUNTS = ("nan", "inf")
Curve = Literal[HEAD_STATISTICS]  # type: ignore[valid-type]


def _value(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def head_list(stats: np.ndarray | None, roles: list[list[str | None]],
              since: list[list[int | None]], layer_heads: list[int] | None = None,
              ) -> list[HeadPublic]:
    """Every head of ``stats`` (K, R, H) in ``HEAD_STATISTICS`` order (R may be shorter):
    its statistics, role scores, role and since-step; ``layer_heads`` caps layer k at
    its own head count (layers with fewer heads than H)."""
    if stats is None:
        return []
    names = HEAD_STATISTICS[: stats.shape[1]]
    per_layer = layer_heads or []
    out = []
    for layer in range(stats.shape[0]):
        n = per_layer[layer] if layer < len(per_layer) and per_layer[layer] else stats.shape[2]
        for head in range(min(n, stats.shape[2])):
            values = {name: _value(stats[layer, i, head]) for i, name in enumerate(names)}
            scores = {r: values.get(r) for r in ROLES}
            role = roles[layer][head] if layer < len(roles) and head < len(roles[layer]) else None
            held = since[layer][head] if layer < len(since) and head < len(since[layer]) else None
            out.append(HeadPublic(layer=layer, head=head, stats=values, scores=scores,
                                  role=role, since=held))
    return out


@router.get("/runs/{run_id:path}/heads", responses={404: {"description": "no history"}})
def run_heads(run_id: str, service: ServiceDep,
              step: Annotated[Int64 | None, Query(description="the heads at or before this "
                                                              "step (default: the latest)")] = None,
              session: SessionQ = None,
              events: Annotated[int, Query(ge=0, le=5000, description="at most this many of "
                                                                      "the latest events")] = 500,
              curve: Annotated[Curve | None, Query(description="add each head's values of "
                                                   "this statistic over the steps")] = None,
              points: Annotated[int, Query(ge=2, le=5000, description="the curve's steps, "
                                                                     "at most")] = 200,
              ) -> HeadsPublic:
    """Every head's statistics, role scores (:data:`ROLES`), role and the step since which
    it holds it; the events (roles gained / lost, collapses, NaN/Inf) and the alerts
    (``GET /alerts``) up to the step. ``curve=entropy``: every head's entropy at up to
    ``points`` recorded steps up to the step, spread evenly (``curve_steps``)."""
    answer = heads_answer(service, run_id, step, session, events)
    if curve is not None and answer.session is not None:
        add_curves(service, answer, curve, step, points)
    return answer


def add_curves(service: HistoryWriter, answer: HeadsPublic, stat: str, step: int | None,
               points: int) -> None:
    """Set every head's ``curve`` of ``answer``: statistic ``stat`` at up to ``points``
    recorded steps up to ``step`` (``curve_steps``)."""
    index = HEAD_STATISTICS.index(stat)
    rows = [r for r in service.store.stats(answer.session, end=step, points=points)
            if r.heads is not None]
    answer.curve_stat = stat
    answer.curve_steps = [r.step for r in rows]
    for head in answer.heads:
        values = []
        for r in rows:
            a = r.heads
            inside = head.layer < a.shape[0] and index < a.shape[1] and head.head < a.shape[2]
            values.append(_value(a[head.layer, index, head.head]) if inside else None)
        head.curve = values


def thresholds_of(rule: RoleRule) -> dict[str, float]:
    """The role rule's thresholds, as ``GET /heads`` and the ``heads`` message list them."""
    return {k: float(v) for k, v in asdict(rule).items()}


def heads_answer(service: HistoryWriter, run_id: str, step: int | None = None,
                 session: str | None = None, events: int = 500) -> HeadsPublic:
    """What ``GET /api/v1/runs/{id}/heads`` answers (also the stream's ``heads`` message
    when the run is recorded): the latest heads, or those at ``step``; the last
    ``events`` events. Raises HTTPException 404 when nothing is recorded for the run."""
    thresholds = thresholds_of(service.roles.rule)
    if session is None and service.is_recording(run_id) and service.session_of(run_id) is None:
        return HeadsPublic(run=run_id, session=None, step=None, probe_step=None, layers=0,
                           roles=list(ROLES), thresholds=thresholds, heads=[], events=[])
    s = _session(service, run_id, session)
    tracker: RoleTracker = service.roles.get(s.id)
    if step is None:
        with tracker.lock:
            row = None if tracker.stats is None else StatRow(tracker.step, 0.0, {},
                                                             tracker.stats)
            roles = [list(r) for r in tracker.roles]
            since = [list(r) for r in tracker.since]
            happened = list(tracker.events)
        if row is None:
            row = service.store.stat_at(s.id, None)
    else:
        row = service.store.stat_at(s.id, step)
        roles, since = tracker.roles_at(step)
        with tracker.lock:
            happened = [e for e in tracker.events if e.step <= step]
    shown = happened[-events:] if events else []
    layers = int(s.meta.get("layers", 0))
    alerts = service.store.alerts(s.id, end=step, limit=events) if events else []
    return HeadsPublic(
        run=s.run, session=s.id, step=None if row is None else row.step,
        probe_step=tracker.repeat_step, layers=layers, roles=list(ROLES), thresholds=thresholds,
        heads=head_list(None if row is None else row.heads, roles, since,
                        s.meta.get("layer_heads")),
        events=[RoleEventPublic(**e.to_dict()) for e in shown],
        alerts=[AlertPublic(**a) for a in alerts])


def head_roles(service: HistoryWriter | None, run_id: str) -> dict[str, Any] | None:
    """The heads' roles of a run being recorded, for a capture's metadata: ``step``,
    ``roles`` and ``since`` (layers x heads), or None (no history, nothing recorded yet)."""
    if service is None:
        return None
    session = service.session_of(run_id)
    if session is None:
        return None
    tracker = service.roles.get(session)
    with tracker.lock:
        if tracker.step is None:
            return None
        return {"step": tracker.step, "roles": [list(r) for r in tracker.roles],
                "since": [list(r) for r in tracker.since]}
