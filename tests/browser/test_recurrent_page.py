"""Recurrent inference on the page: heatmaps gain a row per generated token, in Chromium.

The server is ``examples/recurrent_generation.py``: a recurrent encoder (2 layers x 4
heads) reading 8 digits and a separator, then writing 7 tokens, one ``dash.step`` each.
"""

from __future__ import annotations

import sys
import time

import pytest

from .conftest import ARTIFACTS, ServerProcess, free_port, screenshot

pytestmark = pytest.mark.browser

WAIT_MS = 60_000
SEQUENCE = 16  # positions per sequence: 8 digits, the separator, 7 generated tokens

# (step, rows, keys, query labels) of the latest attention frame of layer 0, or null.
LATEST = """() => {
  const f = window.__attnscope.state.lastFrames.get('attention:0');
  return f ? [f.header.step, f.shape[1], f.shape[2], f.header.labels?.queries ?? null] : null;
}"""

# Layer 0 head 0's thumbnail: its size (keys x rows) and whether every pixel above the
# diagonal (keys not yet generated) has one colour while the rest has several.
CANVAS = """() => {
  const c = document.querySelector("#grid .cell[data-layer='0'][data-head='0'] canvas");
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const above = new Set(), below = new Set();
  for (let r = 0; r < c.height; r++) for (let k = 0; k < c.width; k++) {
    const i = 4 * (r * c.width + k);
    (k > r ? above : below).add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
  }
  return [c.width, c.height, above.size, below.size];
}"""


@pytest.fixture(scope="module")
def generation():
    port = free_port()
    argv = [sys.executable, "examples/recurrent_generation.py", "--port", str(port),
            "--train-steps", "60", "--sequences", "0", "--delay", "0.25"]
    server = ServerProcess(argv, port, ARTIFACTS / "recurrent-generation.log",
                           env={"OMP_NUM_THREADS": "1"}).start()
    try:
        yield server
    finally:
        server.stop()


def wait_rows(page, rows: int, timeout_s: float = 30.0) -> list:
    """The latest frame once a fresh sequence (rows == keys) has exactly ``rows`` rows."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = page.evaluate(LATEST)
        if latest and latest[1] == rows and latest[2] == rows:
            return latest
        page.wait_for_timeout(40)
    raise AssertionError(f"no frame of {rows} rows in {timeout_s} s; last {latest}")


def test_heatmaps_gain_a_row_per_generated_token(page, generation):
    page.goto(generation.url + "/")
    page.wait_for_function("() => window.__attnscope.framesDrawn > 0", timeout=WAIT_MS)

    early = wait_rows(page, 4)
    early_canvas = page.evaluate(CANVAS)
    screenshot(page, "recurrent-early")
    late = wait_rows(page, SEQUENCE - 1)
    late_canvas = page.evaluate(CANVAS)
    screenshot(page, "recurrent-late")

    assert late[0] > early[0]  # later steps of the same sequence
    assert len(late[3]) == SEQUENCE - 1 and late[3][:4] == early[3]  # rows kept, labelled
    assert late[3][8] == "|"  # the separator, then the generated digits
    assert early_canvas[:2] == [4, 4] and late_canvas[:2] == [SEQUENCE - 1] * 2
    for _, _, above, below in (early_canvas, late_canvas):
        assert above == 1 and below > 3  # keys not generated yet: empty; the rows: a map

    # The next sequence starts over: rows drop back, then grow again.
    seen = []
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and not (seen and seen[-1] >= 3 and min(seen) < 3):
        latest = page.evaluate(LATEST)
        seen.append(latest[1])
        page.wait_for_timeout(40)
    assert min(seen) < 3 <= seen[-1], seen
    assert page.log.errors == []


def test_focus_view_labels_rows_with_the_tokens_read(page, generation):
    page.goto(generation.url + "/")
    page.wait_for_function("() => window.__attnscope.framesDrawn > 0", timeout=WAIT_MS)
    page.click("#grid .cell[data-layer='1'][data-head='0']")
    page.wait_for_function("() => window.__attnscope.focusDrawn > 0", timeout=WAIT_MS)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        frame = page.evaluate("() => window.__attnscope.state.focusFrame?.header ?? null")
        if frame and frame["shape"][1] == SEQUENCE - 2 and frame["shape"][2] == SEQUENCE - 2:
            break
        page.wait_for_timeout(40)
    assert frame["labels"]["queries"][8] == "|"
    page.wait_for_timeout(300)  # plotly draws on the next animation frame
    screenshot(page, "recurrent-focus")
    assert page.log.errors == []
