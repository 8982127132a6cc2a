"""The page without a server: frame decoding and colours checked against numpy and
plotly.js, escaping, and the run selector, driven through the page's own decode path.

The page and its ES modules come from a stdlib static server, so these need no
attnscope server; they pin the byte-level contract of docs/protocol.md.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser


def encode(header: dict, array: np.ndarray) -> bytes:
    """A frame exactly as docs/protocol.md lays it out (header padded to 8-byte payload)."""
    raw = json.dumps(header).encode()
    raw += b" " * (-(4 + len(raw)) % 8)
    return struct.pack("<I", len(raw)) + raw + array.tobytes()


DECODE = """async ([bytes]) => {
  const m = await import('/decode.js');
  const buf = new Uint8Array(bytes).buffer;
  try {
    const f = m.parseFrame(buf);
    const name = (v) => Number.isNaN(v) ? 'nan' : v === Infinity ? 'inf'
      : v === -Infinity ? '-inf' : v;
    return {header: f.header, shape: f.shape, data: Array.from(f.data, name)};
  } catch (err) { return {error: err.message, field: err.field}; }
}"""


def js_values(values: list) -> np.ndarray:
    table = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
    return np.array([table[v] if isinstance(v, str) else v for v in values], dtype=np.float64)


def test_float16_frames_decode_exactly(blank):
    # zeros, normals, the largest half, the smallest normal, subnormals, infinities, NaN
    special = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 6.1e-5, 5.96e-8, 3.0e-6, np.inf, -np.inf,
                        np.nan, 0.333], dtype="<f2")
    rng = np.random.default_rng(0)
    values = np.concatenate([special, rng.normal(size=36).astype("<f2")]).reshape(2, 4, 6)
    header = {"type": "frame", "run": "r", "step": 3, "kind": "qk_logits", "layer": 0,
              "heads": [0, 1], "sample": 0, "shape": [2, 4, 6], "dtype": "float16",
              "scale": None, "offset": None, "pool": 1, "role": "self", "labels": None}
    frame = encode(header, values)
    assert (len(frame) - values.nbytes) % 8 == 0
    out = blank.evaluate(DECODE, [list(frame)])
    assert out["shape"] == [2, 4, 6] and out["header"]["step"] == 3
    np.testing.assert_array_equal(js_values(out["data"]), values.astype(np.float64).ravel())


def test_uint8_frames_use_scale_and_offset(blank):
    raw = np.arange(0, 256, 16, dtype=np.uint8).reshape(1, 4, 4)
    header = {"type": "frame", "run": "r", "step": 1, "kind": "attention", "layer": 2, "heads": [1],
              "sample": 0, "shape": [1, 4, 4], "dtype": "uint8", "scale": 0.5, "offset": -1.0,
              "pool": 1, "role": "self", "labels": {"queries": list("abcd"), "keys": list("abcd")}}
    out = blank.evaluate(DECODE, [list(encode(header, raw))])
    np.testing.assert_allclose(js_values(out["data"]), -1.0 + 0.5 * raw.ravel(), rtol=0, atol=1e-6)
    assert out["header"]["labels"]["queries"] == list("abcd")


def test_malformed_frames_name_the_bad_field(blank):
    header = {"type": "frame", "shape": [2, 2], "dtype": "float16"}
    short = encode(header, np.zeros(3, dtype="<f2"))
    assert blank.evaluate(DECODE, [list(short)])["field"] == "shape"
    bad_dtype = encode({**header, "dtype": "float64"}, np.zeros(4, dtype="<f2"))
    assert blank.evaluate(DECODE, [list(bad_dtype)])["field"] == "dtype"


def test_grid_colours_match_plotly_viridis(blank):
    """The canvas colour map is plotly.js's Viridis: same stops, so grid and focus view agree."""
    import plotly

    blank.add_script_tag(path=str(Path(plotly.__file__).parent / "package_data" / "plotly.min.js"))
    ours = blank.evaluate("async () => (await import('/colormap.js')).VIRIDIS")
    theirs = blank.evaluate("""async () => {
      const d = document.createElement('div'); document.body.append(d);
      await Plotly.newPlot(d, [{type: 'heatmap', z: [[0, 1]], colorscale: 'Viridis'}]);
      return d._fullData[0].colorscale; }""")
    assert [round(t, 6) for t, _ in ours] == [round(float(t), 6) for t, _ in theirs]
    assert [c.lower() for _, c in ours] == [c.lower() for _, c in theirs]
    ends = blank.evaluate("""async () => { const m = await import('/colormap.js');
      const px = new Uint32Array(3);
      m.paintMatrix(px, new Float32Array([0, 1, NaN]), 0, 1, 3, 0, 1);
      const b = new Uint8Array(px.buffer); return Array.from(b); }""")
    assert ends[0:4] == [0x44, 0x01, 0x54, 255]  # #440154 at zmin
    assert ends[4:8] == [0xFD, 0xE7, 0x25, 255]  # #fde725 at zmax
    assert ends[8:12] == [0, 0, 0, 0]  # NaN is a transparent gap, as in plotly


def test_log_scale_by_table_matches_log10_per_pixel(blank):
    """The log scale paints through a table on each float's top bits: within one colour
    step of log10 per pixel, weights under 1e-4 at the floor, NaN and Inf transparent."""
    diff = blank.evaluate("""async () => {
      const m = await import('/colormap.js');
      const n = 4000;
      const data = new Float32Array(n + 4);
      for (let i = 0; i < n; i++) data[i] = 10 ** (-6 + 6 * i / (n - 1));  // 1e-6 .. 1
      data.set([NaN, Infinity, -1, 0], n);
      const fast = new Uint32Array(n + 4);
      m.paintScaled(fast, m.scaleMatrix('log', 'attention', data, 0, 1, n + 4), 1, n + 4);
      const exact = new Float32Array(n + 4);
      for (let i = 0; i < n + 4; i++) exact[i] = Number.isFinite(data[i])
        ? Math.log10(Math.max(data[i], m.LOG_FLOOR)) : NaN;
      const slow = new Uint32Array(n + 4);
      m.paintMatrix(slow, exact, 0, 1, n + 4, Math.log10(m.LOG_FLOOR), 0);
      const index = new Map(Array.from(m.LUT32, (c, i) => [c, i]));
      let worst = 0;
      for (let i = 0; i < n; i++) {
        worst = Math.max(worst, Math.abs(index.get(fast[i]) - index.get(slow[i])));
      }
      const at = (i) => index.get(fast[i]);
      return { worst, tail: Array.from(fast.slice(n)), floor: at(n + 2), zero: at(n + 3),
               first: at(0), last: at(n - 1) };
    }""")
    assert diff["worst"] <= 1, diff
    assert diff["tail"][:2] == [0, 0]  # NaN, Inf: gaps
    assert diff["floor"] == diff["zero"] == diff["first"] == 0  # -1, 0, 1e-6: the floor
    assert diff["last"] == 255


def test_token_labels_are_escaped(page, static_url):
    """Labels and run names go through textContent and plotly escaping, never markup."""
    page.goto(static_url + "/index.html")  # the page itself; its socket fails, which is fine
    page.wait_for_function("() => window.__attnscope !== undefined")
    evil = "<img src=x onerror=window.__pwned=1>"
    run = {"id": "r", "name": evil, "status": "live", "step": 0, "started": None, "error": None,
           "controls": [], "model": {"layers": 1, "heads": 1, "attention_type": "full",
                                     "d_model": 8, "seq_len": 3}}
    page.evaluate("(m) => window.__attnscope.inject(JSON.stringify(m))",
                  {"type": "hello", "protocol": 1, "server": "t", "kinds": [], "runs": [run]})
    header = {"type": "frame", "run": "r", "step": 1, "kind": "attention", "layer": 0, "heads": [0],
              "sample": 0, "shape": [1, 3, 3], "dtype": "float16", "scale": None, "offset": None,
              "pool": 1, "role": "self",
              "labels": {"queries": [evil, "b", "c"], "keys": ["x", evil, "z"]}}
    frame = encode(header, np.eye(3, dtype="<f2")[None])
    page.evaluate("(b) => window.__attnscope.inject(new Uint8Array(b).buffer)", list(frame))
    page.wait_for_function("() => window.__attnscope.framesDrawn > 0")
    assert page.locator("#run-name").text_content() == evil
    page.click("#grid .cell")
    page.wait_for_function("() => window.__attnscope.focusDrawn > 0")
    # shown as text, its spaces made visible
    assert page.locator("#focus-plot .ytick text").first.text_content().startswith("<img·src=x")
    assert page.locator("img").count() == 0
    assert page.evaluate("() => window.__pwned") is None


def summary(run_id: str, layers: int, heads: int) -> dict:
    return {"id": run_id, "name": f"run {run_id}", "status": "live", "step": 0, "started": None,
            "error": None, "controls": ["pause", "resume"],
            "model": {"layers": layers, "heads": heads, "attention_type": "full", "d_model": 8,
                      "seq_len": 4}}


def test_run_selector_switches_grid_and_subscription(page, static_url):
    page.goto(static_url + "/index.html")
    page.wait_for_function("() => window.__attnscope !== undefined")
    hello = {"type": "hello", "protocol": 1, "server": "t", "kinds": [],
             "runs": [summary("a", 2, 3), summary("b", 4, 5)]}
    page.evaluate("(m) => window.__attnscope.inject(JSON.stringify(m))", hello)
    options = page.locator("#run-select option").all_text_contents()
    assert options == ["run a (live)", "run b (live)"]
    assert page.locator("#grid .cell").count() == 2 * 3
    assert page.evaluate("() => window.__attnscope.subscription.run") == "a"
    page.select_option("#run-select", "b")
    assert page.locator("#grid .cell").count() == 4 * 5
    assert page.evaluate("() => window.__attnscope.subscription.run") == "b"
    assert page.locator("#run-name").text_content() == "run b"
    assert page.locator("#run-pause").is_visible() and page.locator("#run-restart").is_hidden()
    # A frame of the run no longer shown is ignored, one of the selected run is drawn.
    header = {"type": "frame", "run": "a", "step": 1, "kind": "attention", "layer": 0,
              "heads": [0], "sample": 0, "shape": [1, 4, 4], "dtype": "float16", "scale": None,
              "offset": None, "pool": 1, "role": "self", "labels": None}
    inject = "(b) => window.__attnscope.inject(new Uint8Array(b).buffer)"
    page.evaluate(inject, list(encode(header, np.eye(4, dtype="<f2")[None])))
    page.evaluate(inject, list(encode({**header, "run": "b"}, np.eye(4, dtype="<f2")[None])))
    page.wait_for_function("() => window.__attnscope.framesDrawn === 1")
    page.wait_for_timeout(200)
    assert page.evaluate("() => window.__attnscope.framesDrawn") == 1
