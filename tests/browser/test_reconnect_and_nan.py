"""Faults the user must see handled: a server restart, and a run that produces NaN."""

from __future__ import annotations

import sys

import pytest

from .conftest import ARTIFACTS, ServerProcess, demo_server, free_port, screenshot

pytestmark = pytest.mark.browser

WAIT_MS = 60_000


def test_page_reconnects_when_the_server_restarts(page):
    port = free_port()
    server = demo_server(port, "reconnect-server").start()
    try:
        page.goto(server.url + "/")
        page.wait_for_function("() => window.__attnscope.framesDrawn > 0", timeout=WAIT_MS)
        assert page.locator("#conn").get_attribute("data-state") == "open"
        server.stop()
        page.wait_for_function("() => document.querySelector('#conn').dataset.state !== 'open'",
                               timeout=WAIT_MS)
        assert "reconnecting" in page.locator("#conn").text_content() or \
            "connecting" in page.locator("#conn").text_content()
        drawn = page.evaluate("() => window.__attnscope.framesDrawn")
        server.start()  # same port
        page.wait_for_function("() => document.querySelector('#conn').dataset.state === 'open'",
                               timeout=WAIT_MS)
        # Re-subscribed by itself: new frames arrive and are drawn.
        page.wait_for_function("(n) => window.__attnscope.framesDrawn > n", arg=drawn,
                               timeout=WAIT_MS)
    finally:
        server.stop()


def test_nan_head_is_flagged(page):
    port = free_port()
    argv = [sys.executable, "tests/browser/nan_model.py", str(port), "--seconds", "240"]
    server = ServerProcess(argv, port, ARTIFACTS / "nan-model.log").start()
    try:
        page.goto(server.url + "/")
        bad = page.locator("#grid .cell[data-layer='1'][data-head='2']")
        page.wait_for_function(
            "() => document.querySelector(\"#grid .cell[data-layer='1'][data-head='2']\")"
            "?.classList.contains('bad')", timeout=WAIT_MS)
        assert "NaN" in bad.get_attribute("title")
        # Only the poisoned head: layer 0 and the other heads of layer 1 stay clean.
        assert page.locator("#grid .cell.bad").count() == 1
        assert "L1 H2" in page.locator("#health-list li.bad").first.text_content()
        screenshot(page, "nan-flag")
        assert page.log.errors == []
    finally:
        server.stop()
