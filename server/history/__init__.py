"""History: every run's attention on a fixed probe input, every K steps (thinned
logarithmically to about 200 snapshots), plus head statistics and scalars at
every step, stored under the data dir and served over REST.

Wiring (in ``create_app``)::

    app.include_router(history.router)
    # in the lifespan:
    app.state.history = history.start(settings, registry)   # None when off or locked
    ...
    if app.state.history is not None: app.state.history.close()
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import HistoryConfig
from .heads import router as heads_router
from .recorder import HistoryService, RunRecorder
from .router import router
from .store import HistoryLocked, HistoryStore
from .thinning import thinning_victim

logger = logging.getLogger(__name__)
router.include_router(heads_router)  # /runs/{id}/heads beside /runs/{id}/history


def open_service(settings: Any, **overrides: Any) -> HistoryService | None:
    """A recording service on ``settings.data_dir / "history"``, or None when disabled."""
    config = HistoryConfig.from_settings(settings, **overrides)
    if not config.enabled:
        return None
    store = HistoryStore(Path(settings.data_dir) / "history", max_snapshots=config.max_snapshots,
                         max_bytes=config.max_bytes, max_stat_points=config.max_stat_points,
                         max_sessions=config.max_sessions)
    return HistoryService(store, config)


__all__ = ["HistoryConfig", "HistoryLocked", "HistoryService", "HistoryStore", "RunRecorder",
           "open_service", "router", "start", "thinning_victim"]


def start(settings: Any, registry: Any) -> HistoryService | None:
    """Record every run of ``registry``; None (history answers 503) when disabled or when
    another process owns the data dir's history."""
    try:
        service = open_service(settings)
    except HistoryLocked as exc:
        logger.warning("history disabled: %s", exc)
        return None
    if service is not None:
        service.watch(registry)
    return service
