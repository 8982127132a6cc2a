"""The induction demo on the page: role tags appear on the heads as they form (slow)."""

from __future__ import annotations

import sys
import tempfile

import pytest

from .conftest import ARTIFACTS, ServerProcess, free_port, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]

FORM_MS = 480_000  # ~100 s unloaded (tests/server/test_induction.py); this machine is shared
TAGGED = """() => {
  const tags = (l, role) => document.querySelectorAll(
    `#grid .cell[data-layer='${l}'][data-role='${role}']`).length;
  return tags(0, 'previous_token') > 0 && tags(1, 'induction') > 0;
}"""


@pytest.fixture(scope="module")
def induction():
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        argv = [sys.executable, "-m", "attnscope.cli", "demo", "--task", "induction",
                "--max-rate", "0", "--port", str(port), "--host", "127.0.0.1", "--no-browser"]
        server = ServerProcess(argv, port, ARTIFACTS / "induction-server.log",
                               env={"ATTNSCOPE_DATA_DIR": data}).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.mark.timeout(FORM_MS // 1000 + 120)
def test_role_tags_appear_as_the_induction_circuit_forms(page, induction):
    page.goto(induction.url + "/")
    page.wait_for_function("() => window.__attnscope && window.__attnscope.framesDrawn >= 2",
                           timeout=60_000)
    assert page.locator("#overview-mode").input_value() == "grid"  # 2 x 4 heads: thumbnails
    page.wait_for_function(TAGGED, timeout=FORM_MS)
    events = page.locator("#role-events").text_content()
    assert "L1" in events and "became an induction head" in events
    page.select_option("#scale", "row")
    page.wait_for_timeout(1500)  # charts and a few more frames
    screenshot(page, "induction-demo")
    page.select_option("#overview-mode", "map")
    page.select_option("#map-stat", "induction")
    page.wait_for_function("() => document.querySelectorAll("
                           "\"#headmap .map-cell[data-layer='1'][data-role='induction']\").length",
                           timeout=30_000)
    page.wait_for_timeout(500)
    screenshot(page, "induction-map")
    page.click("#role-events li[data-kind='gained']")
    page.wait_for_function("() => window.__attnscope.state.focus !== null", timeout=30_000)
    assert "head since step" in page.locator("#focus-role").text_content()
    assert page.log.errors == []
