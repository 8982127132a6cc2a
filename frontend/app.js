// Wiring: connection -> state -> drawing. Frames are kept in latest-value slots and drawn
// once per animation frame, so a burst of frames never queues up work in the page.

import { AlertView } from "./alerts.js";
import { api, Connection, socketUrl } from "./api.js";
import { BudgetBadge } from "./budget.js";
import { isCausal } from "./colormap.js";
import { exportCanvasSvg, exportFocus, exportGridPng, exportGridSvg, exportNpz, fileStem } from "./export.js";
import { Grid, placeTip, ROLE_TAGS, thumbnailTip } from "./grid.js";
import { changeSince, HeadMap, MAP_STATS } from "./headmap.js";
import { HistoryBar, seedRunHistory } from "./history.js";
import { LookPanel } from "./look.js";
import { exportHtml } from "./htmlexport.js";
import { FocusCanvas, focusFigure } from "./focus.js";
import { drawFocusNorms, drawSeries, plotlyReady, purge } from "./heatmaps.js";
import { classifyHead, RunHistory } from "./store.js";
import * as view from "./view.js";

const { el, els } = view;
const budgetBadge = new BudgetBadge(document.getElementById("budget"));
const OVERVIEW_MAX_SIDE = 64; // thumbnails are small: 64 keeps 144 cells cheap to ship and paint
const FOCUS_MAX_SIDE = 512;
const CHART_INTERVAL_MS = 500;
// A chart redraw (Plotly.react of 12 entropy lines and a legend) costs 50-300 ms on a
// 2-core machine: wait at least this many times its last cost before the next, so the
// charts never take more than ~1/8 of the page's time from the heatmaps and the map.
const CHART_COST_FACTOR = 8;
const HEADER_INTERVAL_MS = 250;
const PLOTLY_URL = "/vendor/plotly.min.js";
const PLOTLY_FALLBACK_MS = 1500; // load plotly anyway if no heatmap came by then
const MAP_DEFAULT_ABOVE = 16; // more heads than this: the overview starts as the map
const STATS_RING = 4000; // head_stats kept per layer for "change since N steps"
const CURVES_MS = 10_000; // the map's entropy curves (tooltips) are refetched this often
const ROLE_NAMES = {
  previous_token: "previous-token", sink: "first-token (sink)", diagonal: "self (diagonal)",
  local: "local", uniform: "uniform", induction: "induction", duplicate_token: "duplicate-token",
};

const state = {
  runs: [],
  runId: null,
  kind: els.kind.value,
  normStyle: els.normStyle.value,
  sample: 0,
  fps: Number(els.fps.value),
  focus: null, // {layer, head} while the focus view is open
  viewPaused: false,
  healthLayer: 0,
  history: new RunHistory(),
  pending: new Map(), // "kind:layer" -> latest undrawn frame
  lastFrames: new Map(), // "kind:layer" -> latest drawn frame (to open the focus view instantly)
  focusFrame: null,
  chartsDirty: false,
  healthDirty: new Set(),
  lastChartDraw: 0,
  chartInterval: CHART_INTERVAL_MS,
  lastHeaderDraw: 0,
  shownError: null,
  gridHasData: false,
  plotlyLoaded: false,
  plotlyRequested: false,
  overviewMode: els.overviewMode.value, // "grid" | "map"
  overviewChosen: false, // the user picked the mode: keep it across runs
  mapStat: "entropy",
  changeN: Number(els.changeN.value),
  scale: els.scale.value,
  heads: null, // the latest /heads answer (live, or at the scrubbed step)
  curvesRun: null, // the run whose entropy curves the map has (GET /heads?curve=entropy)
  headsRequest: 0,
  statsRing: new Map(), // layer -> [{step, heads, values}] for "change since N steps"
  mapDirty: false,
};

/** Test and benchmark hook: counters, plus inject() feeding the socket's own decode path. */
const debug = {
  framesReceived: 0,
  framesDrawn: 0,
  focusDrawn: 0,
  firstHeatmapMs: null,
  marks: {}, // first time (ms since navigation) of: socketOpen, hello, frame, plotly
  subscription: null,
  subscribed: null,
  decodeErrors: [],
  lastCapture: null,
  inject: (data) => connection.receive(data),
  headsPolled: 0, // GET /heads answers (the history slider)
  headsReceived: 0, // "heads" websocket messages
  mapDrawn: 0,
  mapDrawMs: 0, // time spent in drawMap (bench/browser.py reports it per update)
  state,
};
window.__attnscope = debug;
debug.budgetBadge = budgetBadge;

/** Add plotly.js to the page once (after the first heatmap, on opening the focus view, or late). */
function loadPlotly() {
  if (state.plotlyRequested) return;
  state.plotlyRequested = true;
  const script = document.createElement("script");
  script.src = PLOTLY_URL;
  script.async = true;
  script.onerror = () => view.showBanner(`could not load ${PLOTLY_URL}: the focus view and charts need it`);
  document.head.append(script);
}

function mark(name) {
  if (debug.marks[name] === undefined) debug.marks[name] = performance.now();
}

const grid = new Grid(els.grid, (layer, head) => openFocus(layer, head));
const headmap = new HeadMap(els.headmap, (layer, head) => openFocus(layer, head));
debug.headmap = headmap;
const focusView = new FocusCanvas(els.focusPlot, els.focusCanvas, els.focusColorbar);
debug.focusView = focusView;

const connection = new Connection(socketUrl(), {
  onState: (s, delay) => {
    if (s === "open") mark("socketOpen");
    view.setConnection(s, delay);
  },
  onJson: handleJson,
  onFrame: handleFrame,
  onDecodeError: (err) => {
    debug.decodeErrors.push(String(err.message));
    console.error("attnscope: dropped a message:", err.message);
  },
});

/** What the main view draws, for the history slider and the look panel to fetch. */
function shownView() {
  const model = state.run && state.run.model;
  if (state.focus) return { layers: [state.focus.layer], heads: [state.focus.head], maxSide: FOCUS_MAX_SIDE, kind: state.kind };
  // The map draws statistics (GET /heads?step=, asked by markStep): no snapshot frames.
  if (state.overviewMode === "map") return { layers: [], heads: null, maxSide: OVERVIEW_MAX_SIDE, kind: state.kind };
  return { layers: [...Array(model ? model.layers : 0).keys()], heads: null, maxSide: OVERVIEW_MAX_SIDE, kind: state.kind };
}

/** Frames fetched for the main view (a snapshot, a capture) drawn in place of the stream's. */
function showFrames(frames) {
  state.pending.clear();
  for (const frame of frames) state.pending.set(`${frame.header.kind}:${frame.header.layer}`, frame);
  drawPending();
}

// The step slider (frontend/history.js): while it is off "live", stream frames are ignored.
const historyBar = new HistoryBar({
  view: shownView,
  showFrames,
  onScrub: () => { state.pending.clear(); look.leave(false); },
  compareSources: () => look.compareSources(),
  onLive: () => resubscribe(), // a new subscription brings the current heads message
  seed: (index) => {
    seedRunHistory(state.history, index);
    state.chartsDirty = true;
  },
  markStep: (step) => { markCharts(); if (step !== null && step !== undefined) pollHeads(step); },
  noSnapshots: () => view.setWaiting("this run has ended and recorded no snapshots: its charts and roles are on the right"),
  banner: (text) => view.showBanner(text),
  openMark: (alert) => openAlert(alert),
});
debug.history = historyBar;
// Alerts (frontend/alerts.js): a banner and marks on the history bar; a click opens the head.
const alertView = new AlertView({ onOpen: (alert) => openAlert(alert), anchor: els.banner });
debug.alerts = alertView;

// "Look at an input" (frontend/look.js): a typed text's capture in the main view; while it is
// shown, stream frames are ignored as while the history slider is off "live".
const look = new LookPanel(document.querySelector("main.layout"), els.overview, {
  run: () => state.run,
  view: shownView,
  showFrames,
  showHeads: (answer) => applyHeads(answer, true),
  onShow: () => { historyBar.goLive(false); state.pending.clear(); },
  onLive: () => { // back to the stream: a new subscription brings its frames and heads message
    if (historyBar.ended && historyBar.steps.length) historyBar.scrubTo(historyBar.steps.length - 1);
    else resubscribe();
  },
  onResize: () => fitHeights(),
  rate: () => state.history.rate.rate(),
  step: () => state.history.step,
  compare: (a, b) => historyBar.compare.open(a, b, state.focus ? state.focus.layer : null,
    state.focus ? state.focus.head : null),
});
debug.look = look;
// While a capture is shown, a thumbnail's tip names the query and key tokens under the mouse.
const gridTip = el("div", { class: "focus-tip", hidden: "" });
document.body.append(gridTip);
debug.gridTip = gridTip;
els.grid.addEventListener("mousemove", (event) => {
  const text = look.showing ? thumbnailTip(event, (layer) => state.lastFrames.get(`${state.kind}:${layer}`)
    || state.lastFrames.get(`attention:${layer}`)) : null;
  if (text === null) gridTip.hidden = true;
  else placeTip(gridTip, text, event);
});
els.grid.addEventListener("mouseleave", () => { gridTip.hidden = true; });

/**
 * Heights that keep the history slider in view under the overview or the focus view:
 * the grid and the map size their cells, and the focus plot its height, to what the
 * window has left above the slider.
 */
const FOCUS_MIN_PX = 320;
const FOCUS_MAX_PX = 900;
function fitHeights() {
  const bar = historyBar.root;
  // the bar, the gaps above and below it, and the panel's padding and border
  const reserve = bar.hidden ? 0 : bar.offsetHeight + 44;
  grid.reserve = reserve;
  headmap.reserve = reserve;
  if (!els.focus.hidden) {
    const top = els.focusPlot.getBoundingClientRect().top + window.scrollY;
    const height = Math.round(window.innerHeight - top - reserve - 12);
    els.focusPlot.style.height = `${Math.max(FOCUS_MIN_PX, Math.min(FOCUS_MAX_PX, height))}px`;
    if (plotlyReady() && els.focusPlot._fullLayout) window.Plotly.Plots.resize(els.focusPlot);
  }
  grid.fit();
  headmap.fit();
}
window.addEventListener("resize", fitHeights);

/** The history slider's step as a line on the charts (they share the step axis), with the
 * role events (training chart) and the alerts (both charts). */
function markCharts() {
  if (!plotlyReady()) return;
  const shapes = [...HistoryBar.shape(historyBar.scrubbing ? historyBar.shownStep : null), ...alertView.shapes()];
  for (const el of [els.entropyPlot, els.curvesPlot]) {
    if (el.data) window.Plotly.relayout(el, { shapes: el === els.curvesPlot ? [...shapes, ...eventShapes] : shapes });
  }
}

/** Open what an alert names at its step: the head (focus view), or the layer's heads on
 * the entropy chart; the history slider goes to the step. */
function openAlert(alert) {
  if (alert.head === null || alert.head === undefined) {
    if (state.focus) closeFocus();
    state.healthLayer = alert.layer;
    els.healthLayer.value = String(alert.layer);
    state.chartsDirty = true;
  } else {
    openFocus(alert.layer, alert.head);
  }
  historyBar.scrubToStep(alert.step);
  debug.alertOpened = alert;
}

// ---------------------------------------------------------------- subscription

function subscription() {
  if (!state.runId) return null;
  const overview = state.focus === null;
  // The map needs statistics only: no attention frames for 144 heads it does not draw.
  // head_roles: a "heads" message (roles, role scores) when they change, at most 1/s.
  const kinds = overview && state.overviewMode === "map" ? ["head_stats", "scalars", "head_roles"]
    : [state.kind, "head_stats", "scalars", "head_roles"];
  return {
    type: "subscribe",
    run: state.runId,
    kinds,
    layers: overview ? null : [state.focus.layer],
    heads: overview ? null : [state.focus.head],
    sample: state.sample,
    max_fps: state.fps,
    max_side: overview ? OVERVIEW_MAX_SIDE : FOCUS_MAX_SIDE,
    dtype: "float16",
  };
}

function resubscribe() {
  if (historyBar.scrubbing) historyBar.scrubTo(historyBar.index); // the view changed: refetch
  if (look.showing) look.refetch();
  state.pending.clear();
  if (state.viewPaused) {
    connection.send({ type: "unsubscribe" });
    return;
  }
  const message = subscription();
  debug.subscription = message;
  if (message) connection.send(message);
}

// ---------------------------------------------------------------- messages

function handleJson(message) {
  switch (message.type) {
    case "hello":
      mark("hello");
      setRuns(message.runs || [], true);
      break;
    case "runs":
      setRuns(message.runs || [], false);
      break;
    case "subscribed":
      debug.subscribed = message;
      break;
    case "error":
      view.showBanner(`server rejected ${message.field ? `'${message.field}'` : "a request"}: ${message.message}`);
      // The previous subscription stays in force on the server: show what it delivers.
      if (message.field === "sample" && debug.subscribed) {
        state.sample = debug.subscribed.sample;
        els.sample.value = String(state.sample);
      }
      break;
    case "budget":
      if (message.run === state.runId) budgetBadge.show(message);
      break;
    case "scalars":
      if (message.run !== state.runId || state.viewPaused) return;
      state.history.addScalars(message);
      state.chartsDirty = true;
      break;
    case "head_stats":
      if (message.run !== state.runId || state.viewPaused) return;
      state.history.addHeadStats(message);
      state.healthDirty.add(message.layer);
      state.chartsDirty = true;
      if (!historyBar.scrubbing && !look.showing) {
        headmap.setLayerStats(message.layer, message.heads, message);
        state.mapDirty = true;
      }
      keepStats(message);
      break;
    case "heads": // roles and role scores, pushed when they change (server: heads_feed.py)
      if (message.run !== state.runId || state.viewPaused || historyBar.scrubbing || look.showing) return;
      debug.headsReceived += 1;
      state.headsRequest += 1; // a REST answer still on its way is older: drop it
      applyHeads(message);
      break;
    default:
      break; // pong and future message types
  }
}

function handleFrame(frame) {
  const { header } = frame;
  debug.framesReceived += 1;
  mark("frame");
  if (header.run !== state.runId || header.kind !== state.kind || header.sample !== state.sample) return;
  if (state.viewPaused || historyBar.scrubbing || look.showing) return;
  state.history.observeStep(header.step);
  state.pending.set(`${header.kind}:${header.layer}`, frame);
}

function setRuns(runs, fromHello) {
  state.runs = runs;
  const params = new URLSearchParams(window.location.search);
  const keep = runs.find((r) => r.id === state.runId);
  const wanted = keep || runs.find((r) => r.id === params.get("run"))
    || runs.find((r) => r.status === "live") || runs[0] || null;
  const previous = state.runId;
  const before = keep ? state.run : null;
  state.run = wanted;
  state.runId = wanted ? wanted.id : null;
  view.renderRunOptions(runs, state.runId);
  view.renderRunControls(state.run);
  if (!wanted || wanted.id !== previous) budgetBadge.reset(); // another run: its own figures
  budgetBadge.show(wanted ? wanted.budget : null);
  if (!wanted) {
    grid.build(0, 0);
    view.setWaiting("no runs yet — start one with Dashboard.start(model) or `attnscope demo`; "
      + "runs recorded in this server's data dir are listed here too");
    return;
  }
  const dims = (r) => (r && r.model ? `${r.model.layers}x${r.model.heads}` : "");
  if (wanted.id !== previous) {
    selectRun();
  } else if (wanted.status === "ended" && before && before.status !== "ended") {
    historyBar.setEnded(wanted.step); // it ended while shown: its last frames stay
  } else if (dims(before) !== dims(wanted)) {
    buildGrid();
    resubscribe();
  } else if (fromHello) {
    resubscribe();
  }
  if (wanted.error && state.shownError !== `${wanted.id}:${wanted.error}`) {
    state.shownError = `${wanted.id}:${wanted.error}`;
    view.showBanner(`run '${wanted.name || wanted.id}' ended with an error: ${wanted.error}`);
  }
  drawHeader(true);
}

function selectRun() {
  state.history = new RunHistory();
  state.heads = null;
  alertView.reset();
  historyBar.setMarks([]);
  headmap.setCurves({});
  state.curvesRun = null; // fetched once the run's heads come from the history
  state.statsRing = new Map();
  purge(els.entropyPlot);
  purge(els.curvesPlot);
  view.renderHealthList([], false);
  state.lastFrames.clear();
  state.focusFrame = null;
  if (state.focus) closeFocus(false);
  buildGrid();
  resubscribe();
  state.chartsDirty = true;
  historyBar.setRun(state.runId, state.healthLayer, state.run);
  look.setRun(state.runId);
}

function buildGrid() {
  const model = state.run && state.run.model;
  const layers = model ? model.layers : 0;
  const heads = model ? model.heads : 0;
  if (!state.overviewChosen) {
    state.overviewMode = layers * heads > MAP_DEFAULT_ABOVE ? "map" : "grid";
    els.overviewMode.value = state.overviewMode;
  }
  view.showOverviewMode(state.overviewMode, state.mapStat);
  setLegend();
  fitHeights();
  grid.build(layers, heads);
  headmap.build(layers, heads);
  if (state.heads) applyHeads(state.heads);
  state.gridHasData = false;
  state.healthLayer = Math.min(state.healthLayer, Math.max(0, layers - 1));
  view.renderLayerOptions(layers, state.healthLayer);
  const ended = state.run && state.run.status === "ended";
  view.setWaiting(!layers ? "this run reports no attention layers"
    : ended ? `this run ended at step ${state.run.step ?? "–"}: loading what was recorded…`
      : "waiting for the first step…");
}

// ---------------------------------------------------------------- drawing

function drawPending() {
  for (const frame of state.pending.values()) {
    const key = `${frame.header.kind}:${frame.header.layer}`;
    state.lastFrames.set(key, frame);
    if (state.focus) {
      if (frame.header.layer === state.focus.layer) drawFocus(frame);
    } else {
      grid.draw(frame);
      debug.framesDrawn += 1;
      if (debug.firstHeatmapMs === null) debug.firstHeatmapMs = performance.now();
      if (!state.gridHasData) {
        state.gridHasData = true;
        view.setWaiting("");
        setTimeout(loadPlotly, 50); // after this frame is on screen
      }
    }
  }
  state.pending.clear();
}

function drawMap() {
  state.mapDirty = false;
  const t0 = performance.now();
  headmap.stat = state.mapStat;
  headmap.draw(state.mapStat === "change" ? changeSince(state.statsRing, state.changeN) : null);
  debug.mapDrawn += 1;
  debug.mapDrawMs += performance.now() - t0;
  if (!state.gridHasData && headmap.values.size) {
    state.gridHasData = true;
    view.setWaiting("");
    setTimeout(loadPlotly, 50);
  }
}

/** Keep a layer's statistics by step (bounded) for "change since N steps". */
function keepStats(message) {
  let list = state.statsRing.get(message.layer);
  if (!list) state.statsRing.set(message.layer, (list = []));
  if (list.length && message.step <= list[list.length - 1].step) list.length = 0; // restarted
  list.push({ step: message.step, heads: message.heads, values: message });
  if (list.length > STATS_RING) list.splice(0, list.length - STATS_RING);
}

// ---------------------------------------------------------------- head roles

/** Every head's recorded entropy curve for the map's tooltips (GET /heads?curve=entropy),
 * refreshed every CURVES_MS while the map is shown. */
async function refreshCurves() {
  const runId = state.runId;
  // only a recorded run has curves (without history the heads come from the stream)
  if (!runId || state.viewPaused || !state.heads || state.heads.source === "stream") return;
  state.curvesRun = runId;
  try {
    const answer = await api.entropyCurves(runId);
    if (runId === state.runId) headmap.setCurves(answer);
  } catch {
    /* no history (503) or nothing recorded yet (404): no curves */
  }
}
setInterval(() => { if (state.overviewMode === "map" && !state.focus) refreshCurves(); }, CURVES_MS);

/** Ask the server for every head's roles at the history slider's step (live ones come
 * over the websocket as "heads" messages). */
async function pollHeads(step) {
  if (!state.runId || state.viewPaused) return;
  const id = ++state.headsRequest;
  const runId = state.runId;
  try {
    const answer = await api.heads(runId, step);
    if (id !== state.headsRequest || runId !== state.runId) return;
    debug.headsPolled += 1;
    applyHeads(answer, true);
  } catch (err) {
    if (err.status === 503) view.showBanner("the history slider needs the history (ATTNSCOPE_HISTORY_ENABLED)");
    // 404: nothing recorded at that step
  }
}

function applyHeads(answer, scrubbed = false) {
  state.heads = answer;
  const roles = [];
  const since = [];
  const byLayer = new Map();
  for (const h of answer.heads || []) {
    (roles[h.layer] ||= [])[h.head] = h.role;
    (since[h.layer] ||= [])[h.head] = h.since;
    if (!byLayer.has(h.layer)) byLayer.set(h.layer, { heads: [], values: {} });
    const entry = byLayer.get(h.layer);
    entry.heads.push(h.head);
    const values = scrubbed ? { ...h.stats } : { induction: h.stats.induction, duplicate_token: h.stats.duplicate_token };
    for (const [name, v] of Object.entries(values)) (entry.values[name] ||= []).push(v);
  }
  for (const [layer, { heads, values }] of byLayer) {
    headmap.setLayerStats(layer, heads, values);
    if (scrubbed) { // the head-health outlines and list, as they were at that step
      state.history.latestStats.set(layer, { ...values, layer, heads, step: answer.step });
      state.healthDirty.add(layer);
      state.chartsDirty = true;
    }
  }
  headmap.setRoles(roles, since);
  grid.setRoles(roles);
  state.mapDirty = true;
  const tagged = (answer.heads || []).filter((h) => h.role);
  const counts = {};
  for (const h of tagged) counts[h.role] = (counts[h.role] || 0) + 1;
  const summary = tagged.length
    ? `${Object.entries(counts).map(([r, n]) => `${n} ${ROLE_TAGS[r] ?? r}`).join(" · ")}${
      answer.step !== null ? ` (step ${answer.step})` : ""}`
    : answer.session || answer.step != null ? "no head has a role yet" : "waiting for the first step…";
  view.renderRoleEvents([...(answer.events || [])].reverse().slice(0, 100), summary);
  // Without history the roles come from the stream's statistics: say what is missing.
  view.setRolesNote(answer.source === "stream"
    ? "live from the stream's head statistics (no history recorded): previous-token, sink, "
      + "self, local and uniform roles; induction and duplicate-token need the history's "
      + "induction probe (ATTNSCOPE_HISTORY_ENABLED=true)" : "");
  markEvents(answer.events || []);
  if (!scrubbed) { // a scrubbed step's answer lists the alerts up to that step only
    alertView.update(answer.alerts || [], answer.session, true);
    historyBar.setMarks(alertView.marks());
    if (state.curvesRun !== state.runId && answer.session) refreshCurves();
  }
  if (state.focus) showFocusRole();
}

/** The role of the focused head, under its title. */
function showFocusRole() {
  const head = state.heads && (state.heads.heads || []).find(
    (h) => h.layer === state.focus.layer && h.head === state.focus.head);
  if (!head) { view.setFocusRole(""); return; }
  const s = head.scores;
  const scores = ["previous_token", "induction", "diagonal", "sink"].map(
    (r) => `${ROLE_TAGS[r]} ${Number.isFinite(s[r]) ? s[r].toFixed(2) : "–"}`).join(" · ");
  view.setFocusRole(head.role
    ? `${ROLE_NAMES[head.role] ?? head.role} head since step ${head.since} — ${scores}`
    : `no role — ${scores}`);
}

/** Role changes as dotted lines on the training chart (the timeline the slider shares). */
let eventShapes = [];
function markEvents(events) {
  eventShapes = events.filter((e) => e.kind === "gained").slice(-20).map((e) => ({
    type: "line", xref: "x", yref: "paper", x0: e.step, x1: e.step, y0: 0, y1: 1,
    line: { color: "#5ec962", width: 1, dash: "dot" }, name: e.text,
  }));
  state.chartsDirty = true;
}

function drawFocus(frame) {
  const index = frame.header.heads.indexOf(state.focus.head);
  if (index < 0) return;
  state.focusFrame = frame;
  if (!plotlyReady()) return; // drawn by tick() once plotly.js has loaded
  const rev = `${state.runId}:${state.focus.layer}:${state.focus.head}:${frame.header.kind}`;
  if (frame.header.kind === "qkv_norms") {
    focusView.clear();
    drawFocusNorms(els.focusPlot, frame, index, state.normStyle, rev);
  } else {
    focusView.draw(frame, index, state.scale, rev);
  }
  view.setFocusEmpty(false);
  debug.focusDrawn += 1;
}

function drawHealth() {
  for (const layer of state.healthDirty) {
    const stats = state.history.latestStats.get(layer);
    if (stats && !state.focus) grid.setHealth(stats);
  }
  state.healthDirty.clear();
  const flagged = [];
  for (const [layer, stats] of [...state.history.latestStats].sort((a, b) => a[0] - b[0])) {
    stats.heads.forEach((head, i) => {
      const { level, reasons } = classifyHead({
        entropy: stats.entropy[i], first_token: stats.first_token?.[i], nan: stats.nan[i], inf: stats.inf[i],
      });
      if (level !== "ok") flagged.push({ layer, head, level, reasons });
    });
  }
  flagged.sort((a, b) => (a.level === b.level ? 0 : a.level === "bad" ? -1 : 1));
  view.renderHealthList(flagged.slice(0, 50), state.history.latestStats.size > 0);
}

function drawCharts() {
  if (!plotlyReady()) return;
  const series = state.history.entropy.get(state.healthLayer);
  if (!series) purge(els.entropyPlot);
  else {
    drawSeries(els.entropyPlot, series, {
      yTitle: `entropy (layer ${state.healthLayer})`, yRange: [0, 1.02], uirevision: `entropy:${state.healthLayer}`,
    });
  }
  if (state.history.scalars.steps.length) {
    drawSeries(els.curvesPlot, state.history.scalars, {
      yTitle: "loss", rightAxis: (name) => name !== "loss", uirevision: `curves:${state.runId}`,
    });
  }
  if (historyBar.scrubbing || eventShapes.length || alertView.alerts.length) markCharts();
}

function drawHeader(force = false) {
  const now = performance.now();
  if (!force && now - state.lastHeaderDraw < HEADER_INTERVAL_MS) return;
  state.lastHeaderDraw = now;
  const step = state.history.step ?? (state.run ? state.run.step : null);
  view.renderHeader(state.run, step, state.history.rate.rate(now));
}

function tick() {
  requestAnimationFrame(tick);
  if (!state.plotlyLoaded && plotlyReady()) {
    state.plotlyLoaded = true;
    mark("plotly");
    state.chartsDirty = true;
    if (state.focus && state.focusFrame) drawFocus(state.focusFrame);
  }
  if (state.viewPaused) return;
  if (state.pending.size) drawPending();
  if (state.mapDirty && !state.focus && state.overviewMode === "map") drawMap();
  drawHeader();
  const now = performance.now();
  if (state.chartsDirty && now - state.lastChartDraw > state.chartInterval) {
    state.chartsDirty = false;
    state.lastChartDraw = now;
    drawHealth();
    drawCharts();
    const cost = performance.now() - now;
    state.chartInterval = Math.max(CHART_INTERVAL_MS, CHART_COST_FACTOR * cost);
  }
}

// ---------------------------------------------------------------- focus view

function openFocus(layer, head) {
  const model = state.run && state.run.model;
  if (!model) return;
  layer = Math.max(0, Math.min(model.layers - 1, layer));
  head = Math.max(0, Math.min(model.heads - 1, head));
  state.focus = { layer, head };
  state.focusFrame = null;
  loadPlotly();
  view.showFocus(layer, head, state.kind);
  view.setFocusEmpty(true);
  showFocusRole();
  fitHeights();
  state.healthLayer = layer;
  els.healthLayer.value = String(layer);
  state.chartsDirty = true;
  const cached = state.lastFrames.get(`${state.kind}:${layer}`);
  if (cached && cached.header.heads.includes(head)) drawFocus(cached);
  resubscribe();
}

function closeFocus(subscribe = true) {
  state.focus = null;
  state.focusFrame = null;
  focusView.clear();
  purge(els.focusPlot);
  view.showOverview();
  fitHeights(); // sized while hidden, if the window changed meanwhile
  state.mapDirty = true;
  if (subscribe) resubscribe();
  for (const layer of state.history.latestStats.keys()) state.healthDirty.add(layer);
  state.chartsDirty = true;
}

function onKey(event) {
  if (!state.focus || event.target.closest("input, select, textarea")) return;
  const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
  if (event.key === "Escape") {
    closeFocus();
  } else if (moves[event.key]) {
    const [dl, dh] = moves[event.key];
    openFocus(state.focus.layer + dl, state.focus.head + dh);
  } else {
    return;
  }
  event.preventDefault();
}

// ---------------------------------------------------------------- controls

function setKind(kind) {
  state.kind = kind;
  view.setNormStyleVisible(kind === "qkv_norms");
  state.lastFrames.clear();
  buildGrid();
  for (const layer of state.history.latestStats.keys()) state.healthDirty.add(layer);
  state.chartsDirty = true;
  if (state.focus) {
    view.showFocus(state.focus.layer, state.focus.head, kind);
    view.setFocusEmpty(true);
    focusView.clear();
    purge(els.focusPlot);
  }
  resubscribe();
}

/** Colour scale of thumbnails, focus view and exports: redraw what is on screen with it. */
function setLegend() {
  els.legendScale.textContent = state.overviewMode === "map" && !state.focus
    ? `low → high (${MAP_STATS[state.mapStat].label})` : `low → high (${els.scale.selectedOptions[0].text})`;
}

function setScale(scale) {
  state.scale = scale;
  grid.scale = scale;
  setLegend();
  for (const frame of state.lastFrames.values()) if (!state.focus) grid.draw(frame);
  if (state.focus && state.focusFrame) drawFocus(state.focusFrame);
}

async function runControl(action) {
  if (!state.runId) return;
  try {
    const result = await api.control(state.runId, action);
    if (result && result.id === state.runId && result.status) {
      state.run = { ...state.run, ...result };
      view.renderRunControls(state.run);
      drawHeader(true);
    }
  } catch (err) {
    view.showBanner(err.message);
  }
}

function exportView(format) {
  const step = state.history.step ?? "na";
  if (state.focus) {
    if (!plotlyReady()) return;
    // A matrix is exported as a whole plotly heatmap (the live view paints a canvas).
    const frame = state.focusFrame;
    const index = frame ? frame.header.heads.indexOf(state.focus.head) : -1;
    // The file says the scale its colours are in ("auto" resolved for this head).
    const [, rows, cols] = frame ? frame.shape : [0, 0, 0];
    const scale = state.scale !== "auto" ? state.scale : index >= 0 && frame.header.kind === "attention"
      && isCausal(frame.data, index * rows * cols, rows, cols) ? "row" : "head";
    const stem = fileStem("attnscope", state.runId, `L${state.focus.layer}H${state.focus.head}`, state.kind, scale, `step${step}`);
    const target = frame && frame.header.kind !== "qkv_norms" && index >= 0
      ? focusFigure(frame, index, state.scale) : els.focusPlot;
    exportFocus(target, format, stem).catch((err) => view.showBanner(`export failed: ${err.message}`));
  } else if (state.overviewMode === "map") {
    const stem = fileStem("attnscope", state.runId, "map", state.mapStat, `step${step}`);
    const title = `${state.run ? state.run.name || state.runId : ""} · ${MAP_STATS[state.mapStat].label} · step ${step}`;
    if (format === "png") exportGridPng(headmap, stem);
    else exportCanvasSvg(headmap.composite(2), title, stem);
  } else {
    const stem = fileStem("attnscope", state.runId, "overview", state.kind, state.scale, `step${step}`);
    const title = `${state.run ? state.run.name || state.runId : ""} · ${state.kind} · ${state.scale} scale · step ${step}`;
    if (format === "png") exportGridPng(grid, stem);
    else exportGridSvg(grid, title, stem);
  }
}

async function exportMatrices() {
  const step = state.history.step ?? "na";
  const focus = state.focus;
  const frame = focus ? state.focusFrame : state.lastFrames.values().next().value;
  const where = focus ? `L${focus.layer}H${focus.head}` : "all";
  try {
    debug.lastCapture = await exportNpz({
      run: state.runId, frame, kind: state.kind,
      layers: focus ? [focus.layer] : null, heads: focus ? [focus.head] : null,
      stem: fileStem("attnscope", state.runId, where, state.kind, `step${step}`),
    });
  } catch (err) {
    const missing = err.status === 404 || err.status === 405;
    view.showBanner(missing ? "npz export needs the capture API (POST /api/v1/captures), which this server does not offer"
      : `npz export failed: ${err.message}`);
  }
}

/** The view on screen as a standalone .html file (frontend/htmlexport.js). */
async function exportStandalone() {
  const focus = state.focus;
  const shown = focus ? "focus" : state.overviewMode === "map" ? "map" : "overview";
  const frames = focus ? [state.focusFrame].filter(Boolean) : shown === "map" ? []
    : [...state.lastFrames.values()].filter((f) => f.header.kind === state.kind);
  const step = (frames.length ? frames[0].header.step : state.history.step) ?? "na"; // scrubbed too
  const where = focus ? `L${focus.layer}H${focus.head}` : shown;
  try {
    debug.lastHtmlExport = await exportHtml({
      run: state.run, step, kind: state.kind, view: shown, scale: state.scale, focus, frames, headmap,
      stem: fileStem("attnscope", state.runId, where, state.kind, `step${step}`),
    });
  } catch (err) {
    view.showBanner(`HTML export failed: ${err.message}`);
  }
}

els.kind.addEventListener("change", () => setKind(els.kind.value));
els.normStyle.addEventListener("change", () => {
  state.normStyle = els.normStyle.value;
  if (state.focus && state.focusFrame) drawFocus(state.focusFrame);
});
els.sample.addEventListener("change", () => {
  const sample = Number.parseInt(els.sample.value, 10);
  state.sample = Number.isInteger(sample) && sample >= 0 ? sample : 0;
  els.sample.value = String(state.sample);
  state.lastFrames.clear();
  buildGrid();
  resubscribe();
});
els.fps.addEventListener("change", () => {
  state.fps = Number(els.fps.value);
  resubscribe();
});
els.pauseView.addEventListener("click", () => {
  state.viewPaused = !state.viewPaused;
  view.setViewPaused(state.viewPaused);
  resubscribe();
});
els.overviewMode.addEventListener("change", () => {
  state.overviewMode = els.overviewMode.value;
  if (state.overviewMode === "map") refreshCurves();
  state.overviewChosen = true;
  view.showOverviewMode(state.overviewMode, state.mapStat);
  setLegend();
  headmap.fit();
  state.mapDirty = true;
  resubscribe();
});
els.mapStat.addEventListener("change", () => {
  state.mapStat = els.mapStat.value;
  view.showOverviewMode(state.overviewMode, state.mapStat);
  setLegend();
  state.mapDirty = true;
});
els.changeN.addEventListener("change", () => {
  const n = Number.parseInt(els.changeN.value, 10);
  state.changeN = Number.isInteger(n) && n > 0 ? n : 100;
  els.changeN.value = String(state.changeN);
  state.mapDirty = true;
});
els.scale.addEventListener("change", () => setScale(els.scale.value));
els.roleEvents.addEventListener("click", (event) => {
  const li = event.target.closest("li[data-layer]");
  if (li) openFocus(Number(li.dataset.layer), Number(li.dataset.head));
});
els.runPause.addEventListener("click", () => runControl("pause"));
els.runResume.addEventListener("click", () => runControl("resume"));
els.runRestart.addEventListener("click", () => runControl("restart"));
els.runDelete.addEventListener("click", async () => {
  const run = state.run;
  if (!run || !window.confirm(`Delete run '${run.name || run.id}' with its recorded history and captures?`)) return;
  try {
    await api.remove(run.id); // the server's "runs" message then lists the others
  } catch (err) {
    view.showBanner(err.message);
  }
});
els.runSelect.addEventListener("change", () => {
  state.runId = els.runSelect.value;
  const address = new URL(window.location.href); // a reload opens the same run
  address.searchParams.set("run", state.runId);
  window.history.replaceState(null, "", address);
  state.run = state.runs.find((r) => r.id === state.runId) || null;
  view.renderRunControls(state.run);
  selectRun();
  drawHeader(true);
});
els.healthLayer.addEventListener("change", () => {
  state.healthLayer = Number(els.healthLayer.value);
  state.chartsDirty = true;
});
els.focusBack.addEventListener("click", () => closeFocus());
els.exportPng.addEventListener("click", () => exportView("png"));
els.exportSvg.addEventListener("click", () => exportView("svg"));
els.exportNpz.addEventListener("click", () => exportMatrices());
els.exportHtml.addEventListener("click", () => exportStandalone());
els.bannerClose.addEventListener("click", () => view.hideBanner());
document.addEventListener("keydown", onKey);

view.setNormStyleVisible(state.kind === "qkv_norms");
view.renderMapStats(MAP_STATS, state.mapStat);
grid.scale = state.scale;
connection.open();
requestAnimationFrame(tick);
setTimeout(loadPlotly, PLOTLY_FALLBACK_MS);
