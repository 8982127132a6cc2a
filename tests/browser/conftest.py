"""Fixtures for the browser tests: a real server on a free loopback port, headless Chromium.

Every test module here sets ``pytestmark = pytest.mark.browser``; all are skipped
when /usr/bin/chromium is missing.
Screenshots go to ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
START_TIMEOUT_S = 90.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip every ``@pytest.mark.browser`` test when Debian's Chromium is not installed."""
    if CHROMIUM.exists():
        return
    skip = pytest.mark.skip(reason=f"{CHROMIUM} is missing (apt-get install chromium)")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class ServerProcess:
    """A server subprocess on 127.0.0.1:port; start() waits for /api/v1/health.

    ``env``: variables set for it on top of this process's environment.
    """

    def __init__(self, argv: list[str], port: int, log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = dict(env or {})
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = self.log.open("ab")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        handle.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log}\n"
                                   + self.log.read_text()[-3000:])
            with contextlib.suppress(OSError):
                get_json(self.url + "/api/v1/health")
                if get_json(self.url + "/api/v1/runs"):
                    return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server did not answer {self.url}/api/v1/health in {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


def demo_server(port: int, name: str, env: dict[str, str] | None = None) -> ServerProcess:
    argv = [sys.executable, "-m", "attnscope.cli", "demo", "--port", str(port),
            "--host", "127.0.0.1", "--no-browser"]
    return ServerProcess(argv, port, ARTIFACTS / f"{name}.log", env)


@pytest.fixture(scope="module")
def demo() -> Iterator[ServerProcess]:
    """The demo (server + reverse-24 training run), shared by the tests of one module."""
    server = demo_server(free_port(), "demo-server").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    # Module scope: Playwright's sync API keeps an asyncio loop running in the
    # main thread while it is open, which would break later tests that call
    # asyncio.run() (the websocket tests); each browser module closes it.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class PageLog:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def console(self, message) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} @ {message.location}")

    def page_error(self, error) -> None:
        self.errors.append(f"pageerror: {error}")


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    page = context.new_page()
    log = PageLog()
    page.on("console", log.console)
    page.on("pageerror", log.page_error)
    page.log = log
    try:
        yield page
    finally:
        context.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def keep(path: Path, name: str) -> None:
    """A screenshot looked at and worth showing: into docs/."""
    shutil.copyfile(path, REPO / "docs" / name)


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def static_url():
    import plotly

    vendor = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"

    class Quiet(http.server.SimpleHTTPRequestHandler):
        """frontend/ at /, plotly.js at /vendor/plotly.min.js (as the real server does)."""

        def translate_path(self, path: str) -> str:
            if path.split("?")[0] == "/vendor/plotly.min.js":
                return str(vendor)
            return super().translate_path(path)

        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(REPO / "frontend"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def blank(page, static_url):
    page.goto(static_url + "/decode.js")  # same origin as the modules; no page scripts run
    return page
