"""The page's text box in Chromium, on a tiny GPT-2 with a byte-level BPE tokenizer trained
on the spot (examples/look_at_text.py): a typed text's tokens on the axes and its heatmaps
in place of the stream's; a pinned text captured again while the model trains; two texts
compared; a capture that waits for a step boundary (spinner, Cancel), the server's errors,
and an ended run's captures still shown."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request

import pytest

from .conftest import REPO, ServerProcess, free_port, get_json, keep, screenshot, wait_until

pytestmark = pytest.mark.browser

WAIT_MS = 60_000
CAT = "the cat sat on the mat."
DOG = "a dog sat on the mat."  # as many tokens as CAT: A − B is defined


def status_of(request) -> int:
    """The HTTP status of a request (a URL or a Request)."""
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


def thumbnails(page) -> list[str]:
    """Every thumbnail's pixels (data URLs), in grid order."""
    return page.evaluate("() => [...document.querySelectorAll('#grid .cell canvas')]"
                         ".map(c => c.toDataURL())")


def look_at(page, text: str) -> None:
    """Type ``text``, press Enter, wait until its capture is drawn."""
    drawn = page.evaluate("() => window.__attnscope.framesDrawn")
    page.fill("#look-text", text)
    page.press("#look-text", "Enter")
    page.wait_for_function(
        "(n) => { const l = window.__attnscope.look; return l.shown && l.shown.key.startsWith("
        "'capture:') && !l.pending && window.__attnscope.framesDrawn > n; }", arg=drawn,
        timeout=WAIT_MS)


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """examples/look_at_text.py training (pinned captures allowed every 0.5 s, and a third
    of a 30 % budget, so that a test sees several within seconds)."""
    data = tmp_path_factory.mktemp("look-data")
    port = free_port()
    argv = [sys.executable, str(REPO / "examples" / "look_at_text.py"), "--port", str(port),
            "--sleep", "0.05", "--name", "gpt2-text"]
    server = ServerProcess(argv, port, REPO / "test-artifacts" / "look-training.log",
                           {"ATTNSCOPE_DATA_DIR": str(data), "ATTNSCOPE_PINNED_MIN_INTERVAL_S":
                            "0.5", "ATTNSCOPE_MAX_OVERHEAD": "0.3"}).start()
    try:
        yield server
    finally:
        server.stop()


def open_page(page, url: str, frames: bool = True) -> None:
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(url)
    if frames:  # a run that steps sends frames; the text box waits for none
        page.wait_for_function("() => window.__attnscope.framesDrawn > 0", timeout=WAIT_MS)
    page.wait_for_function("() => !document.getElementById('look-text').disabled",
                           timeout=WAIT_MS)


def test_typing_a_text_shows_its_tokens_and_changes_the_heatmaps(page, training):
    # Heads worth a screenshot: the model has learnt its sentences by ~150 steps.
    wait_until(lambda: (get_json(training.url + "/api/v1/runs/gpt2-text")["step"] or 0) >= 150,
               120, "150 training steps")
    open_page(page, training.url + "/")
    assert page.locator("#look-text").get_attribute("placeholder").startswith("type a text")
    before = thumbnails(page)
    look_at(page, CAT)
    assert thumbnails(page) != before  # every head redrawn from the text's capture
    shown = page.locator("#look-what").text_content()
    assert shown.startswith(f"showing “{CAT}” · captured at step")
    # Hover a thumbnail: the query and key under the mouse, with their tokens, and the weight.
    cell = page.locator('.cell[data-layer="1"][data-head="2"]')
    size = cell.bounding_box()["width"]
    cell.hover(position={"x": size * 0.2, "y": size * 0.2})  # query 1, key 1 of 7
    tip = page.evaluate("() => window.__attnscope.gridTip.textContent")
    assert tip.startswith("L1 H2 — click to open\nquery #1 “ cat”\nkey #1 “ cat”\nweight "), tip
    page.wait_for_timeout(400)
    keep(screenshot(page, "look-overview"), "screenshot-textbox.png")
    # The stream does not overwrite it while it is shown.
    steps = get_json(training.url + "/api/v1/runs/gpt2-text")["step"]
    wait_until(lambda: get_json(training.url + "/api/v1/runs/gpt2-text")["step"] > steps + 10,
               30, "ten more steps")
    assert page.locator("#look-what").text_content() == shown
    # The focus view: token strings on both axes, and a cell's hover.
    page.locator('.cell[data-layer="1"][data-head="2"]').click()
    page.wait_for_function(
        "() => { const l = document.getElementById('focus-plot').layout;"
        " return l && l.xaxis && (l.xaxis.ticktext || []).includes('·cat'); }", timeout=WAIT_MS)
    axes = page.evaluate("() => { const l = document.getElementById('focus-plot').layout;"
                         " return [l.xaxis.ticktext, l.yaxis.ticktext]; }")
    assert axes[0] == axes[1] and axes[0][:3] == ["the", "·cat", "·sat"] and "·mat" in axes[0]
    box = page.locator("#focus-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    focus_tip = page.evaluate("() => window.__attnscope.focusView.tip.textContent")
    assert focus_tip.startswith("query #1: ·cat\nkey #1: ·cat\n"), focus_tip
    page.keyboard.press("Escape")
    # The map: every head's statistics and role on this input.
    page.select_option("#overview-mode", "map")
    page.wait_for_function("() => window.__attnscope.headmap.values.size === 8", timeout=WAIT_MS)
    # Back to live: the stream draws again.
    page.select_option("#overview-mode", "grid")
    drawn = page.evaluate("() => window.__attnscope.framesDrawn")
    page.click("#look-live")
    page.wait_for_function(f"() => window.__attnscope.framesDrawn > {drawn} + 2",
                           timeout=WAIT_MS)
    assert page.locator("#look-showing").is_hidden()
    assert page.log.errors == []


def test_a_pinned_text_is_captured_again_while_the_model_trains(page, training):
    open_page(page, training.url + "/")
    page.fill("#look-text", "a dog looked at the red box.")
    page.fill("#look-every", "10")
    page.click("#look-pin")
    page.wait_for_function(
        "() => { const e = window.__attnscope.look.entries.find(e => e.pin &&"
        " e.text === 'a dog looked at the red box.'); return e && e.captures.length >= 3 &&"
        " window.__attnscope.look.shown && window.__attnscope.look.shown.key === e.key; }",
        timeout=WAIT_MS)
    entry = page.evaluate("() => window.__attnscope.look.entries.find(e => e.pin)")
    steps = [c["step"] for c in entry["captures"]]
    assert all(b - a >= 10 for a, b in zip(steps, steps[1:], strict=False)), steps
    assert entry["pin"]["every"] == 10
    assert page.locator("#look-status").is_hidden()  # the first capture came
    page.wait_for_function("() => /^next capture after step \\d+/.test("
                           "document.getElementById('look-next').textContent)", timeout=WAIT_MS)
    newest = thumbnails(page)
    # Scrub back to its first capture: the same sentence, earlier in training. The step
    # is shown at once, its frames once fetched (slow on a loaded machine): wait for them.
    drawn = page.evaluate("() => window.__attnscope.framesDrawn")
    page.locator("#look-slider").fill("0")
    page.wait_for_function(
        f"(n) => window.__attnscope.look.shown.step === {steps[0]} &&"
        " window.__attnscope.framesDrawn > n", arg=drawn, timeout=WAIT_MS)
    page.wait_for_timeout(300)  # every layer's frame (drawn in one pass, or close)
    assert thumbnails(page) != newest
    assert f"captured at step {steps[0]}" in page.locator("#look-what").text_content()
    chip = page.locator(".look-chip.pinned").first.text_content()
    assert "pinned · every 10 ·" in chip
    keep(screenshot(page, "look-pinned"), "screenshot-textbox-pinned.png")
    # Unpinned: its captures go with it.
    ids = [c["id"] for c in entry["captures"]]
    page.locator(".look-chip.pinned .look-remove").first.click()
    page.wait_for_function("() => !window.__attnscope.look.entries.some(e => e.pin)",
                           timeout=WAIT_MS)
    assert status_of(f"{training.url}/api/v1/captures/{ids[0]}") == 404
    assert page.log.errors == []


def test_two_texts_compared_side_by_side_with_their_difference(page, training):
    open_page(page, training.url + "/")
    look_at(page, DOG)
    look_at(page, CAT)
    page.locator('.cell[data-layer="1"][data-head="2"]').click()
    page.click("#look-compare")
    page.wait_for_function("() => document.getElementById('compare-message').textContent"
                           ".startsWith('A: input step')", timeout=WAIT_MS)
    assert page.locator("#compare").is_visible()
    assert page.locator("#compare-layer").input_value() == "1"
    assert page.locator("#compare-head").input_value() == "2"
    picks = [page.locator(f"#compare-run-{s} option:checked").text_content() for s in "ab"]
    assert picks == [f"“{CAT}”", f"“{DOG}”"]
    diff = page.evaluate("() => { const c = window.__attnscope.history.compare;"
                         " return c.lastDiff ? Array.from(c.lastDiff) : null; }")
    assert diff is not None and len(diff) == 49 and max(abs(v) for v in diff) > 0.01
    box = page.locator("#compare-diff").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.22, box["y"] + box["width"] * 0.22)
    tip = page.evaluate("() => window.__attnscope.history.compare.tip.textContent")
    assert tip.startswith("query #1 “ cat” / “ dog”\nkey #1 “ cat” / “ dog”\nA ") and "A − B" in tip
    page.locator("#compare").scroll_into_view_if_needed()
    keep(screenshot(page, "look-compare"), "screenshot-textbox-compare.png")
    assert page.log.errors == []


# -- a run whose loop steps only when the test says so -------------------------------

STEPPED = """
import pathlib, sys, time, torch, transformers
sys.path.insert(0, {examples!r})
from toy_text import sentences, tokenizer
from attnscope import Dashboard
flags = pathlib.Path({flags!r})
tok = tokenizer()
torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32,
                                 vocab_size=len(tok), pad_token_id=tok.pad_token_id)
model = transformers.GPT2LMHeadModel(config)
dash = Dashboard.start(model, port={port}, name="stepped", tokenizer=tok)
batch = tok(["".join(sentences(2))], return_tensors="pt")
step = 0
while not (flags / "end").exists():
    if step == 0 or (flags / "step").exists():
        (flags / "step").unlink(missing_ok=True)
        with torch.no_grad():
            model(**batch)
        dash.step(step, loss=1.0, tokens=batch["input_ids"])
        step += 1
    time.sleep(0.05)
dash.close()
"""


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    """A run that steps when a flag file appears (a capture waits for it), with captures
    timing out after 4 s; its data dir."""
    root = tmp_path_factory.mktemp("stepped")
    flags = root / "flags"
    flags.mkdir()
    port = free_port()
    script = root / "stepped.py"
    script.write_text(STEPPED.format(examples=str(REPO / "examples"), flags=str(flags),
                                     port=port))
    server = ServerProcess([sys.executable, str(script)], port,
                           REPO / "test-artifacts" / "look-stepped.log",
                           {"ATTNSCOPE_DATA_DIR": str(root / "data"),
                            "ATTNSCOPE_CAPTURES_TIMEOUT_S": "4"}).start()
    server.flags = flags
    server.data = root / "data"
    try:
        yield server
    finally:
        (flags / "end").touch()
        server.stop()


def step_once(run) -> None:
    before = get_json(run.url + "/api/v1/runs/stepped")["step"]
    (run.flags / "step").touch()
    wait_until(lambda: get_json(run.url + "/api/v1/runs/stepped")["step"] > before, 20,
               "a step")


def captures_of(url: str) -> int:
    return get_json(url + "/api/v1/captures?run=stepped")["total"]


def test_a_capture_waits_for_a_step_with_a_spinner_and_can_be_cancelled(page, stepped):
    open_page(page, stepped.url + "/", frames=False)
    page.fill("#look-text", CAT)
    page.click("#look-go")
    status = page.locator("#look-status")
    status.wait_for(state="visible")
    assert page.locator("#look-status .spinner").is_visible()
    assert "waiting for run 'stepped' to reach its next step boundary" in status.text_content()
    screenshot(page, "look-waiting")
    page.click("#look-cancel")
    assert status.is_hidden()
    assert page.locator("#look-error").text_content() == "cancelled: nothing was kept"
    step_once(stepped)  # the queued capture runs at this step; the server drops it
    time.sleep(1.0)
    assert captures_of(stepped.url) == 0
    # Again, and this time the step comes: the capture is shown.
    page.click("#look-go")
    status.wait_for(state="visible")
    step_once(stepped)
    page.wait_for_function("() => window.__attnscope.look.shown !== null", timeout=WAIT_MS)
    assert status.is_hidden() and captures_of(stepped.url) == 1
    assert page.log.errors == []


def test_the_servers_errors_are_shown(page, stepped):
    open_page(page, stepped.url + "/", frames=False)
    error = page.locator("#look-error")
    page.fill("#look-text", " ".join([CAT] * 8))  # ~56 tokens: the model takes 32
    page.click("#look-go")
    error.wait_for(state="visible")
    said = error.text_content()
    assert said.startswith("could not capture") and "422: body.text: " in said, said
    assert "over the limit" in said or "the model rejected this input" in said, said
    page.fill("#look-text", DOG)  # nobody steps: 503 after captures_timeout_s
    page.click("#look-go")
    page.wait_for_function("() => document.getElementById('look-error').textContent"
                           ".includes('503')", timeout=WAIT_MS)
    assert "did not reach a step boundary within 4 s; try again" in error.text_content()
    assert page.locator("#look-status").is_hidden()
    # Chromium logs each refused request; nothing else went wrong.
    unexpected = [e for e in page.log.errors if not re.search(
        r"Failed to load resource: the server responded with a status of (422|503)", e)]
    assert unexpected == [] and len(page.log.errors) == 2


def test_an_ended_runs_captures_stay_and_it_says_why_it_takes_no_more(page, stepped):
    (stepped.flags / "end").touch()
    stepped.stop()
    port = free_port()
    argv = [sys.executable, "-m", "attnscope.cli", "serve", "--port", str(port), "--host",
            "127.0.0.1", "--data-dir", str(stepped.data)]
    server = ServerProcess(argv, port, REPO / "test-artifacts" / "look-serve.log").start()
    try:
        page.set_viewport_size({"width": 1400, "height": 900})
        page.goto(server.url + "/?run=stepped")
        page.wait_for_function("() => document.getElementById('look-hint').textContent",
                               timeout=WAIT_MS)
        assert "has ended" in page.locator("#look-hint").text_content()
        assert page.locator("#look-go").is_disabled()
        chip = page.locator(".look-chip").first
        assert CAT in chip.text_content()
        chip.locator(".look-open").click()
        page.wait_for_function("() => window.__attnscope.look.shown !== null", timeout=WAIT_MS)
        page.wait_for_function("() => document.querySelectorAll('#grid .cell.empty').length"
                               " === 0", timeout=WAIT_MS)
        body = json.dumps({"run": "stepped", "text": "x"}).encode()
        request = urllib.request.Request(server.url + "/api/v1/captures", data=body,
                                         headers={"Content-Type": "application/json"})
        assert status_of(request) == 409  # what the page did not offer to do
        assert page.log.errors == []
    finally:
        server.stop()
