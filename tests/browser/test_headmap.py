"""The layers x heads map on a 12 x 12 model and the colour scales, in headless Chromium."""

from __future__ import annotations

import sys
import tempfile

import pytest

from .conftest import ARTIFACTS, ServerProcess, free_port, screenshot

pytestmark = pytest.mark.browser

WAIT_MS = 90_000

CELL_HASH = """([l, h]) => {
  const c = document.querySelector(`#grid .cell[data-layer='${l}'][data-head='${h}'] canvas`);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let hash = 0;
  for (let i = 0; i < d.length; i++) hash = (hash * 31 + d[i]) | 0;
  return hash;
}"""

FOCUS_HASH = """() => {
  const c = document.querySelector('#focus-canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let hash = 0;
  for (let i = 0; i < d.length; i++) hash = (hash * 31 + d[i]) | 0;
  return hash;
}"""

MAP_COLOURS = """() => Array.from(document.querySelectorAll('#headmap .map-cell'),
  (b) => getComputedStyle(b).backgroundColor)"""


@pytest.fixture(scope="module")
def big():
    """A 12 x 12 causal model stepping under Dashboard.start (its own data dir)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        argv = [sys.executable, "tests/browser/big_model.py", str(port), "--seconds", "600"]
        server = ServerProcess(argv, port, ARTIFACTS / "big-model.log",
                               env={"ATTNSCOPE_DATA_DIR": data}).start()
        try:
            yield server
        finally:
            server.stop()


def open_map(page, big) -> None:
    page.goto(big.url + "/")
    page.wait_for_function("() => window.__attnscope && window.__attnscope.mapDrawn > 0 && "
                           "document.querySelectorAll('#headmap .map-cell:not(.empty)').length "
                           "=== 144", timeout=WAIT_MS)


def test_map_is_the_overview_of_a_12x12_model_and_a_click_opens_the_head(page, big):
    open_map(page, big)
    assert page.locator("#overview-mode").input_value() == "map"
    assert page.locator("#grid").is_hidden() and page.locator("#headmap").is_visible()
    assert page.locator("#headmap .map-cell").count() == 144
    for width, height in [(1600, 1000), (1366, 768), (1920, 1080), (1280, 800)]:
        page.set_viewport_size({"width": width, "height": height})  # 12 rows, slider in view
        page.wait_for_timeout(300)
        box = page.locator("#history").bounding_box()
        assert box["y"] + box["height"] <= height, (width, height)
    page.set_viewport_size({"width": 1400, "height": 900})
    # the map needs statistics only: no attention frames for 144 heads
    sub = page.evaluate("() => window.__attnscope.subscribed")
    assert sub["kinds"] == ["head_stats", "scalars", "head_roles"]
    assert sub["layers"] == list(range(12))
    # roles come over the websocket ("heads" messages), not by polling GET /heads
    page.wait_for_function("() => window.__attnscope.headsReceived > 0", timeout=WAIT_MS)
    assert page.evaluate("() => window.__attnscope.headsPolled") == 0
    entropy = page.evaluate(MAP_COLOURS)
    assert len(set(entropy)) > 10, "one colour per head, not a flat fill"
    # hover: the numbers of that head
    page.hover("#headmap .map-cell[data-layer='3'][data-head='5']")
    tip = page.locator(".map-tip")
    assert tip.is_visible() and tip.text_content().startswith("L3 H5")
    assert "entropy" in tip.text_content() and "distance" in tip.text_content()
    page.wait_for_timeout(300)
    screenshot(page, "headmap-12x12")
    # another statistic recolours the map
    page.select_option("#map-stat", "distance")
    page.wait_for_function("(before) => JSON.stringify(Array.from(document.querySelectorAll("
                           "'#headmap .map-cell'), (b) => getComputedStyle(b).backgroundColor))"
                           " !== before", arg=str(entropy).replace("'", '"'), timeout=WAIT_MS)
    assert page.evaluate(MAP_COLOURS) != entropy
    # change since N steps: every head has moved a little (the model is nudged each step)
    page.select_option("#map-stat", "change")
    assert page.locator("#change-n-wrap").is_visible()
    page.fill("#change-n", "5")
    page.dispatch_event("#change-n", "change")
    page.wait_for_function("() => Array.from(document.querySelectorAll('#headmap .map-cell'))"
                           ".filter((b) => Number(b.dataset.value) > 0).length > 100",
                           timeout=WAIT_MS)
    page.click("#headmap .map-cell[data-layer='7'][data-head='11']")
    page.wait_for_function("() => window.__attnscope.focusDrawn > 0", timeout=WAIT_MS)
    assert page.locator("#focus-title").text_content().startswith("Layer 7 · head 11")
    sub = page.wait_for_function("() => { const s = window.__attnscope.subscribed; "
                                 "return s && s.max_side === 512 && s; }", timeout=WAIT_MS)
    assert sub.json_value()["layers"] == [7] and sub.json_value()["heads"] == [11]
    page.keyboard.press("Escape")
    assert page.locator("#headmap").is_visible()
    assert page.log.errors == []


def test_colour_scales_change_grid_and_focus_pixels(page, big):
    open_map(page, big)
    page.select_option("#overview-mode", "grid")
    page.wait_for_function("() => window.__attnscope.state.lastFrames.size === 12",
                           timeout=WAIT_MS)
    page.select_option("#fps", "1")  # fewer redraws while the hashes are read
    page.click("#pause-view")  # freeze: the hashes differ by scale only
    hashes = {}
    for scale in ("head", "row", "log", "fixed"):
        page.select_option("#scale", scale)
        hashes[scale] = page.evaluate(CELL_HASH, [6, 3])
    # A causal head's row 0 has one key, weight 1.0: "per head" spends its scale on that
    # cell, exactly as "fixed 0-1" does. Per row and log show the rest of the head.
    assert hashes["head"] == hashes["fixed"], hashes
    assert len({hashes["head"], hashes["row"], hashes["log"]}) == 3, hashes
    page.select_option("#scale", "row")
    screenshot(page, "grid-12x12-per-row")
    page.click("#pause-view")
    page.click("#grid .cell[data-layer='6'][data-head='3']")
    page.wait_for_function("() => window.__attnscope.focusDrawn > 0 && "
                           "document.querySelector('#focus-plot').data", timeout=WAIT_MS)
    page.click("#pause-view")  # freeze: the pixels differ by scale only
    ranges = {}
    pixels = {}
    for scale in ("head", "row", "log", "fixed"):
        page.select_option("#scale", scale)
        page.wait_for_timeout(200)
        ranges[scale] = page.evaluate("""() => { const b = document.querySelector(
          '#focus-colorbar'); return [Number(b.dataset.zmin), Number(b.dataset.zmax),
          b.querySelector('.bar-title').textContent]; }""")
        pixels[scale] = page.evaluate(FOCUS_HASH)
    # the focus canvas, as the thumbnails: per head = fixed on a causal head, row and log differ
    assert pixels["head"] == pixels["fixed"], pixels
    assert len({pixels["head"], pixels["row"], pixels["log"]}) == 3, pixels
    page.click("#pause-view")
    assert ranges["fixed"][:2] == [0, 1]
    assert ranges["log"][:2] == [-4, 0] and ranges["log"][2] == "log10 weight"
    assert ranges["row"][2] == "weight / row max"
    assert ranges["head"][0] == 0 and 0 < ranges["head"][1] <= 1
    page.select_option("#scale", "log")
    page.wait_for_timeout(300)
    screenshot(page, "focus-12x12-log")
    assert page.log.errors == []


def test_map_scrubs_with_the_history_slider(page, big):
    open_map(page, big)
    page.wait_for_function("() => window.__attnscope.history.steps.length >= 2", timeout=WAIT_MS)
    first = page.evaluate("() => window.__attnscope.history.steps[0]")
    page.evaluate("""() => { const s = document.querySelector('#history-slider');
      s.value = '0'; s.dispatchEvent(new Event('input')); }""")
    # the map shows the statistics and roles recorded at that step
    page.wait_for_function("(f) => { const h = window.__attnscope.state.heads;"
                           " return h && h.step === f && h.heads.length === 144; }",
                           arg=first, timeout=WAIT_MS)
    assert page.locator("#history-step").text_content() == f"step {first}"
    assert page.locator("#roles-summary").text_content().endswith(f"(step {first})")
    page.click("#history-live")
    page.wait_for_function("(f) => window.__attnscope.state.heads.step > f", arg=first,
                           timeout=WAIT_MS)
    assert page.log.errors == []


@pytest.fixture(scope="module")
def big_no_history():
    """The same 12 x 12 model on a server that records no history."""
    port = free_port()
    argv = [sys.executable, "tests/browser/big_model.py", str(port), "--seconds", "600"]
    server = ServerProcess(argv, port, ARTIFACTS / "big-model-no-history.log",
                           env={"ATTNSCOPE_HISTORY_ENABLED": "false"}).start()
    try:
        yield server
    finally:
        server.stop()


def test_roles_without_history_come_from_the_stream_and_say_what_is_missing(
        page, big_no_history):
    open_map(page, big_no_history)
    page.wait_for_function("() => { const h = window.__attnscope.state.heads;"
                           " return h && h.source === 'stream' && h.heads.length === 144; }",
                           timeout=WAIT_MS)
    # tagged from the live statistics: this model's near-uniform heads (top left of the map)
    page.wait_for_function("() => document.querySelectorAll("
                           "\"#headmap .map-cell[data-role='uniform']\").length > 0",
                           timeout=WAIT_MS)
    note = page.locator("#roles-note")
    assert note.is_visible() and "induction" in note.text_content()
    assert "ATTNSCOPE_HISTORY_ENABLED" in note.text_content()
    assert page.evaluate("() => window.__attnscope.headsPolled") == 0
    page.select_option("#map-stat", "previous_token")
    page.wait_for_timeout(500)
    screenshot(page, "headmap-12x12-no-history")
    # the history slider's own request answers 503 here (no history): Chromium logs it
    errors = [e for e in page.log.errors if "status of 503" not in e or "/history" not in e]
    assert errors == []
