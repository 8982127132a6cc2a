// Everything plotly: the focus view's axes (focus.js paints its pixels) or q/k/v norm
// plot, the head-entropy chart and the training curves. Redraws always go through Plotly.react with a fixed
// uirevision, so zoom and hover survive live updates.

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

export function labelsOf(header, axis, n) {
  const list = header.labels && header.labels[axis];
  return Array.isArray(list) && list.length === n ? list : null;
}

/**
 * Layout of the focus matrix view (focus.js) for `v` = {rows, cols, queries, keys}: key
 * tokens on top, query tokens down the side (row 0 at the top), one square cell per pair.
 */
export function focusAxes(v, uirevision) {
  return baseLayout({
    uirevision,
    hovermode: false, // focus.js shows the cell under the mouse itself
    xaxis: { ...AXIS, ...ticks(v.keys, v.cols), title: { text: "key token" }, side: "top", showgrid: false,
      zeroline: false, constrain: "domain", range: [-0.5, v.cols - 0.5] },
    yaxis: { ...AXIS, ...ticks(v.queries, v.rows), title: { text: "query token" }, showgrid: false,
      zeroline: false, scaleanchor: "x", constrain: "domain", range: [v.rows - 0.5, -0.5] },
    margin: { l: 72, r: 16, t: 56, b: 16 },
  });
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

/** Download a plot (its element, or a {data, layout} figure) as PNG or SVG through plotly. */
export function downloadPlot(target, format, filename) {
  return Plotly().downloadImage(target, { format, filename, width: 900, height: 900 });
}

export function purge(el) {
  if (plotlyReady()) Plotly().purge(el);
}
