"""Browser rendering benchmark: updates drawn per second in headless Chromium.

Scenarios (see bench/RESULTS.md, "## browser"):
  grid 4x4 of 64x64, grid 12x12 of 64x64  -- overview canvases, one update = every layer
  grid 12x12, per-row / log scale         -- the same with the colour-scale transform
  map 12x12                               -- the layers x heads map, one update = every
                                             layer's head_stats message (JSON)
  focus 512x512 (per head, row, log)      -- the focus view: a canvas over plotly's axes
                                             (plotly redraws ticks and colour bar <= 5/s)
  first heatmap                           -- page open -> first grid cell drawn, real demo server

The throughput feed is page-level: frames are encoded here exactly as docs/protocol.md
lays them out (float16, 8-byte aligned payload) and handed to ``window.__attnscope.inject``,
which runs the websocket's own decode path; the page then draws them in its normal
animation-frame loop. One fresh update is injected per animation frame, so the figure is
the rate the page actually manages to decode and paint (capped by the display's ~60 Hz).

Usage: .venv/bin/python bench/browser.py [--seconds 5] [--skip-demo]
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import logging
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import plotly

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VENDOR = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
VARIANTS = 4  # distinct payloads per layer, cycled so every update changes the pixels


class StaticHandler(http.server.SimpleHTTPRequestHandler):
    """frontend/ at /, plotly.js at /vendor/plotly.min.js (as the real server serves them)."""

    def translate_path(self, path: str) -> str:
        if path.split("?")[0] == "/vendor/plotly.min.js":
            return str(VENDOR)
        return super().translate_path(path)

    def log_message(self, *args) -> None:
        pass


def encode_frame(header: dict, array: np.ndarray) -> bytes:
    """uint32 LE header length | JSON header padded so the payload is 8-byte aligned | payload."""
    raw = json.dumps(header).encode()
    raw += b" " * (-(4 + len(raw)) % 8)
    return struct.pack("<I", len(raw)) + raw + np.ascontiguousarray(array).tobytes()


def attention(rng: np.random.Generator, heads: int, side: int) -> np.ndarray:
    """Random row-softmax matrices (heads, side, side) in float16."""
    logits = rng.normal(size=(heads, side, side)) * 2
    logits += 6 * np.eye(side)[::-1]
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)).astype("<f2")


def run_summary(layers: int, heads: int, side: int) -> dict:
    return {"id": "bench", "name": f"bench {layers}x{heads}", "status": "live", "step": 0,
            "started": None, "error": None, "controls": [],
            "model": {"layers": layers, "heads": heads, "attention_type": "full",
                      "d_model": 64 * heads, "seq_len": side}}


def frames(layers: int, heads: list[int], side: int, labels: bool) -> list[list[str]]:
    """VARIANTS updates, each a list of base64 frames (one per layer)."""
    rng = np.random.default_rng(0)
    names = [f"t{i}" for i in range(side)] if labels else None
    updates = []
    for v in range(VARIANTS):
        update = []
        for layer in range(layers):
            header = {"type": "frame", "run": "bench", "step": v, "kind": "attention",
                      "layer": layer, "heads": heads, "sample": 0,
                      "shape": [len(heads), side, side], "dtype": "float16", "scale": None,
                      "offset": None, "pool": 1, "role": "self",
                      "labels": {"queries": names, "keys": names} if labels else None}
            data = encode_frame(header, attention(rng, len(heads), side))
            update.append(base64.b64encode(data).decode())
        updates.append(update)
    return updates


SETUP_JS = """([hello, updates]) => {
  const toBuf = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)).buffer;
  window.__bench = { updates: updates.map((u) => u.map(toBuf)), running: false, injected: 0 };
  window.__attnscope.inject(JSON.stringify(hello));
}"""

# Inject one update (every layer's frame, fresh step number) per animation frame for `ms`.
MEASURE_JS = """async ([ms, focus, map]) => {
  const b = window.__bench, a = window.__attnscope;
  const counter = () => (map ? a.mapDrawn : focus ? a.focusDrawn : a.framesDrawn);
  await new Promise((r) => setTimeout(r, 300));  // settle
  const start = counter(), t0 = performance.now(), ms0 = a.mapDrawMs;
  const reacts0 = a.focusView.reacts;
  let i = 0;
  await new Promise((resolve) => {
    const feed = () => {
      if (performance.now() - t0 >= ms) return resolve();
      // A copy per message, as a websocket hands over a fresh ArrayBuffer each time.
      for (const buf of b.updates[i++ % b.updates.length]) a.inject(buf.slice(0));
      requestAnimationFrame(feed);
    };
    requestAnimationFrame(feed);
  });
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  return { drawn: counter() - start, seconds: (performance.now() - t0) / 1000, updates: i,
           drawMs: a.mapDrawMs - ms0, reacts: a.focusView.reacts - reacts0 };
}"""


def stats_updates(layers: int, heads: int) -> list[list[str]]:
    """VARIANTS updates, each a list of head_stats JSON messages (one per layer)."""
    rng = np.random.default_rng(0)
    names = ("entropy", "max_weight", "first_token", "distance", "previous_token", "diagonal",
             "local", "sink", "uniform")
    updates = []
    for v in range(VARIANTS):
        update = []
        for layer in range(layers):
            message = {"type": "head_stats", "run": "bench", "step": v, "layer": layer,
                       "sample": 0, "heads": list(range(heads)), "time": 0.0,
                       "nan": [0] * heads, "inf": [0] * heads}
            for name in names:
                message[name] = rng.random(heads).round(4).tolist()
            update.append(base64.b64encode(json.dumps(message).encode()).decode())
        updates.append(update)
    return updates


# JSON text messages: MEASURE_JS's buf.slice(0) is String.prototype.slice here.
STATS_SETUP_JS = """([hello, updates]) => {
  window.__bench = { updates: updates.map((u) => u.map(atob)), running: false, injected: 0 };
  window.__attnscope.inject(JSON.stringify(hello));
}"""


def measure(page, base_url: str, layers: int, heads: int, side: int, seconds: float,
            focus: bool, scale: str = "head", map_: bool = False) -> dict:
    page.goto(base_url + "/index.html")
    page.wait_for_function("() => window.__attnscope !== undefined && window.Plotly !== undefined")
    subscribed = [0] if focus else list(range(heads))
    hello = {"type": "hello", "protocol": 1, "server": "bench", "kinds": [],
             "runs": [run_summary(layers, heads, side)]}
    if map_:
        updates = stats_updates(layers, heads)
        page.evaluate(STATS_SETUP_JS, [hello, updates])
    else:
        updates = frames(1 if focus else layers, subscribed, side, labels=True)
        page.evaluate(SETUP_JS, [hello, updates])
        page.select_option("#overview-mode", "grid")
    page.select_option("#scale", scale)
    if focus:
        page.click("#grid .cell[data-layer='0'][data-head='0']")
    result = page.evaluate(MEASURE_JS, [int(seconds * 1000), focus, map_])
    per_update = 1 if focus or map_ else layers
    rate = result["drawn"] / per_update / result["seconds"]
    return {"updates_per_s": rate, "injected_per_s": result["updates"] / result["seconds"],
            "map_ms_per_draw": result["drawMs"] / max(1, result["drawn"]) if map_ else None,
            "plotly_per_s": result["reacts"] / result["seconds"] if focus else None,
            "bytes_per_update": sum(len(base64.b64decode(f)) for f in updates[0])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_heatmap_ms(browser, repeats: int) -> list[float]:
    """Page open -> first overview cell drawn, against the real demo server (attnscope.cli demo)."""
    port = free_port()
    argv = [sys.executable, "-m", "attnscope.cli", "demo", "--port", str(port),
            "--host", "127.0.0.1", "--no-browser"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/api/v1/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.25)
        times = []
        for _ in range(repeats):
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            page = context.new_page()
            page.goto(url + "/")
            page.wait_for_function(
                "() => window.__attnscope && window.__attnscope.firstHeatmapMs !== null",
                timeout=60_000)
            times.append(page.evaluate("() => window.__attnscope.firstHeatmapMs"))
            marks = page.evaluate("() => window.__attnscope.marks")
            log.info("  page open -> %s", ", ".join(f"{k} {v:.0f} ms" for k, v in marks.items()))
            context.close()
        return times
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per scenario")
    parser.add_argument("--repeats", type=int, default=3,
                        help="page loads for time-to-first-heatmap")
    parser.add_argument("--skip-demo", action="store_true", help="skip time-to-first-heatmap")
    parser.add_argument("--only", default="", help="run the scenarios whose name has this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from playwright.sync_api import sync_playwright

    handler = functools.partial(StaticHandler, directory=str(REPO / "frontend"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}"
    scenarios = [("grid 4x4 of 64x64", 4, 4, 64, False, 15, "head", False),
                 ("grid 12x12 of 64x64", 12, 12, 64, False, 10, "head", False),
                 ("grid 12x12, per row", 12, 12, 64, False, 10, "row", False),
                 ("grid 12x12, log", 12, 12, 64, False, 10, "log", False),
                 ("map 12x12", 12, 12, 64, False, 30, "head", True),
                 ("focus 512x512", 1, 1, 512, True, 10, "head", False),
                 ("focus 512x512, per row", 1, 1, 512, True, 10, "row", False),
                 ("focus 512x512, log", 1, 1, 512, True, 10, "log", False)]
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for name, layers, heads, side, focus, target, scale, map_ in scenarios:
                if args.only and args.only not in name:
                    continue
                context = browser.new_context(viewport={"width": 1400, "height": 900})
                result = measure(context.new_page(), base_url, layers, heads, side, args.seconds,
                                 focus, scale, map_)
                context.close()
                rows.append((name, result, target))
                log.info("%-22s %6.1f updates/s (fed %5.1f/s, %7d bytes/update)%s%s%s", name,
                         result["updates_per_s"], result["injected_per_s"],
                         result["bytes_per_update"], f"  target >= {target}" if target else "",
                         "" if result["map_ms_per_draw"] is None
                         else f"  drawMap {result['map_ms_per_draw']:.2f} ms/update",
                         "" if result["plotly_per_s"] is None
                         else f"  plotly axes redraws {result['plotly_per_s']:.1f}/s")
            if not args.skip_demo:
                times = first_heatmap_ms(browser, args.repeats)
                log.info("%-22s median %.0f ms (runs: %s)", "first heatmap (demo)",
                         statistics.median(times), ", ".join(f"{t:.0f}" for t in times))
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    failed = [name for name, r, target in rows if target and r["updates_per_s"] < target]
    if failed:
        log.info("below target: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
