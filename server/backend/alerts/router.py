"""``GET /api/v1/runs/{id}/alerts``: a run's alerts (stored with its history)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query

from ..history.models import AlertPublic, AlertsPublic
from ..history.router import From, ServiceDep, SessionQ, To, _session

router = APIRouter(prefix="/api/v1", tags=["alerts"])


@router.get("/runs/{run_id:path}/alerts", responses={404: {"description": "no history"}})
def run_alerts(run_id: str, service: ServiceDep, session: SessionQ = None,
               start: From = None, end: To = None,
               limit: Annotated[int | None, Query(ge=1, le=100_000, description="at most "
                                                  "this many of the latest")] = None,
               ) -> AlertsPublic:
    """The run's alerts with ``from <= step <= to``, oldest first (the last ``limit``),
    and the rules in force (docs/statistics.md)."""
    rules = asdict(service.alerts.rules)
    if session is None and service.is_recording(run_id) and service.session_of(run_id) is None:
        return AlertsPublic(run=run_id, session=None, rules=rules, alerts=[])
    s = _session(service, run_id, session)
    alerts = service.store.alerts(s.id, start, end, limit)
    return AlertsPublic(run=s.run, session=s.id, rules=rules,
                        alerts=[AlertPublic(**a) for a in alerts])
