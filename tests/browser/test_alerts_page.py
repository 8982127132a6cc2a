"""Alerts on the page, against `attnscope demo --task collapse` in headless Chromium: the
banner, the marks on the history timeline, and a click on either opening that head at
that step."""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Iterator

import pytest

from .conftest import ARTIFACTS, ServerProcess, free_port, get_json, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WAIT_MS = 180_000  # the collapse comes after ~275 steps


@pytest.fixture(scope="module")
def collapse_demo() -> Iterator[ServerProcess]:
    """The collapse demo as fast as it goes, in a data dir of its own; the budget never thins
    statistics (every step is evaluated, as bench/collapse.py measures it)."""
    with tempfile.TemporaryDirectory(prefix="attnscope-alerts-") as data:
        port = free_port()
        argv = [sys.executable, "-m", "attnscope.cli", "demo", "--task", "collapse",
                "--max-rate", "0", "--port", str(port), "--host", "127.0.0.1", "--no-browser"]
        env = {"ATTNSCOPE_DATA_DIR": data, "ATTNSCOPE_MAX_OVERHEAD": "1"}
        server = ServerProcess(argv, port, ARTIFACTS / "collapse-demo-server.log", env).start()
        try:
            yield server
        finally:
            server.stop()


def test_the_banner_and_the_timeline_marks_open_the_head_at_its_step(page, collapse_demo):
    url = collapse_demo.url
    page.set_viewport_size({"width": 1400, "height": 1150})
    page.goto(url)
    page.wait_for_function(
        "() => window.__attnscope && window.__attnscope.alerts.alerts.length > 0", timeout=WAIT_MS)
    # the page shows what the server stored
    run = get_json(url + "/api/v1/runs")[0]["id"]
    stored = get_json(f"{url}/api/v1/runs/{run}/alerts")["alerts"]
    first = stored[0]
    assert "entropy" in first["rule"]
    banner = page.locator("#alert-banner")
    banner.wait_for(state="visible")
    assert re.match(r"step \d+: L\d", page.locator("#alert-text").inner_text())
    page.wait_for_function("() => document.querySelectorAll('.history-mark').length > 0")
    # the loss spike (~20 steps after the first alert) reaches the training chart
    page.wait_for_function("(step) => window.__attnscope.state.history.step >= step",
                           arg=first["step"] + 30, timeout=WAIT_MS)
    page.wait_for_timeout(1200)  # a chart redraw
    path = screenshot(page, "alerts-banner-and-marks")
    assert path.stat().st_size > 10_000

    # a mark on the timeline: the first alert's head, at its step
    page.evaluate("() => document.querySelector('.history-mark').click()")
    opened = page.evaluate("() => window.__attnscope.alertOpened")
    assert (opened["layer"], opened["head"], opened["step"]) == \
        (first["layer"], first["head"], first["step"])
    page.wait_for_function("(step) => { const h = window.__attnscope.history; "
                           "return h.scrubbing && h.shownStep !== null && h.shownStep <= step; }",
                           arg=first["step"], timeout=30_000)
    if first["head"] is not None:
        title = page.locator("#focus-title").inner_text()
        assert title.startswith(f"Layer {first['layer']} · head {first['head']}")
    else:
        assert page.locator("#health-layer").input_value() == str(first["layer"])
    screenshot(page, "alerts-opened")

    # the banner's "show": the newest alert; "x": gone until a newer one
    newest = page.evaluate("() => window.__attnscope.alerts.latest()")
    page.click("#alert-open")
    assert page.evaluate("() => window.__attnscope.alertOpened.id") == newest["id"]
    page.click("#alert-close")
    assert banner.is_hidden() or page.evaluate(
        "(id) => window.__attnscope.alerts.latest().id !== id", newest["id"])

    # the layers x heads map: each cell's tooltip draws that head's recorded entropy curve
    if page.locator("#focus").is_visible():
        page.click("#focus-back")
    page.click("#history-live")
    page.select_option("#overview-mode", "map")
    page.wait_for_function("(step) => { const s = window.__attnscope.headmap.curveSteps; "
                           "return s.length > 10 && s[s.length - 1] > step; }",
                           arg=first["step"], timeout=30_000)
    page.hover(f".map-cell[data-layer='{first['layer']}'][data-head='0']")
    spark = page.locator(".map-tip .map-spark polyline")
    spark.wait_for(state="attached")
    assert len(spark.get_attribute("points").split()) > 10
    screenshot(page, "alerts-map-curve")
    assert page.log.errors == []
