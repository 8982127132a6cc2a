"""The REST routers, collected under ``/api/v1``."""

from fastapi import APIRouter

from . import health, runs

api_router = APIRouter(prefix="/api/v1")
api_router.include_router(health.router)
api_router.include_router(runs.router)

__all__ = ["api_router"]
