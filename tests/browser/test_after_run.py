"""After the run and around it, in Chromium: a closed run reopened by ``attnscope serve`` on
its data dir and scrubbed in the main view; the Trainer callback's page with token labels
and a loss curve; ``connect(..., tokenizer=)`` labels; the login page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from .conftest import REPO, ServerProcess, free_port, get_json, keep, screenshot, wait_until

pytestmark = pytest.mark.browser

WAIT_MS = 60_000
SIZES = [(1600, 1000), (1366, 768), (1920, 1080), (1280, 800)]


def serve(port: int, name: str, data_dir, env: dict | None = None) -> ServerProcess:
    argv = [sys.executable, "-m", "attnscope.cli", "serve", "--port", str(port),
            "--host", "127.0.0.1", "--data-dir", str(data_dir)]
    return ServerProcess(argv, port, REPO / "test-artifacts" / f"{name}.log", env)


def slider_in_view(page) -> bool:
    box = page.locator("#history").bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= \
        page.viewport_size["height"]


def open_focus_with_labels(page, url: str, layer: int, head: int, label: str) -> dict:
    """Open ``url``, then head (layer, head); wait until its axes show ``label`` (as the
    page writes tokens); the tick texts of both axes."""
    page.goto(url)
    page.wait_for_function("() => window.__attnscope.framesDrawn > 0", timeout=WAIT_MS)
    page.locator(f'.cell[data-layer="{layer}"][data-head="{head}"]').click()
    page.wait_for_function(
        "(label) => { const l = document.getElementById('focus-plot').layout;"
        " return l && l.yaxis && (l.yaxis.ticktext || []).includes(label); }", arg=label,
        timeout=WAIT_MS)
    return page.evaluate("() => { const l = document.getElementById('focus-plot').layout;"
                         " return {x: l.xaxis.ticktext, y: l.yaxis.ticktext}; }")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A data dir holding the demo run, trained ~250 steps and stopped (its process gone)."""
    data = tmp_path_factory.mktemp("recorded")
    port = free_port()
    argv = [sys.executable, "-m", "attnscope.cli", "demo", "--port", str(port), "--host",
            "127.0.0.1", "--no-browser", "--max-rate", "0"]
    demo = ServerProcess(argv, port, REPO / "test-artifacts" / "recorded-demo.log",
                         {"ATTNSCOPE_DATA_DIR": str(data)}).start()
    try:
        wait_until(lambda: (get_json(demo.url + "/api/v1/runs/demo")["step"] or 0) >= 250, 180,
                   "250 demo steps")
    finally:
        demo.stop()
    return data


def test_a_closed_run_reopens_under_serve_and_scrubs_in_the_main_view(page, recorded):
    server = serve(free_port(), "after-run-serve", recorded).start()
    try:
        [run] = get_json(server.url + "/api/v1/runs")
        assert run["id"] == "demo" and run["status"] == "ended" and run["step"] >= 250
        page.set_viewport_size({"width": 1600, "height": 1000})
        page.goto(server.url + "/")
        # It opens on its last snapshot: heatmaps drawn from the history, no live stream.
        page.wait_for_function("() => window.__attnscope.framesDrawn > 0", timeout=WAIT_MS)
        option = page.locator("#run-select option").first.text_content()
        assert f"ended at step {run['step']}" in option
        assert page.locator("#run-status").text_content() == "ended"
        assert page.locator("#step").text_content() == str(run["step"])
        assert "ended at step" in page.locator("#history-step").text_content()
        assert page.locator("#history-live").is_hidden()
        assert page.locator("#waiting").is_hidden()
        page.wait_for_function("() => document.getElementById('curves-plot').data", timeout=WAIT_MS)
        assert slider_in_view(page)
        last = page.evaluate("() => window.__attnscope.history.shownStep")
        # Scrub back to the first snapshot: every head redrawn, roles of that step asked for.
        drawn = page.evaluate("() => window.__attnscope.framesDrawn")
        polled = page.evaluate("() => window.__attnscope.headsPolled")
        page.locator("#history-slider").fill("0")
        page.wait_for_function(f"() => window.__attnscope.framesDrawn > {drawn} && "
                               f"window.__attnscope.headsPolled > {polled}", timeout=WAIT_MS)
        first = page.evaluate("() => window.__attnscope.history.shownStep")
        assert first < last and page.locator("#history-step").text_content().startswith(
            f"step {first}")
        # ... and to where the heads were forming (the loss falls around step 40-60)
        steps = page.evaluate("() => window.__attnscope.history.steps")
        forming = next(i for i, step in enumerate(steps) if step >= 45)
        page.locator("#history-slider").fill(str(forming))
        page.wait_for_function(f"() => window.__attnscope.history.shownStep === {steps[forming]}",
                               timeout=WAIT_MS)
        page.wait_for_timeout(1500)  # the charts' step line
        keep(screenshot(page, "after-run-serve"), "screenshot-after-run.png")
        assert page.log.errors == []
    finally:
        server.stop()


def test_trainer_callback_page_shows_tokens_and_a_loss_curve(page, tmp_path):
    pytest.importorskip("accelerate")
    port = free_port()
    argv = [sys.executable, str(REPO / "examples" / "train_trainer.py"), "--port", str(port),
            "--steps", "300", "--sleep", "0.05", "--keep-open",
            "--output-dir", str(tmp_path / "gpt2-trainer")]
    server = ServerProcess(argv, port, REPO / "test-artifacts" / "trainer.log",
                           {"ATTNSCOPE_DATA_DIR": str(tmp_path / "data")}).start()
    try:
        [run] = get_json(server.url + "/api/v1/runs")
        assert run["id"] == "gpt2-trainer"  # named after the output dir
        page.set_viewport_size({"width": 1600, "height": 1000})
        axes = open_focus_with_labels(page, server.url + "/", 1, 2, "·the")
        assert len(axes["y"]) >= 16  # labels thinned by the room there is, not to every other
        assert not any("Ġ" in t or "Ċ" in t for t in axes["x"] + axes["y"])
        # A causal model: "auto" colours each row by its own maximum.
        assert page.locator("#focus-colorbar .bar-title").text_content() == "weight / row max"
        # The loss of every step (the Trainer logs only every 500): a curve, not 2 points.
        page.wait_for_function(
            "() => { const d = document.getElementById('curves-plot').data;"
            " return d && d[0].y.filter(v => v !== null).length >= 40; }", timeout=WAIT_MS)
        assert slider_in_view(page)
        page.wait_for_timeout(1000)
        keep(screenshot(page, "trainer-callback"), "screenshot-trainer.png")
        for width, height in SIZES:  # the slider stays in view at common sizes
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_timeout(400)
            assert slider_in_view(page), (width, height)
        page.keyboard.press("Escape")
        for width, height in SIZES:
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_timeout(400)
            assert slider_in_view(page), (width, height)
        assert page.log.errors == []
    finally:
        server.stop()


CONNECT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from hf_support import bpe_tokenizer, tiny_gpt2
from attnscope import Dashboard
tok = bpe_tokenizer()
model = tiny_gpt2(len(tok), layers=2, heads=2).eval()
ids = tok(["the cat sat on the mat.\\n the dog sat on the log."], return_tensors="pt")["input_ids"]
dash = Dashboard.connect(model, {url!r}, run="carol/bpe", tokenizer=tok)
for step in range(100000):
    with torch.no_grad():
        model(input_ids=ids)
    dash.step(step, loss=1.0 / (step + 1), tokens=ids)
    time.sleep(0.05)
"""


def test_connect_with_a_tokenizer_labels_the_page_and_captures_text(page, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = tmp_path / "publish.py"
    script.write_text(CONNECT.format(tests=str(REPO / "tests" / "server"), url=url))
    server = serve(port, "connect-serve", tmp_path / "data")
    # The publisher first: it keeps trying until the server is up.
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        server.start()  # returns once the publisher's run is listed
        ticks = open_focus_with_labels(page, server.url + "/?run=carol/bpe", 0, 0, "·cat")["y"]
        assert "↵" in "".join(ticks) and not any("Ġ" in t or "Ċ" in t for t in ticks)
        body = json.dumps({"run": "carol/bpe", "text": "the cat sat", "kinds": ["attention"]})
        request = urllib.request.Request(url + "/api/v1/captures", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            made = json.loads(response.read())
        assert made["labels"] == [["the", " cat", " sat"]]
        screenshot(page, "connect-tokenizer")
        assert page.log.errors == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server.stop()


def test_the_login_page_is_a_page_and_the_token_leaves_the_address(page, tmp_path):
    token = "a-token-for-the-login-page-0123456789"
    server = serve(free_port(), "login-serve", tmp_path / "data", {"ATTNSCOPE_TOKEN": token})
    # Not server.start(): it waits for a run list, which needs the token.
    server.proc = subprocess.Popen(server.argv, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT, env={**os.environ, **server.env})
    try:
        wait_until(lambda: _answers(server.url + "/api/v1/health"), 60, "the server")
        page.goto(server.url + "/?run=x")
        assert page.locator("input[type=password]").is_visible()
        assert "authentication required" not in page.content()
        page.locator("input[type=password]").fill("not-the-token-at-all")
        page.locator("button[type=submit]").click()
        page.wait_for_selector("text=That token is not right.")
        keep(screenshot(page, "login-page"), "screenshot-login.png")
        page.locator("input[type=password]").fill(token)
        page.locator("button[type=submit]").click()
        page.wait_for_function("() => window.__attnscope && window.__attnscope.marks.hello",
                               timeout=WAIT_MS)
        assert "token" not in page.url and page.url.endswith("/?run=x")
    finally:
        server.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
