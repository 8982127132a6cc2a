"""Shared by the captures tests: an app with the captures API, served for real.

When ``attnscope.backend.app.create_app`` wires the captures router in (and ``Settings``
has the ``captures_*`` limit fields), the tests run on the real app. Until
then they build the same thing by hand: the captures router, a lifespan that
opens the :class:`CaptureStore` under ``data_dir`` and closes it, and a run
registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from attnscope.backend.captures.pinned import PinnedCaptures
from attnscope.backend.captures.pins_router import router as pins_router
from attnscope.backend.captures.requests import CaptureLimits
from attnscope.backend.captures.router import PREFIX, build_router
from attnscope.backend.captures.store import open_store
from attnscope.training.demo import DemoConfig, DemoModel
from attnscope.training.run import Run, RunRegistry

SMALL = DemoConfig(seq_len=8, n_symbols=10, n_layers=2, n_heads=2, d_head=4, feed_forward=16,
                   device="cpu")
# Captures of a few MiB, so that writes take long enough to be killed in the middle.
BIG = DemoConfig(seq_len=64, n_symbols=10, n_layers=2, n_heads=4, d_head=8, feed_forward=32,
                 device="cpu")


def demo_run(run_id: str = "demo", config: DemoConfig = SMALL, ended: bool = True) -> Run:
    """A run of a small demo model whose training thread has ended (captures run inline)."""
    from attnscope.training.demo import symbol_labels

    run = Run(DemoModel(config), run_id=run_id, symbols=symbol_labels(config.n_symbols))
    if ended:
        run.close()
    return run


def make_app(data_dir: Path, runs: list[Run] | None = None,
             limits: CaptureLimits | None = None) -> FastAPI:
    """An app serving the captures API with a store under ``data_dir`` and ``runs``.

    The store opens in the lifespan (so serve the app with :func:`serve`).
    """
    registry = RunRegistry()
    for run in runs if runs is not None else [demo_run()]:
        registry.add(run)
    limits = limits or CaptureLimits()
    real = _real_app(data_dir, registry, limits)
    if real is not None:
        return real

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.capture_store = open_store(app.state.settings)
        app.state.pins = PinnedCaptures(registry, app.state.capture_store, limits, every=50,
                                        min_interval_s=0.0, keep=100, max_per_run=8,
                                        max_overhead=0.03).start()
        try:
            yield
        finally:
            app.state.pins.close()
            app.state.capture_store.close()

    app = FastAPI(lifespan=lifespan)
    app.include_router(build_router(limits))
    app.include_router(pins_router)
    app.state.settings = _FakeSettings(data_dir)
    app.state.runs = registry
    return app


@dataclasses.dataclass
class _FakeSettings:
    data_dir: Path


def _real_app(data_dir: Path, registry: RunRegistry, limits: CaptureLimits) -> FastAPI | None:
    """``create_app`` with these limits, if it serves captures already; else None."""
    from attnscope.backend.app import create_app
    from attnscope.settings import Settings

    values = {f"captures_{k}": v for k, v in dataclasses.asdict(limits).items()}
    if not set(values) <= set(Settings.model_fields):
        return None
    # History off: its probe pass is an extra forward that these tests would count.
    app = create_app(Settings(data_dir=data_dir, port=0, history_enabled=False, **values),
                     registry)
    if PREFIX not in app.openapi().get("paths", {}):
        return None
    return app


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 20 s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
