"""Where the page's files and plotly.js are: the package data ``attnscope.frontend``
(in the wheel, or ``frontend/`` of a checkout) and the installed ``plotly`` (no CDN).

The server serves them (:mod:`attnscope.backend.app`); standalone files embed them
(:mod:`attnscope.core.standalone`).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def frontend_dir() -> Path | None:
    """The folder holding the page (``index.html`` and its scripts), or None if missing."""
    try:
        index = importlib.resources.files("attnscope.frontend").joinpath("index.html")
    except ModuleNotFoundError:  # pragma: no cover - an install without the page
        return None
    # A real folder whenever the package is installed as files (wheel or editable);
    # StaticFiles serves folders only.
    return index.parent if isinstance(index, Path) and index.is_file() else None


def frontend_text(name: str) -> str:
    """The text of the page's file ``name`` (``"grid.js"``); ``FileNotFoundError`` if absent."""
    return importlib.resources.files("attnscope.frontend").joinpath(name).read_text("utf-8")


def plotly_js_path() -> Path | None:
    """``plotly/package_data/plotly.min.js`` of the installed plotly, if present."""
    try:
        import plotly
    except ImportError:  # pragma: no cover - plotly is a dependency
        return None
    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    return path if path.is_file() else None
