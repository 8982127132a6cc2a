"""Scripted captures: ``POST /api/v1/captures`` runs one forward pass of a run's
model between training steps and stores the tensors it asked for (an SQLite
index plus one safetensors file each); ``GET`` downloads them as npz,
safetensors or json.

Wiring (in ``create_app``)::

    app.include_router(captures.build_router(captures.CaptureLimits.from_settings(settings)))
    # in the lifespan:
    app.state.capture_store = captures.open_store(settings)   # ... store.close() at shutdown
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .capture import KINDS, CaptureError, describe_model, run_capture
from .router import build_router
from .service import CaptureLimits
from .store import CaptureRecord, CaptureStore, StoreLocked


def open_store(settings: Any) -> CaptureStore:
    """The capture store under ``settings.data_dir / "captures"`` (created if missing)."""
    return CaptureStore(Path(settings.data_dir) / "captures")


__all__ = [
    "KINDS",
    "CaptureError",
    "CaptureLimits",
    "CaptureRecord",
    "CaptureStore",
    "StoreLocked",
    "build_router",
    "describe_model",
    "open_store",
    "run_capture",
]
