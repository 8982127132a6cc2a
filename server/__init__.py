"""attnscope: a live window into a transformer's attention while it trains.

``from attnscope import Dashboard`` is the way in (``Dashboard.start(model)`` in
process, ``Dashboard.connect(...)`` to a team server); :func:`show` draws every head
of one input inline in a notebook, with no training loop; :class:`Client` calls the
captures API; :func:`create_app` builds the server, :class:`Settings` configures it.
Everything here is imported lazily, so ``import attnscope`` loads neither FastAPI
nor uvicorn.

>>> import attnscope
>>> attnscope.__version__
'0.1.0'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The one version string: pyproject.toml reads it (setuptools dynamic version).
__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .backend.app import create_app
    from .client import Client
    from .settings import Settings
    from .training.dashboard import Dashboard
    from .training.look import show

__all__ = ["Client", "Dashboard", "Settings", "__version__", "create_app", "show"]

_LAZY = {"Client": ".client", "Dashboard": ".training.dashboard", "create_app": ".backend.app",
         "Settings": ".settings", "show": ".training.look"}


def __getattr__(name: str) -> Any:
    # Lazy, so ``import attnscope.training.run`` does not import FastAPI and uvicorn.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'attnscope' has no attribute {name!r}")
