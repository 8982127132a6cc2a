// Everything plotly: the focus view (heatmap or q/k/v norm plot), the head-entropy
// chart and the training curves. Redraws always go through Plotly.react with a fixed
// uirevision, so zoom and hover survive live updates.

import { scaleMatrix, VIRIDIS } from "./colormap.js";

const Plotly = () => window.Plotly;

/** plotly.js loads asynchronously (index.html); nothing here may run before it has. */
export function plotlyReady() {
  return typeof window.Plotly !== "undefined";
}

export const PLOT_CONFIG = {
  displaylogo: false,
  responsive: true,
  modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d"],
};

const FONT = { color: "#d7dae0", family: "system-ui, -apple-system, Segoe UI, sans-serif", size: 12 };
const AXIS = { gridcolor: "#2a2f3a", zerolinecolor: "#2a2f3a", linecolor: "#3a4050", automargin: true };
const NORM_COLOURS = ["#4cc9f0", "#f72585", "#ffd166"];
const MAX_TICKS = 40;
const MAX_TICK_CHARS = 14; // longer labels are cut on the axis; hover shows them whole

function truncate(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

/** Escape text for plotly's pseudo-HTML labels (ticks, hover, titles). */
export function escapePlotly(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;");
}

function baseLayout(extra) {
  return {
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    font: FONT,
    margin: { l: 56, r: 16, t: 16, b: 48 },
    ...extra,
  };
}

/** Tick values/text for n positions with labels; at most MAX_TICKS shown. */
function ticks(labels, n) {
  const every = Math.max(1, Math.ceil(n / MAX_TICKS));
  const vals = [];
  const text = [];
  for (let i = 0; i < n; i += every) {
    vals.push(i);
    text.push(escapePlotly(truncate(String(labels ? labels[i] ?? i : i), MAX_TICK_CHARS)));
  }
  return { tickvals: vals, ticktext: text, tickmode: "array" };
}

function labelsOf(header, axis, n) {
  const list = header.labels && header.labels[axis];
  return Array.isArray(list) && list.length === n ? list : null;
}

let hoverCache = { key: null, data: null };

/** customdata[i][j] = [query label, key label, i, j], escaped; rebuilt only when labels change. */
function hoverData(queries, keys, rows, cols) {
  const key = `${rows}x${cols}|${queries ? queries.join("\u0000") : ""}|${keys ? keys.join("\u0000") : ""}`;
  if (hoverCache.key === key) return hoverCache.data;
  const q = Array.from({ length: rows }, (_, i) => escapePlotly(queries ? queries[i] : i));
  const k = Array.from({ length: cols }, (_, j) => escapePlotly(keys ? keys[j] : j));
  const data = q.map((ql, i) => k.map((kl, j) => [ql, kl, i, j]));
  hoverCache = { key, data };
  return data;
}

/**
 * Focus heatmap of head `index` of an attention / qk_logits frame (shape (h, L, S)).
 * Rows are query tokens, columns key tokens; non-finite cells are gaps.
 */
export function drawFocusMatrix(el, frame, index, uirevision, scale = "head") {
  const { header, data, shape } = frame;
  const rows = shape[1];
  const cols = shape[2];
  const start = index * rows * cols;
  const scaled = scaleMatrix(scale, header.kind, data, start, rows, cols);
  const { zmin, zmax } = scaled;
  const z = new Array(rows);
  for (let r = 0; r < rows; r++) {
    const row = new Array(cols);
    const base = scaled.offset + r * cols;
    for (let c = 0; c < cols; c++) {
      const v = scaled.values[base + c];
      row[c] = Number.isFinite(v) ? v : null;
    }
    z[r] = row;
  }
  const queries = labelsOf(header, "queries", rows);
  const keys = labelsOf(header, "keys", cols);
  const what = scaled.title;
  const trace = {
    type: "heatmap",
    z,
    zmin,
    zmax,
    colorscale: VIRIDIS,
    customdata: hoverData(queries, keys, rows, cols),
    hovertemplate: `query #%{customdata[2]}: <b>%{customdata[0]}</b><br>`
      + `key #%{customdata[3]}: <b>%{customdata[1]}</b><br>${what} %{z:.4f}<extra></extra>`,
    colorbar: { title: { text: what, side: "right" }, outlinewidth: 0, tickfont: FONT },
    hoverongaps: false,
    zsmooth: "fast", // one pixel per cell, scaled crisp: ~25% faster than per-brick rects at 512x512
  };
  const layout = baseLayout({
    uirevision,
    xaxis: { ...AXIS, ...ticks(keys, cols), title: { text: "key token" }, side: "top", showgrid: false, constrain: "domain" },
    yaxis: { ...AXIS, ...ticks(queries, rows), title: { text: "query token" }, autorange: "reversed", showgrid: false, scaleanchor: "x", constrain: "domain" },
    margin: { l: 72, r: 16, t: 56, b: 16 },
  });
  return Plotly().react(el, [trace], layout, PLOT_CONFIG);
}

/** Focus plot of per-position q/k/v norms of head `index` (frame shape (3, h, P)) as bars or lines. */
export function drawFocusNorms(el, frame, index, style, uirevision) {
  const { header, data, shape } = frame;
  const [, heads, positions] = shape;
  const labels = labelsOf(header, "queries", positions) || labelsOf(header, "keys", positions);
  const x = Array.from({ length: positions }, (_, p) => p);
  const traces = ["query", "key", "value"].map((name, r) => {
    const start = (r * heads + index) * positions;
    const y = Array.from(data.subarray(start, start + positions), (v) => (Number.isFinite(v) ? v : null));
    const common = { name: `‖${name[0]}‖ ${name}`, x, y, marker: { color: NORM_COLOURS[r] },
      hovertemplate: `position %{x}<br>${name} norm %{y:.3f}<extra></extra>` };
    return style === "line"
      ? { ...common, type: "scatter", mode: "lines+markers", line: { color: NORM_COLOURS[r], width: 2 } }
      : { ...common, type: "bar" };
  });
  const layout = baseLayout({
    uirevision,
    barmode: "group",
    xaxis: { ...AXIS, ...ticks(labels, positions), title: { text: "position (token)" } },
    yaxis: { ...AXIS, title: { text: "L2 norm" }, rangemode: "tozero" },
    legend: { orientation: "h", y: 1.08 },
    margin: { l: 56, r: 16, t: 40, b: 56 },
  });
  return Plotly().react(el, traces, layout, PLOT_CONFIG);
}

/** Line chart of a Series; names matching `rightAxis` go on a second y axis. */
export function drawSeries(el, series, { yTitle, yRange = null, rightAxis = null, uirevision }) {
  const traces = [];
  for (const [name, values] of series.values) {
    const right = rightAxis !== null && rightAxis(name);
    traces.push({
      type: "scatter",
      mode: "lines",
      name: escapePlotly(name),
      x: series.steps.slice(), // copies: Plotly.react compares arrays by reference
      y: values.slice(),
      yaxis: right ? "y2" : "y",
      line: { width: 1.5 },
      hovertemplate: `${escapePlotly(name)} %{y:.4g} at step %{x}<extra></extra>`,
    });
  }
  const layout = baseLayout({
    uirevision,
    height: 220,
    showlegend: true,
    legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom", font: { size: 10 } },
    xaxis: { ...AXIS, title: { text: "step", standoff: 4 } },
    yaxis: { ...AXIS, title: { text: yTitle }, ...(yRange ? { range: yRange } : { rangemode: "tozero" }) },
    margin: { l: 48, r: rightAxis ? 48 : 12, t: 36, b: 36 },
  });
  if (rightAxis) {
    layout.yaxis2 = { ...AXIS, overlaying: "y", side: "right", showgrid: false, rangemode: "tozero" };
  }
  return Plotly().react(el, traces, layout, { ...PLOT_CONFIG, displayModeBar: false });
}

/** Download the focus plot as PNG or SVG through plotly. */
export function downloadPlot(el, format, filename) {
  return Plotly().downloadImage(el, { format, filename, width: 900, height: 900 });
}

export function purge(el) {
  if (plotlyReady()) Plotly().purge(el);
}
