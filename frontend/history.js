// History: a step slider under the overview / focus views, "live", play / pause, and a
// compare panel (two runs or two steps, side by side, plus their difference).
// Data: GET /api/v1/runs/{id}/history (index) and .../history/frame (one snapshot as a
// protocol frame, decoded like the stream's). This module builds its own DOM (the bar
// and the compare panel) and talks to app.js only through the hooks it is given.

import { parseFrame } from "./decode.js";
import { paintMatrix } from "./colormap.js";
import { Series } from "./store.js";
import { el } from "./view.js";

const API = "/api/v1";
const REFRESH_MS = 3000; // while live, how often the slider's range catches up with the run
const PLAY_MS = 150; // one snapshot per tick while playing

const runPath = (id) => `${API}/runs/${encodeURIComponent(id)}/history`;

async function getJson(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch { /* keep statusText */ }
    const error = new Error(`GET ${url} failed (${response.status}): ${detail}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

/** One snapshot of one layer as a decoded frame ({header, data, shape}). */
export async function fetchSnapshot(runId, { step, layer, heads = null, maxSide = 128, session = null }) {
  const params = new URLSearchParams({ step: String(step), layer: String(layer), max_side: String(maxSide) });
  if (heads) params.set("heads", heads.join(","));
  if (session) params.set("session", session);
  const response = await fetch(`${runPath(runId)}/frame?${params}`);
  if (!response.ok) throw new Error(`snapshot of step ${step}, layer ${layer}: HTTP ${response.status}`);
  return parseFrame(await response.arrayBuffer());
}

function addStylesheet() {
  if (document.querySelector('link[href="history.css"]')) return;
  document.head.append(el("link", { rel: "stylesheet", href: "history.css" }));
}

/**
 * The slider bar. hooks: runId() -> string|null; view() -> {layers: int[], heads: int[]|null,
 * maxSide}; showFrames(frames) draws decoded frames in place of the live ones; onScrub() and
 * onLive() are called when leaving / returning to the stream; seed(index) gets the first index
 * (with statistics) so charts can show the whole run; noSnapshots() says an ended run has
 * none to show; banner(text) reports errors.
 */
export class HistoryBar {
  constructor(hooks) {
    this.hooks = hooks;
    this.steps = []; // recorded snapshot steps, ascending
    this.index = -1; // slider position while scrubbing
    this.scrubbing = false;
    this.playing = null; // interval id
    this.runId = null;
    this.session = null;
    this.request = 0; // newest request id: older answers are dropped
    this.lastResponseMs = null; // input -> frames drawn, for tests and bench/history.py
    this.shownStep = null;
    this.timer = null;
    this.ended = false; // the run has ended: no live stream, the slider is all there is
    this.endStep = null; // its last step
    addStylesheet();
    this.build();
  }

  build() {
    this.slider = el("input", { type: "range", min: "0", max: "0", step: "1", value: "0", id: "history-slider",
      "aria-label": "training step" });
    this.live = el("button", { type: "button", id: "history-live", class: "live", "aria-pressed": "true",
      title: "Back to the live stream" }, "● live");
    this.play = el("button", { type: "button", id: "history-play", title: "Play through the history" }, "▶");
    this.label = el("span", { id: "history-step", class: "history-step", text: "live" });
    this.compareButton = el("button", { type: "button", id: "history-compare-open",
      title: "Compare two runs or two steps" }, "compare");
    // Alert marks sit over the slider's track, at their steps' snapshot positions.
    this.marksBox = el("div", { id: "history-marks", class: "history-marks" });
    this.track = el("span", { class: "history-track" }, this.slider, this.marksBox);
    this.marks = [];
    this.root = el("section", { id: "history", class: "panel history-bar", "aria-label": "history" },
      this.play, this.track, this.label, this.live, this.compareButton);
    const main = document.querySelector("main.layout");
    main.append(this.root);
    this.compare = new ComparePanel(main, this);
    this.slider.addEventListener("input", () => this.scrubTo(Number(this.slider.value)));
    this.live.addEventListener("click", () => this.goLive());
    this.play.addEventListener("click", () => (this.playing ? this.stopPlaying() : this.startPlaying()));
    this.compareButton.addEventListener("click", () => this.compare.toggle());
    this.root.addEventListener("keydown", (event) => {
      if (event.key === "l") this.goLive();
    });
  }

  /**
   * A new run was selected (`run`: its summary): load its index (with statistics for the
   * charts). A run that has ended opens on its last snapshot, as it was when it ended.
   */
  async setRun(runId, layer = 0, run = null) {
    this.goLive(false);
    this.runId = runId;
    this.session = null;
    this.steps = [];
    this.ended = false;
    this.updateSlider();
    clearInterval(this.timer);
    if (!runId) return;
    const ended = Boolean(run && run.status === "ended");
    const params = new URLSearchParams({ layer: String(layer) });
    if (run && run.session) params.set("session", run.session);
    try {
      const index = await getJson(`${runPath(runId)}?${params}`);
      if (runId !== this.runId) return;
      this.session = index.session;
      this.steps = index.snapshots.map((s) => s.step);
      this.hooks.seed(index);
    } catch (err) {
      if (err.status === 503) { // the server records no history: no slider
        this.root.hidden = true;
        return;
      }
      if (err.status !== 404) this.hooks.banner(err.message);
    }
    if (runId !== this.runId) return;
    this.root.hidden = false;
    if (ended) {
      this.setEnded(run.step);
      if (this.steps.length) this.scrubTo(this.steps.length - 1);
      else this.hooks.noSnapshots();
      return;
    }
    this.updateSlider();
    this.timer = setInterval(() => this.refresh(), REFRESH_MS);
    // A remote run whose publisher is away sends nothing: show what it recorded meanwhile.
    if (run && run.status === "idle" && this.steps.length) this.scrubTo(this.steps.length - 1);
  }

  /** The run ended (while shown, or before it was opened): no "live" to go back to. */
  setEnded(step) {
    this.ended = true;
    this.endStep = step ?? null;
    clearInterval(this.timer);
    this.live.hidden = true;
    this.root.classList.add("ended");
    this.updateSlider();
  }

  /** Extend the slider with snapshots recorded since (no statistics: the stream has them). */
  async refresh() {
    if (!this.runId) return;
    const last = this.steps.length ? this.steps[this.steps.length - 1] : -1;
    try {
      const params = new URLSearchParams({ from: String(last + 1), stats: "false" });
      const index = await getJson(`${runPath(this.runId)}?${params}`);
      if (index.session !== this.session) { // the first step, or the run started over
        this.session = index.session;
        this.steps = [];
        const full = await getJson(`${runPath(this.runId)}?stats=false`);
        this.steps = full.snapshots.map((s) => s.step);
      } else {
        for (const snap of index.snapshots) if (snap.step > last) this.steps.push(snap.step);
      }
      this.updateSlider();
    } catch {
      /* no history yet: keep trying */
    }
  }

  /** Marks on the timeline: [{step, title, level, alert}]; a click calls hooks.openMark(alert). */
  setMarks(marks) {
    this.marks = marks || [];
    this.drawMarks();
  }

  /** The slider position of `step`: its snapshot, or the last one before it (0 if none). */
  indexAt(step) {
    let i = 0;
    while (i + 1 < this.steps.length && this.steps[i + 1] <= step) i += 1;
    return i;
  }

  drawMarks() {
    const n = this.steps.length;
    const nodes = this.marks.map((mark) => {
      const i = this.indexAt(mark.step);
      const button = el("button", { type: "button", class: `history-mark ${mark.level}`, title: mark.title,
        "aria-label": mark.title, "data-step": String(mark.step) });
      // the thumb's centre runs from half a thumb (8 px) in to half a thumb before the end
      const f = n > 1 ? i / (n - 1) : 0;
      button.style.left = `calc(${(100 * f).toFixed(3)}% + ${(8 - 16 * f).toFixed(2)}px)`;
      button.addEventListener("click", () => this.hooks.openMark(mark.alert));
      return button;
    });
    this.marksBox.replaceChildren(...nodes);
    this.marksBox.hidden = n === 0;
  }

  /** Show the snapshot at or before `step` (an alert's). */
  scrubToStep(step) {
    if (this.steps.length) this.scrubTo(this.indexAt(step));
  }

  updateSlider() {
    if (this.marks.length) this.drawMarks();
    const n = this.steps.length;
    this.slider.max = String(Math.max(0, n - 1));
    this.slider.disabled = n === 0;
    this.play.disabled = n === 0;
    if (!this.scrubbing) this.slider.value = String(Math.max(0, n - 1));
    if (!this.ended) {
      this.live.hidden = false;
      this.root.classList.remove("ended");
    }
    const end = this.endStep === null ? "" : ` at step ${this.endStep}`;
    this.label.textContent = this.scrubbing && this.shownStep !== null
      ? `step ${this.shownStep}${this.ended ? ` · ended${end}` : ""}`
      : this.ended ? `ended${end} · ${n} snapshots`
        : n ? `live · ${n} snapshots` : "live · no history yet";
    this.label.title = this.ended ? "this run has ended: the slider shows what was recorded" : "";
  }

  /** Show the snapshot at slider position i for every visible head. */
  async scrubTo(i) {
    if (!this.runId || !this.steps.length) return;
    const t0 = performance.now();
    i = Math.max(0, Math.min(this.steps.length - 1, i));
    this.index = i;
    this.slider.value = String(i);
    if (!this.scrubbing) {
      this.scrubbing = true;
      this.live.setAttribute("aria-pressed", "false");
      this.root.classList.add("scrubbing");
      this.hooks.onScrub();
    }
    const step = this.steps[i];
    const id = ++this.request;
    const { layers, heads, maxSide } = this.hooks.view();
    try {
      const frames = await Promise.all(layers.map((layer) => fetchSnapshot(this.runId, {
        step, layer, heads, maxSide, session: this.session })));
      if (id !== this.request || !this.scrubbing) return; // a newer position, or live again
      this.shownStep = step;
      this.hooks.showFrames(frames);
      this.updateSlider();
      this.hooks.markStep(step);
      requestAnimationFrame(() => { this.lastResponseMs = performance.now() - t0; });
    } catch (err) {
      if (id === this.request) this.hooks.banner(err.message);
    }
  }

  goLive(notify = true) {
    if (this.ended && notify) return; // nothing live to go back to
    this.stopPlaying();
    const was = this.scrubbing;
    this.scrubbing = false;
    this.shownStep = null;
    this.request += 1;
    this.live.setAttribute("aria-pressed", "true");
    this.root.classList.remove("scrubbing");
    this.updateSlider();
    this.hooks.markStep(null);
    if (was && notify) this.hooks.onLive();
  }

  startPlaying() {
    if (!this.steps.length) return;
    if (!this.scrubbing || this.index >= this.steps.length - 1) this.scrubTo(0);
    this.play.textContent = "❚❚";
    this.playing = setInterval(() => {
      if (this.index >= this.steps.length - 1) this.stopPlaying();
      else this.scrubTo(this.index + 1);
    }, PLAY_MS);
  }

  stopPlaying() {
    clearInterval(this.playing);
    this.playing = null;
    this.play.textContent = "▶";
  }

  /** The slider's step as a vertical line on a plotly chart (null: no line). */
  static shape(step) {
    return step === null ? [] : [{ type: "line", xref: "x", yref: "paper", x0: step, x1: step, y0: 0, y1: 1,
      line: { color: "#f4a261", width: 2, dash: "dot" } }];
  }
}

/** Series for the charts from a history index: entropy per head of its layer, and scalars. */
export function seriesFromIndex(index) {
  const entropy = new Series(4000);
  const scalars = new Series(4000);
  const { stats } = index;
  stats.steps.forEach((step, row) => {
    const record = {};
    index.heads.forEach((h, i) => { record[`head ${h}`] = stats.entropy[row][i]; });
    entropy.push(step, record);
    const values = {};
    for (const [name, list] of Object.entries(stats.scalars)) values[name] = list[row];
    scalars.push(step, values);
  });
  return { entropy, scalars };
}

// ---------------------------------------------------------------- compare

const DIVERGING = (() => { // blue (negative) - near black (0) - red (positive), 256 steps
  const lut = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    const t = i / 255 * 2 - 1;
    const r = Math.round(255 * Math.max(0, t));
    const b = Math.round(255 * Math.max(0, -t));
    const g = Math.round(40 * (1 - Math.abs(t)));
    lut[i] = (255 << 24) | (b << 16) | (g << 8) | r; // little-endian RGBA
  }
  return lut;
})();

function paintCanvas(canvas, data, rows, cols, diverging = false) {
  canvas.width = cols;
  canvas.height = rows;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(cols, rows);
  const pixels = new Uint32Array(image.data.buffer);
  if (diverging) {
    let m = 0;
    for (const v of data) if (Number.isFinite(v)) m = Math.max(m, Math.abs(v));
    m = m || 1;
    for (let i = 0; i < data.length; i++) {
      const v = Number.isFinite(data[i]) ? data[i] : 0;
      pixels[i] = DIVERGING[Math.round((v / m + 1) / 2 * 255)];
    }
    canvas.title = `difference, max |A - B| = ${m.toFixed(4)}`;
  } else {
    paintMatrix(pixels, data, 0, rows, cols, 0, 1);
  }
  ctx.putImageData(image, 0, 0);
}

/**
 * Two picks of the same layer / head, side by side, plus A - B: each a (run, step) of the
 * history, or an input captured from the page (`bar.hooks.compareSources()`: [{value, label,
 * fetch(layer, head, step) -> frame}], frontend/look.js; the step picks a pinned input's
 * capture at or before it). Hover a cell for its tokens and the three values.
 */
class ComparePanel {
  constructor(main, bar) {
    this.bar = bar;
    this.frames = null; // [A, B] as drawn, for the hover
    this.tip = el("div", { class: "focus-tip", hidden: "" });
    document.body.append(this.tip);
    const pick = (side) => {
      const run = el("select", { id: `compare-run-${side}`, "aria-label": `run ${side}` });
      const step = el("input", { id: `compare-step-${side}`, type: "number", min: "0", step: "1",
        "aria-label": `step ${side}` });
      return { run, step, box: el("span", { class: "compare-pick" }, `${side.toUpperCase()} `, run, " step ", step) };
    };
    this.a = pick("a");
    this.b = pick("b");
    this.layer = el("input", { id: "compare-layer", type: "number", min: "0", value: "0", "aria-label": "layer" });
    this.head = el("input", { id: "compare-head", type: "number", min: "0", value: "0", "aria-label": "head" });
    this.go = el("button", { type: "button", id: "compare-go" }, "compare");
    this.message = el("span", { id: "compare-message", class: "waiting" });
    this.canvases = ["a", "b", "diff"].map((name) => el("canvas", { id: `compare-${name}`, class: "compare-canvas" }));
    const figures = this.canvases.map((canvas, i) => el("figure", {}, canvas,
      el("figcaption", { text: ["A", "B", "A − B"][i] })));
    this.root = el("section", { id: "compare", class: "panel compare-panel", "aria-label": "compare", hidden: "" },
      el("div", { class: "panel-head" }, el("h2", { text: "Compare" }), this.a.box, this.b.box,
        " layer ", this.layer, " head ", this.head, this.go, this.message),
      el("div", { class: "compare-figures" }, ...figures));
    main.append(this.root);
    this.go.addEventListener("click", () => this.run());
    for (const canvas of this.canvases) {
      canvas.addEventListener("mousemove", (event) => this.hover(event));
      canvas.addEventListener("mouseleave", () => { this.tip.hidden = true; });
    }
    this.sessions = [];
    this.sources = [];
  }

  /** Show the panel comparing `a` and `b` ({value, step}: a session or an input's value). */
  async open(a, b, layer = null, head = null) {
    this.root.hidden = false;
    await this.loadSessions();
    for (const [side, pick] of [[this.a, a], [this.b, b]]) {
      side.run.value = pick.value;
      side.step.value = pick.step === null || pick.step === undefined ? "" : String(pick.step);
    }
    if (layer !== null) this.layer.value = String(layer);
    if (head !== null) this.head.value = String(head);
    await this.run();
    this.root.scrollIntoView({ block: "nearest" });
  }

  /** The query and key under the mouse, with their tokens, and A, B and A − B there. */
  hover(event) {
    const frames = this.frames;
    const canvas = event.target;
    if (!frames || !canvas.width) { this.tip.hidden = true; return; }
    const box = canvas.getBoundingClientRect();
    const row = Math.floor(((event.clientY - box.top) / box.height) * canvas.height);
    const col = Math.floor(((event.clientX - box.left) / box.width) * canvas.width);
    const values = frames.map((f) => (row < f.shape[1] && col < f.shape[2] ? f.data[row * f.shape[2] + col] : NaN));
    const token = (f, axis, i) => {
      const list = f.header.labels && f.header.labels[axis];
      return Array.isArray(list) && i < list.length ? ` “${String(list[i]).replace(/\n/g, "↵")}”` : "";
    };
    const fmt = (v) => (Number.isFinite(v) ? v.toFixed(4) : "–");
    const lines = [`query #${row}${token(frames[0], "queries", row)}${
      token(frames[1], "queries", row) !== token(frames[0], "queries", row) ? ` /${token(frames[1], "queries", row)}` : ""}`,
    `key #${col}${token(frames[0], "keys", col)}${
      token(frames[1], "keys", col) !== token(frames[0], "keys", col) ? ` /${token(frames[1], "keys", col)}` : ""}`,
    `A ${fmt(values[0])} · B ${fmt(values[1])}`];
    if (this.lastDiff && canvas === this.canvases[2]) lines.push(`A − B ${fmt(values[0] - values[1])}`);
    this.tip.textContent = lines.join("\n");
    this.tip.hidden = false;
    this.tip.style.left = `${event.pageX + 14}px`;
    this.tip.style.top = `${event.pageY + 14}px`;
  }

  async toggle() {
    this.root.hidden = !this.root.hidden;
    if (!this.root.hidden) await this.loadSessions();
  }

  async loadSessions() {
    try {
      this.sessions = await getJson(`${API}/history`);
    } catch (err) {
      this.message.textContent = err.message;
      return;
    }
    for (const side of [this.a, this.b]) {
      const keep = side.run.value;
      side.run.replaceChildren(...this.sessions.map((s) => {
        const option = el("option", { value: s.session });
        option.textContent = `${s.run}${s.live ? " (live)" : ""} · ${s.started.slice(0, 19)} · steps ${s.first_step ?? "–"}–${s.last_step ?? "–"}`;
        return option;
      }));
      this.sources = this.bar.hooks.compareSources ? this.bar.hooks.compareSources() : [];
      if (this.sources.length) {
        const group = el("optgroup", { label: "inputs (look at an input)" });
        group.append(...this.sources.map((source) => {
          const option = el("option", { value: source.value });
          option.textContent = source.label;
          return option;
        }));
        side.run.append(group);
      }
      if (keep) side.run.value = keep;
    }
    const current = this.sessions.find((s) => s.session === this.bar.session) || this.sessions[0];
    if (current && !this.a.step.value) {
      this.a.run.value = current.session;
      this.b.run.value = current.session;
      this.a.step.value = String(current.first_step ?? 0);
      this.b.step.value = String(current.last_step ?? 0);
    }
  }

  async run() {
    const layer = Number(this.layer.value);
    const head = Number(this.head.value);
    const sessionOf = (id) => this.sessions.find((s) => s.session === id);
    const sourceOf = (value) => this.sources.find((s) => s.value === value);
    try {
      const frames = await Promise.all([this.a, this.b].map((side) => {
        const step = side.step.value === "" ? null : Number(side.step.value);
        const source = sourceOf(side.run.value);
        if (source) return source.fetch(layer, head, step);
        const s = sessionOf(side.run.value);
        if (!s) throw new Error("pick a run or an input for A and B");
        return fetchSnapshot(s.run, { step: step ?? 0, layer, heads: [head], maxSide: 256, session: s.session });
      }));
      this.frames = frames;
      this.lastDiff = null;
      const [fa, fb] = frames;
      const [, rows, cols] = fa.shape;
      paintCanvas(this.canvases[0], fa.data, rows, cols);
      paintCanvas(this.canvases[1], fb.data, fb.shape[1], fb.shape[2]);
      if (fb.shape[1] !== rows || fb.shape[2] !== cols) {
        this.message.textContent = `shapes differ (${rows}x${cols} vs ${fb.shape[1]}x${fb.shape[2]}): `
          + "A − B needs two inputs of one length";
        this.canvases[2].width = 0;
        return;
      }
      const diff = new Float32Array(rows * cols);
      for (let i = 0; i < diff.length; i++) diff[i] = fa.data[i] - fb.data[i];
      paintCanvas(this.canvases[2], diff, rows, cols, true);
      const what = (f) => `${f.header.capture ? "input " : ""}step ${f.header.step ?? "–"}`;
      this.message.textContent = `A: ${what(fa)} · B: ${what(fb)}`;
      this.lastDiff = diff;
    } catch (err) {
      this.message.textContent = err.message;
    }
  }
}

/**
 * Give a page's RunHistory the whole recorded run for the charts: the index's entropy (its
 * layer) and scalars, followed by whatever the stream added after the index's last step.
 */
export function seedRunHistory(history, index) {
  const { entropy, scalars } = seriesFromIndex(index);
  const append = (into, from) => {
    if (!from) return;
    const last = into.steps.length ? into.steps[into.steps.length - 1] : -Infinity;
    from.steps.forEach((step, i) => {
      if (step <= last) return;
      const record = {};
      for (const [name, values] of from.values) record[name] = values[i];
      into.push(step, record);
    });
  };
  append(entropy, history.entropy.get(index.layer));
  append(scalars, history.scalars);
  history.entropy.set(index.layer, entropy);
  history.scalars = scalars;
}
