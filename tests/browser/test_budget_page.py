"""The page's header says what watching costs and what the dashboard thinned."""

from __future__ import annotations

import pytest

from .conftest import demo_server, free_port, get_json, screenshot

pytestmark = pytest.mark.browser

WAIT_MS = 60_000


def test_header_shows_the_overhead_and_what_is_thinned(page, tmp_path):
    # A budget of 0.1 %: the demo's dashboard is over it, so it must thin and say so.
    env = {"ATTNSCOPE_MAX_OVERHEAD": "0.001", "ATTNSCOPE_DATA_DIR": str(tmp_path)}
    server = demo_server(free_port(), "budget-server", env).start()
    try:
        page.goto(server.url + "/")
        page.wait_for_function("() => window.__attnscope.framesDrawn > 0", timeout=WAIT_MS)
        badge = page.locator("#budget")
        page.wait_for_function(
            "() => ['thinned', 'over'].includes(document.querySelector('#budget').dataset.state)",
            timeout=WAIT_MS)
        text = badge.text_content()
        assert badge.is_visible()
        # Short: the figure and the budget; what is thinned is in the tooltip.
        assert text.startswith("cost ") and " of 0.1 % · thin" in text and len(text) < 40
        # The page says what the server says (the run summary's budget, same words).
        budget = get_json(server.url + "/api/v1/runs/demo")["budget"]
        assert budget["max_overhead"] == 0.001 and "to stay under 0.1 %" in budget["text"]
        title = badge.get_attribute("title")
        assert "since the start" in title and "thinned: " in title
        path = screenshot(page, "budget-header")
        assert path.stat().st_size > 0
        assert page.log.errors == []
    finally:
        server.stop()
