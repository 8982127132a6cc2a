"""Dependencies shared by the routers: the app's settings, run registry and hub."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException
from starlette.requests import HTTPConnection

from ...core.run_base import BaseRun, RunRegistry, UnknownRunError
from ...settings import Settings
from ..captures.pinned import PinnedCaptures
from ..captures.store import CaptureStore
from ..history.writer import HistoryWriter
from ..hub import Hub


def get_settings(conn: HTTPConnection) -> Settings:
    return conn.app.state.settings


def get_registry(conn: HTTPConnection) -> RunRegistry:
    return conn.app.state.runs


def get_hub(conn: HTTPConnection) -> Hub:
    return conn.app.state.hub


def get_history(conn: HTTPConnection) -> HistoryWriter | None:
    """The history service (None: the server records no history)."""
    return getattr(conn.app.state, "history", None)


def get_capture_store(conn: HTTPConnection) -> CaptureStore | None:
    """The captures store (None: captures are off)."""
    return getattr(conn.app.state, "capture_store", None)


def get_pins(conn: HTTPConnection) -> PinnedCaptures:
    """The pinned inputs (503 when the server has no capture store)."""
    pins = getattr(conn.app.state, "pins", None)
    if pins is None:
        raise HTTPException(503, detail="pinned inputs are not available: the server has no "
                                        "capture store")
    return pins


def get_run(run_id: str, registry: Annotated[RunRegistry, Depends(get_registry)]) -> BaseRun:
    """The run named in the path, or 404 naming the id."""
    try:
        return registry.get(run_id)
    except UnknownRunError as exc:
        raise HTTPException(404, detail=str(exc)) from None


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[RunRegistry, Depends(get_registry)]
HubDep = Annotated[Hub, Depends(get_hub)]
RunDep = Annotated[BaseRun, Depends(get_run)]
HistoryDep = Annotated["HistoryWriter | None", Depends(get_history)]
CaptureStoreDep = Annotated["CaptureStore | None", Depends(get_capture_store)]
PinsDep = Annotated[PinnedCaptures, Depends(get_pins)]
