"""attnscope server: the FastAPI app, the live stream and ``Dashboard.start(model)``.

>>> import server
>>> server.__version__
'0.1.0'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .app import create_app
    from .dashboard import Dashboard
    from .settings import Settings

__all__ = ["Dashboard", "Settings", "__version__", "create_app"]

_LAZY = {"Dashboard": ".dashboard", "create_app": ".app", "Settings": ".settings"}


def __getattr__(name: str) -> Any:
    # Lazy, so ``import server.runs`` does not import FastAPI and uvicorn.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
