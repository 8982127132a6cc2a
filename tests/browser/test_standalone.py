"""Standalone views in Chromium with no server: attnscope.show's file opened from disk,
its inline display in a notebook executed by a real kernel (nbclient + ipykernel), and
the live page's "HTML" export, opened offline. Token labels on the axes, hover values."""

from __future__ import annotations

import base64
import html
import json
import re
import sys

import numpy as np
import pytest

import attnscope
from tests.look_support import TEXT, embedded, gpt2, hf_tokenizer, matrices

from .conftest import ARTIFACTS, REPO, screenshot

pytestmark = pytest.mark.browser
pytest.importorskip("transformers")

TOKENS = ["The", " cat", " sat", " on", " the", " mat"]
WAIT_MS = 60_000


def offline(page) -> list[str]:
    """Requests the page makes that are not to its own file, a data: or a blob: URL."""
    fetched: list[str] = []
    page.on("request", lambda r: None if r.url.split(":")[0] in ("file", "data", "blob", "about")
            else fetched.append(r.url))
    return fetched


def plot_hover(page, frame, row: int, col: int, rows: int, cols: int) -> str:
    """Move the mouse over cell (row, col) of the focus heatmap; plotly's hover text."""
    box = frame.locator("#focus-plot .nsewdrag").first.bounding_box()
    page.mouse.move(box["x"] + (col + 0.5) * box["width"] / cols,
                    box["y"] + (row + 0.5) * box["height"] / rows)
    hover = frame.locator("#focus-plot .hovertext")
    hover.first.wait_for(timeout=WAIT_MS)
    return " ".join(hover.all_text_contents())


def check_page(page, frame, data: dict, shot: str) -> None:
    """The grid drawn, a thumbnail's and a focus cell's hover values, token ticks."""
    frame.locator("#grid .cell:not(.empty)").first.wait_for(timeout=WAIT_MS)
    assert frame.locator("#grid .cell.empty").count() == 0
    values = matrices(data)
    cell = frame.locator("#grid .cell[data-layer='1'][data-head='1']")
    box = cell.bounding_box()
    cell.hover(position={"x": box["width"] * 0.25, "y": box["height"] * (4.5 / 6)})
    tip = frame.locator(".focus-tip")
    assert tip.is_visible()
    assert f"query #4 “ the”\nkey #1 “ cat”\nweight {values[1][1, 4, 1]:.4f}" in tip.text_content()
    screenshot(page, f"{shot}-overview")
    cell.click()
    frame.locator("#focus-plot .nsewdrag").first.wait_for(timeout=WAIT_MS)
    ticks = frame.locator("#focus-plot .xtick text").all_text_contents()
    assert ticks == [t.replace(" ", "·") for t in TOKENS]  # spaces shown, as the page does
    text = plot_hover(page, frame, 3, 2, 6, 6)
    assert "query #3 “ on”" in text and "key #2 “ sat”" in text
    assert f"weight {values[1][1, 3, 2]:.4f}" in text
    screenshot(page, f"{shot}-focus")


def test_the_show_file_opens_from_disk_with_tokens_and_hover(page, tmp_path):
    path = tmp_path / "cat.html"
    attnscope.show(gpt2(), hf_tokenizer(), TEXT, path=path)
    data = embedded(path.read_text())
    fetched = offline(page)
    page.goto(path.as_uri())
    check_page(page, page, data, "standalone")
    # the layers x heads map, from statistics computed in Python
    page.keyboard.press("Escape")
    page.select_option("#overview-mode", "map")
    page.locator("#headmap .map-cell[data-layer='0'][data-head='1']").hover()
    tip = page.locator(".map-tip").text_content()
    entropy = data["stats"][0]["values"]["entropy"][1]
    assert tip.startswith("L0 H1") and f"entropy {entropy:.3f}" in tip
    screenshot(page, "standalone-map")
    # colour scale: per row makes every row's largest weight the top of the scale
    page.select_option("#overview-mode", "grid")
    page.select_option("#scale", "row")
    page.click("#grid .cell[data-layer='0'][data-head='0']")
    text = plot_hover(page, page, 5, 0, 6, 6)
    assert "weight / row max" in text
    assert fetched == [] and page.log.errors == []


def test_a_pooled_file_says_so(page, tmp_path):
    path = tmp_path / "long.html"
    words = " ".join(["the cat sat on the mat"] * 8)  # 48 tokens
    view = attnscope.show(gpt2(), hf_tokenizer(), words, path=path, max_bytes=8_000)
    data = embedded(view.html)
    assert data["frames"][0]["pool"] > 1
    page.goto(path.as_uri())
    note = page.locator("#notes")
    assert note.is_visible() and "pooled" in note.text_content()
    assert page.log.errors == []


NOTEBOOK = [
    # the set-up a user has: a tokenizer and a model (tiny ones, built here: no download)
    f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    "from tests.look_support import gpt2, hf_tokenizer\n"
    "model, tok = gpt2(), hf_tokenizer()",
    'import attnscope\nattnscope.show(model, tok, "The cat sat on the mat")',
]


@pytest.mark.slow
def test_a_notebook_shows_every_head_inline(page, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    # A kernel of this interpreter, whatever "python3" kernels the machine has.
    spec = tmp_path / "jupyter" / "kernels" / "attnscope-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "attnscope tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code) for code in NOTEBOOK]
    NotebookClient(nb, timeout=240, kernel_name="attnscope-test",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    [output] = [o for o in nb.cells[1].outputs if o["output_type"] == "execute_result"]
    inline = output["data"]["text/html"]
    assert inline.startswith('<iframe class="attnscope-view"')
    data = embedded(html.unescape(re.search(r'srcdoc="([^"]*)"', inline).group(1)))
    assert data["frames"][0]["labels"]["queries"] == TOKENS
    # the output as a notebook shows it: below its cell, in a page of its own (no server)
    shown = tmp_path / "notebook.html"
    code = html.escape(NOTEBOOK[1])
    shown.write_text(
        "<!doctype html><meta charset='utf-8'><body style='font-family:sans-serif;margin:16px;"
        "background:#fff'><div style='color:#555'>In [2]:</div><pre style='background:#f5f5f5;"
        f"padding:8px;border:1px solid #ddd'>{code}</pre>{inline}</body>")
    fetched = offline(page)
    page.set_viewport_size({"width": 1100, "height": 800})
    page.goto(shown.as_uri())
    frame = page.frame_locator("iframe.attnscope-view")
    check_page(page, frame, data, "notebook")
    assert fetched == [] and page.log.errors == []
    (ARTIFACTS / "notebook.ipynb").write_text(json.dumps(nb))


def test_the_page_exports_its_view_as_a_file_that_opens_offline(page, demo, browser, tmp_path):
    page.goto(demo.url + "/")
    page.wait_for_function("() => window.__attnscope && window.__attnscope.framesDrawn >= 1",
                           timeout=WAIT_MS)
    page.wait_for_timeout(500)
    with page.expect_download(timeout=WAIT_MS) as overview:
        page.click("#export-html")
    assert overview.value.suggested_filename.startswith("attnscope-demo-overview-attention")
    page.click("#grid .cell[data-layer='0'][data-head='1']")
    page.wait_for_function("() => window.__attnscope.focusDrawn > 0", timeout=WAIT_MS)
    with page.expect_download(timeout=WAIT_MS) as focus:
        page.click("#export-html")
    assert page.log.errors == [] and page.locator("#banner").is_hidden()

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        offline_page = context.new_page()
        errors: list[str] = []
        offline_page.on("pageerror", lambda e: errors.append(str(e)))
        fetched = offline(offline_page)
        path = tmp_path / overview.value.suggested_filename  # .html: opened as a page
        overview.value.save_as(path)
        data = embedded(path.read_text())
        assert data["view"] == "overview" and len(data["frames"]) == data["model"]["layers"]
        offline_page.goto(path.as_uri())
        offline_page.locator("#grid .cell:not(.empty)").first.wait_for(timeout=WAIT_MS)
        assert offline_page.locator("#grid .cell.empty").count() == 0
        labels = data["frames"][0]["labels"]["queries"]
        cell = offline_page.locator("#grid .cell[data-layer='0'][data-head='0']")
        cell.hover(position={"x": 3, "y": 3})
        assert f"query #0 “{labels[0]}”" in offline_page.locator(".focus-tip").text_content()
        screenshot(offline_page, "page-export-overview")

        path = tmp_path / focus.value.suggested_filename
        focus.value.save_as(path)
        data = embedded(path.read_text())
        assert data["view"] == "focus" and data["focus"] == {"layer": 0, "head": 1}
        offline_page.goto(path.as_uri())
        offline_page.locator("#focus-plot .nsewdrag").first.wait_for(timeout=WAIT_MS)
        [frame] = data["frames"]
        rows, cols = frame["shape"][1:]
        text = plot_hover(offline_page, offline_page, 2, 1, rows, cols)
        values = np.frombuffer(base64.b64decode(frame["data"]), "<f4")
        assert f"weight {values.reshape(rows, cols)[2, 1]:.4f}" in text
        assert f"key #1 “{frame['labels']['keys'][1]}”" in text
        screenshot(offline_page, "page-export-focus")
        assert fetched == [] and errors == []
    finally:
        context.close()
