"""``Dashboard.start(model)``: watch a model from your own training loop.

Three lines in your loop::

    from server import Dashboard
    dash = Dashboard.start(model)           # serves http://127.0.0.1:8000, prints the URL
    for step, batch in enumerate(loader):
        loss = train_step(model, batch)
        dash.step(step, loss=loss.item())    # marks the step; cheap
"""

from __future__ import annotations

import logging
import webbrowser
from typing import Any

import torch.nn as nn

from .app import create_app
from .runs import Run, RunRegistry, slugify
from .serving import BackgroundServer
from .settings import Settings

logger = logging.getLogger(__name__)


class Dashboard:
    """A server in a background thread showing one run: the model you passed.

    Use :meth:`start`; then call :meth:`step` once per training step and
    :meth:`close` at the end (or use it as a context manager).
    """

    def __init__(self, run: Run, registry: RunRegistry, server: BackgroundServer) -> None:
        self.run = run
        self.registry = registry
        self._server = server
        self.url = server.url
        self._closed = False

    @classmethod
    def start(cls, model: nn.Module, port: int = 8000, host: str = "127.0.0.1",
              open_browser: bool = False, name: str | None = None,
              settings: Settings | None = None, quiet: bool = False) -> Dashboard:
        """Register ``model`` as a run, serve the dashboard, print its URL.

        ``port=0`` picks a free port (see :attr:`url`). ``model`` may be any
        ``nn.Module`` containing ``transformer_core`` attention modules.
        ``settings`` overrides everything but host and port.
        """
        settings = (settings or Settings()).model_copy(update={"host": host, "port": port})
        settings = Settings.model_validate(settings.model_dump())
        registry = RunRegistry()
        run = registry.add(Run(model, run_id=slugify(name or "run"), name=name or "run"))
        server = BackgroundServer(create_app(settings, registry), settings)
        server.start()
        dash = cls(run, registry, server)
        if not quiet:
            print(f"attnscope dashboard: {dash.url}", flush=True)  # the user needs the URL
        if open_browser:
            try:
                webbrowser.open(dash.url)
            except Exception:  # no browser is not an error
                logger.info("could not open a browser for %s", dash.url)
        return dash

    def step(self, step: int, loss: Any = None, tokens: Any = None, **scalars: Any) -> None:
        """Mark the end of training step ``step`` (see :meth:`server.runs.Run.step`).

        ``tokens``: this batch's token labels, a list of N lists of L strings
        or an (N, L) tensor of ids (then labelled by their numbers).
        Blocks only while the run is paused from the page.
        """
        self.run.step(step, loss=loss, tokens=tokens, **scalars)

    def close(self) -> None:
        """End the run and stop the server."""
        if self._closed:
            return
        self._closed = True
        self.run.close()
        self._server.stop()
        self.run.detach()

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dashboard({self.url!r}, run={self.run.id!r})"
