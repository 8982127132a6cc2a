// The standalone page (attnscope.show, the live page's "HTML" export): every head of one
// input, from the data embedded in this file (docs/standalone.md). No server, no network.
// The overview grid, the layers x heads map, the colour scales and the focus figure are the
// live page's own modules; the focus view is a whole plotly heatmap, with plotly's hover.
// attnscope.core.bundle turns these modules into one classic script (file:// and iframe srcdoc
// cannot import modules).

import { SCALES } from "./colormap.js";
import { decodeFloat16 } from "./decode.js";
import { focusFigure } from "./focus.js";
import { Grid, placeTip, quoteToken, ROLE_TAGS, thumbnailTip, VALUE_NAMES } from "./grid.js";
import { HeadMap, MAP_STATS } from "./headmap.js";
import { drawFocusNorms, labelsOf } from "./heatmaps.js";

const byId = (id) => document.getElementById(id);
const els = {
  title: byId("title"), subtitle: byId("subtitle"), notes: byId("notes"),
  modeWrap: byId("mode-wrap"), overviewMode: byId("overview-mode"),
  mapStatWrap: byId("map-stat-wrap"), mapStat: byId("map-stat"),
  scaleWrap: byId("scale-wrap"), scale: byId("scale"), legendScale: byId("legend-scale"),
  overview: byId("overview"), grid: byId("grid"), headmap: byId("headmap"),
  focus: byId("focus"), focusTitle: byId("focus-title"), focusRole: byId("focus-role"),
  focusEmpty: byId("focus-empty"), focusPlot: byId("focus-plot"), focusBack: byId("focus-back"),
};

const data = JSON.parse(byId("attnscope-data").textContent);
const frames = new Map(); // layer -> {header, data, shape}, as the live page decodes a frame
const state = { mode: "grid", scale: data.scale || "head", mapStat: "entropy", focus: null };

function bytesOf(base64) {
  const text = atob(base64);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

/** One embedded frame ({kind, layer, heads, shape, dtype, pool, labels, data}) decoded. */
export function decodeEntry(entry) {
  const count = entry.shape.reduce((a, b) => a * b, 1);
  const bytes = bytesOf(entry.data);
  const per = entry.dtype === "float16" ? 2 : 4;
  if (bytes.length !== count * per) {
    throw new Error(`layer ${entry.layer}: shape ${entry.shape} needs ${count * per} bytes, got ${bytes.length}`);
  }
  const values = per === 2 ? decodeFloat16(bytes.buffer, 0, count) : new Float32Array(bytes.buffer, 0, count);
  const header = { kind: entry.kind, layer: entry.layer, heads: entry.heads, labels: entry.labels,
    pool: entry.pool, sample: 0 };
  return { header, data: values, shape: entry.shape };
}

/** Text for plotly's hover labels, which read <, > and & as markup (and no &quot;). */
function hoverText(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function fmt(v) {
  return Number.isFinite(v) ? v.toFixed(4) : "–";
}

const grid = new Grid(els.grid, (layer, head) => openFocus(layer, head));
const headmap = new HeadMap(els.headmap, (layer, head) => { if (frames.has(layer)) openFocus(layer, head); });
const tip = document.createElement("div");
tip.className = "focus-tip";
tip.hidden = true;
document.body.append(tip);

// ---------------------------------------------------------------- overview

function setMode(mode) {
  state.mode = mode;
  els.overviewMode.value = mode;
  els.grid.hidden = mode !== "grid";
  els.headmap.hidden = mode !== "map";
  els.mapStatWrap.hidden = mode !== "map";
  els.scaleWrap.hidden = mode === "map" || !frames.size;
  els.legendScale.textContent = mode === "map"
    ? `low → high (${MAP_STATS[state.mapStat].label})` : `low → high (${SCALES[state.scale] ?? state.scale})`;
  if (mode === "map") {
    headmap.fit();
    headmap.stat = state.mapStat;
    headmap.draw();
  } else {
    grid.fit();
  }
}

function drawGrid() {
  grid.scale = state.scale;
  for (const frame of frames.values()) grid.draw(frame);
}

/** Query, key and value under the mouse on a thumbnail (beside the mouse, on the side with
 * room: an iframe in a notebook is short). */
function hoverGrid(event) {
  const text = thumbnailTip(event, (layer) => frames.get(layer));
  if (text === null) tip.hidden = true;
  else placeTip(tip, text, event);
}

// ---------------------------------------------------------------- focus view

/** The focus figure with plotly's hover: both tokens and the value of the cell. */
function hoverFigure(frame, index) {
  const figure = focusFigure(frame, index, state.scale);
  const [, rows, cols] = frame.shape;
  const queries = labelsOf(frame.header, "queries", rows);
  const keys = labelsOf(frame.header, "keys", cols);
  const start = index * rows * cols;
  const customdata = new Array(rows);
  for (let r = 0; r < rows; r++) {
    const q = hoverText(quoteToken(queries, r));
    const row = new Array(cols);
    for (let c = 0; c < cols; c++) row[c] = [r, q, c, hoverText(quoteToken(keys, c)), fmt(frame.data[start + r * cols + c])];
    customdata[r] = row;
  }
  const trace = figure.data[0];
  const name = VALUE_NAMES[frame.header.kind] ?? "value";
  const shown = trace.colorbar.title.text;
  trace.customdata = customdata;
  trace.hovertemplate = "query #%{customdata[0]} %{customdata[1]}<br>key #%{customdata[2]} %{customdata[3]}"
    + `<br>${name} %{customdata[4]}`
    + `${shown === name ? "" : `<br>${hoverText(shown)} %{z:.4f}`}<extra></extra>`;
  figure.layout.hovermode = "closest";
  return figure;
}

function drawFocus() {
  const { layer, head } = state.focus;
  const frame = frames.get(layer);
  const index = frame ? frame.header.heads.indexOf(head) : -1;
  els.focusEmpty.hidden = index >= 0;
  if (index < 0) {
    window.Plotly.purge(els.focusPlot);
    return;
  }
  const rev = `${layer}:${head}:${frame.header.kind}`;
  if (frame.header.kind === "qkv_norms") {
    drawFocusNorms(els.focusPlot, frame, index, "bar", rev);
    return;
  }
  const figure = hoverFigure(frame, index);
  figure.layout.uirevision = rev;
  window.Plotly.react(els.focusPlot, figure.data, figure.layout, figure.config);
}

function openFocus(layer, head) {
  layer = Math.max(0, Math.min(data.model.layers - 1, layer));
  head = Math.max(0, Math.min(data.model.heads - 1, head));
  state.focus = { layer, head };
  tip.hidden = true;
  els.overview.hidden = true;
  els.focus.hidden = false;
  els.scaleWrap.hidden = !frames.size;
  const name = data.model.names && data.model.names[layer];
  els.focusTitle.textContent = `Layer ${layer} · head ${head}${name ? ` — ${name}` : ""}`;
  const role = data.roles && data.roles[layer] ? data.roles[layer][head] : null;
  els.focusRole.textContent = role ? `${ROLE_TAGS[role] ?? role} head` : "";
  drawFocus();
}

function closeFocus() {
  state.focus = null;
  window.Plotly.purge(els.focusPlot);
  els.focus.hidden = true;
  els.overview.hidden = false;
  setMode(state.mode);
}

function onKey(event) {
  if (!state.focus || event.target.closest("input, select, textarea")) return;
  const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
  if (event.key === "Escape") closeFocus();
  else if (moves[event.key]) openFocus(state.focus.layer + moves[event.key][0], state.focus.head + moves[event.key][1]);
  else return;
  event.preventDefault();
}

// ---------------------------------------------------------------- start

function start() {
  document.title = data.title ? `attnscope · ${data.title}` : "attnscope";
  els.title.textContent = data.title || "";
  els.subtitle.textContent = data.subtitle || "";
  els.notes.textContent = (data.notes || []).join(" · ");
  els.notes.hidden = !(data.notes || []).length;
  for (const entry of data.frames || []) frames.set(entry.layer, decodeEntry(entry));

  const { layers, heads } = data.model;
  grid.build(layers, heads);
  for (const cell of grid.cells.values()) cell.button.removeAttribute("title"); // the tip says it
  headmap.build(layers, heads);
  for (const s of data.stats || []) headmap.setLayerStats(s.layer, s.heads, s.values);
  headmap.setRoles(data.roles || [], []);
  grid.setRoles(data.roles || []);
  for (const [key, button] of headmap.cells) {
    button.classList.toggle("no-matrix", !frames.has(Number(key.split(":")[0])));
  }

  for (const [value, label] of Object.entries(SCALES)) els.scale.add(new Option(label, value, false, value === state.scale));
  const present = new Set((data.stats || []).flatMap((s) => Object.entries(s.values)
    .filter(([, list]) => list.some((v) => Number.isFinite(v))).map(([name]) => name)));
  for (const [value, spec] of Object.entries(MAP_STATS)) {
    if (present.has(value)) els.mapStat.add(new Option(spec.label, value));
  }
  state.mapStat = present.has("entropy") ? "entropy" : els.mapStat.value;
  els.modeWrap.hidden = !present.size || !frames.size; // only one of the two views to offer
  drawGrid();

  els.overviewMode.addEventListener("change", () => setMode(els.overviewMode.value));
  els.mapStat.addEventListener("change", () => { state.mapStat = els.mapStat.value; setMode("map"); });
  els.scale.addEventListener("change", () => {
    state.scale = els.scale.value;
    drawGrid();
    if (state.focus) drawFocus();
    else setMode(state.mode);
  });
  els.grid.addEventListener("mousemove", hoverGrid);
  els.grid.addEventListener("mouseleave", () => { tip.hidden = true; });
  els.focusBack.addEventListener("click", closeFocus);
  document.addEventListener("keydown", onKey);

  setMode(data.view === "map" || !frames.size ? "map" : "grid");
  if (data.view === "focus" && data.focus) openFocus(data.focus.layer, data.focus.head);
}

start();

/** Test hook, as the live page's window.__attnscope. */
window.__attnscope = { standalone: true, data, frames, grid, headmap, openFocus, closeFocus, state };
