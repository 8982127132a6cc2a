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
const MAX_TICK_CHARS = 14; // longer labels are cut on the axis; hover shows them whole
const TICK_FONT_PX = 12; // FONT.size: a row of tick text is about this tall
const CHAR_PX = 7; // and a character about this wide (system-ui at 12 px)
const DEFAULT_AXIS_PX = 720; // the axis length assumed when none is given (exports)

function truncate(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

/**
 * A token as the page shows it: whitespace made visible (a space "·", a newline "↵", a tab
 * "⇥"), and an empty token "∅", so " the" and "\n" do not look alike or blank.
 */
export function showToken(label) {
  const text = String(label);
  if (text === "") return "∅";
  return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
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

/**
 * Tick values/text for n positions along an axis of `px` pixels: every label when they
 * fit, else every k-th (k as small as fits). Labels are stacked along a vertical axis and,
 * along a horizontal one, written upright while they fit side by side, else turned 90°
 * (then each takes one line's height, as on a vertical axis).
 */
export function ticks(labels, n, px = DEFAULT_AXIS_PX, horizontal = false) {
  const texts = [];
  for (let i = 0; i < n; i++) texts.push(truncate(showToken(labels ? labels[i] ?? i : i), MAX_TICK_CHARS));
  const widest = texts.reduce((m, t) => Math.max(m, t.length), 1) * CHAR_PX + 6;
  const upright = horizontal && n * widest <= px;
  const room = upright ? widest : TICK_FONT_PX + 2;
  const every = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(px / room))));
  const vals = [];
  const text = [];
  for (let i = 0; i < n; i += every) {
    vals.push(i);
    text.push(escapePlotly(texts[i]));
  }
  const out = { tickvals: vals, ticktext: text, tickmode: "array" };
  if (horizontal) out.tickangle = upright ? 0 : -90;
  return out;
}

export function labelsOf(header, axis, n) {
  const list = header.labels && header.labels[axis];
  return Array.isArray(list) && list.length === n ? list : null;
}

/**
 * Layout of the focus matrix view (focus.js) for `v` = {rows, cols, queries, keys}: key
 * tokens on top, query tokens down the side (row 0 at the top), one square cell per pair.
 */
export function focusAxes(v, uirevision, px = DEFAULT_AXIS_PX) {
  // Square cells: both axes are about `px` long (the smaller side of the plot area).
  const side = Math.max(120, px);
  return baseLayout({
    uirevision,
    hovermode: false, // focus.js shows the cell under the mouse itself
    xaxis: { ...AXIS, ...ticks(v.keys, v.cols, side * Math.min(1, v.cols / v.rows), true), title: { text: "key token" }, side: "top", showgrid: false,
      zeroline: false, constrain: "domain", range: [-0.5, v.cols - 0.5] },
    yaxis: { ...AXIS, ...ticks(v.queries, v.rows, side * Math.min(1, v.rows / v.cols)), title: { text: "query token" }, showgrid: false,
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
    xaxis: { ...AXIS, ...ticks(labels, positions, Math.max(0, el.clientWidth - 72) || DEFAULT_AXIS_PX, true), title: { text: "position (token)" } },
    yaxis: { ...AXIS, title: { text: "L2 norm" }, rangemode: "tozero" },
    legend: { orientation: "h", y: 1.08 },
    margin: { l: 56, r: 16, t: 40, b: 56 },
  });
  return Plotly().react(el, traces, layout, PLOT_CONFIG);
}

/**
 * Whether a series is drawn with a point per value: when it has values at fewer than half
 * of the steps (a loss logged every N steps), or so few values that a line would not show.
 */
export function sparse(values) {
  let known = 0;
  for (const v of values) if (v !== null && v !== undefined) known += 1;
  return known < 40 || known < values.length / 2;
}

/**
 * Line chart of a Series; names matching `rightAxis` go on a second y axis. Gaps (steps
 * without a value) are bridged, and sparse series get a marker per value.
 */
export function drawSeries(el, series, { yTitle, yRange = null, rightAxis = null, uirevision }) {
  const traces = [];
  for (const [name, values] of series.values) {
    const right = rightAxis !== null && rightAxis(name);
    traces.push({
      type: "scatter",
      mode: sparse(values) ? "lines+markers" : "lines",
      connectgaps: true,
      marker: { size: 5 },
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
