"""``GET /api/v1/health``: liveness for compose healthchecks and test harnesses."""

from __future__ import annotations

from fastapi import APIRouter

from ... import __version__
from .deps import RegistryDep
from .models import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(registry: RegistryDep) -> HealthPublic:
    # async: answered on the event loop, without a hop to the threadpool (where heavy
    # requests may be waiting), so a liveness probe stays fast while the server is busy.
    return HealthPublic(status="ok", version=__version__, runs=len(registry.ids()))
