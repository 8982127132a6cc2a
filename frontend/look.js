// "Look at an input": a text box above the overview. The text is captured by the run's model
// (POST /api/v1/captures: tokenized by the run's tokenizer, one forward pass between two
// training steps) and every layer and head of it is drawn in the main view (overview, map,
// focus view) in place of the stream, with its token strings. "Pin" captures it again every
// k steps while the run trains (/api/v1/pins; docs/captures.md): a slider scrubs through those
// captures. "compare" puts two inputs (or two captures of a pinned one) side by side in the
// compare panel. This module builds its own DOM and talks to app.js only through its hooks.

import { api } from "./api.js";
import { el } from "./view.js";

const PIN_REFRESH_MS = 2000; // how often pinned inputs are asked for their new captures
const RECENT = 20; // the run's latest captures listed as inputs
const LOOK_KINDS = ["attention", "qk_logits"]; // what a look captures (the view's kinds)
const TEXT_CHARS = 40; // an input's text is cut to this in its chip (the title has it whole)

function cut(text, n = TEXT_CHARS) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

/** The text of a capture as its chip shows it: its text, else its tokens, else its name. */
function captureText(capture) {
  if (typeof capture.text === "string") return capture.text;
  if (Array.isArray(capture.text)) return capture.text.join(" | ");
  if (capture.labels && capture.labels[0]) return capture.labels[0].join("");
  return capture.name || capture.id.slice(0, 8);
}

/** A failed request as the panel says it: the status and the server's own message. */
function failure(err) {
  return err.status ? `${err.status}: ${err.detail || err.message}` : err.message;
}

/** "3 14 15" or "3, 14, 15" -> [3, 14, 15]; null when it is not a list of ids. */
export function parseIds(text) {
  const parts = text.trim().split(/[\s,]+/).filter(Boolean);
  if (!parts.length || !parts.every((p) => /^\d+$/.test(p))) return null;
  return parts.map(Number);
}

/**
 * The panel. hooks: run() -> the shown run's summary or null; view() -> {layers, heads,
 * maxSide, kind} of the main view; showFrames(frames) draws decoded frames in place of the
 * stream's; showHeads(answer) shows heads' statistics and roles (a /heads answer); onShow()
 * when the main view starts showing a capture, onLive() when it returns to the stream;
 * onResize() when this panel's height changed (the main view below refits);
 * rate() -> the run's steps per second (or null); step() -> its latest step;
 * compare(a, b) opens the compare panel on two picks {value, step} of compareSources().
 */
export class LookPanel {
  constructor(main, before, hooks) {
    this.hooks = hooks;
    this.runId = null;
    this.input = null; // GET /captures/input: what this run's captures take
    this.entries = []; // inputs: {key, text, pin, captures: [{id, step}], kinds, layers}
    this.shown = null; // {key, id, step} of the capture in the main view, or null
    this.pending = null; // {controller, text} of the capture being taken
    this.awaiting = null; // the key of an input just pinned, until its first capture
    this.request = 0; // newest view request: older answers are dropped
    this.timer = null;
    this.lastResponseMs = null; // input -> frames drawn (test hook)
    this.build(main, before);
    // The main view below is sized to the window: tell it when this panel grows or shrinks.
    new ResizeObserver(() => this.hooks.onResize()).observe(this.root);
  }

  get showing() {
    return this.shown !== null;
  }

  build(main, before) {
    this.text = el("input", { id: "look-text", type: "text", maxlength: "2000", autocomplete: "off",
      spellcheck: "false", "aria-label": "input to look at", placeholder: "type a text, e.g. The cat sat on the mat" });
    this.go = el("button", { id: "look-go", type: "submit", title: "Capture this input now and show every head (Enter)" }, "Look");
    this.pinButton = el("button", { id: "look-pin", type: "button",
      title: "Capture this input again every k steps while the run trains, to watch its heads evolve" }, "Pin");
    this.every = el("input", { id: "look-every", type: "number", min: "1", step: "1", value: "50",
      "aria-label": "steps between pinned captures" });
    this.form = el("form", { id: "look-form", class: "look-form" },
      el("label", { for: "look-text", class: "look-title", text: "Look at an input" }), this.text, this.go,
      this.pinButton, el("label", { class: "look-every" }, "every ", this.every, " steps"));
    this.hint = el("span", { id: "look-hint", class: "look-hint" });
    this.spinner = el("span", { class: "spinner", "aria-hidden": "true" });
    this.statusText = el("span", { id: "look-status-text" });
    this.cancelButton = el("button", { id: "look-cancel", type: "button" }, "Cancel");
    this.status = el("div", { id: "look-status", class: "look-status", role: "status", hidden: "" },
      this.spinner, this.statusText, this.cancelButton);
    this.error = el("div", { id: "look-error", class: "look-error", role: "alert", hidden: "" });
    this.list = el("div", { id: "look-inputs", class: "look-inputs", "aria-label": "inputs looked at" });
    // What the main view shows: the input, its step, a pinned input's slider, compare, live.
    this.what = el("span", { id: "look-what", class: "look-what" });
    this.slider = el("input", { id: "look-slider", type: "range", min: "0", max: "0", step: "1", value: "0",
      "aria-label": "pinned input's capture" });
    this.next = el("span", { id: "look-next", class: "look-next" });
    this.compareButton = el("button", { id: "look-compare", type: "button",
      title: "Compare with another input, or a pinned input's first capture, in the compare panel" }, "compare");
    this.liveButton = el("button", { id: "look-live", type: "button", class: "live", title: "Back to the live stream" }, "● live");
    this.bar = el("div", { id: "look-showing", class: "look-showing", hidden: "" },
      this.what, this.slider, this.next, this.compareButton, this.liveButton);
    this.root = el("section", { id: "look", class: "panel look-panel", "aria-label": "look at an input" },
      this.form, this.hint, this.status, this.error, this.list, this.bar);
    main.insertBefore(this.root, before);

    this.form.addEventListener("submit", (event) => { event.preventDefault(); this.look(); });
    this.pinButton.addEventListener("click", () => this.pin());
    this.cancelButton.addEventListener("click", () => this.cancel());
    this.liveButton.addEventListener("click", () => this.leave());
    this.compareButton.addEventListener("click", () => this.compare());
    this.slider.addEventListener("input", () => {
      const entry = this.entry(this.shown && this.shown.key);
      const capture = entry && entry.captures[Number(this.slider.value)];
      if (capture) this.show(entry.key, capture.id);
    });
    this.list.addEventListener("click", (event) => {
      const chip = event.target.closest("[data-key]");
      if (!chip) return;
      if (event.target.closest(".look-remove")) this.remove(chip.dataset.key);
      else this.open(chip.dataset.key);
    });
  }

  // ---------------------------------------------------------------- the run's inputs

  /** Another run is shown: its input kind, its pinned inputs and latest captures. */
  async setRun(runId) {
    this.leave(false);
    if (this.pending) this.pending.controller.abort();
    this.pending = null;
    this.awaiting = null;
    this.setWaiting("");
    this.runId = runId;
    this.entries = [];
    this.input = null;
    this.render();
    this.setError("");
    clearInterval(this.timer);
    if (!runId) return;
    try {
      this.input = await api.captureInput(runId);
    } catch (err) {
      this.input = { text: false, tokens: false, message: err.detail || err.message };
    }
    if (runId !== this.runId) return;
    this.describeInput();
    await this.reload();
    this.timer = setInterval(() => this.refresh(), PIN_REFRESH_MS);
  }

  /** The box's placeholder and hint: text, token ids, or why neither. */
  describeInput() {
    const input = this.input || {};
    const usable = input.text || input.tokens;
    this.text.disabled = !usable;
    this.go.disabled = !usable;
    this.pinButton.disabled = !usable;
    this.text.placeholder = input.text ? "type a text, e.g. The cat sat on the mat"
      : input.tokens ? `token ids, e.g. 3 14 15 (0–${input.vocab_size - 1})` : "this run takes no typed input";
    this.hint.textContent = input.text ? "" : input.message || "";
    this.hint.hidden = !this.hint.textContent;
  }

  /** Pinned inputs and the run's latest captures, as chips (what is shown stays shown). */
  async reload() {
    const runId = this.runId;
    let pins = [];
    let captures = [];
    try {
      [pins, captures] = await Promise.all([api.pins(runId).then((a) => a.items).catch(() => []),
        api.captures(runId, RECENT).then((a) => a.items)]);
    } catch { /* no capture store: no inputs to list */ }
    if (runId !== this.runId) return;
    const entries = pins.map((pin) => this.pinEntry(pin));
    for (const c of captures) {
      if (c.pin || !c.kinds.includes("attention")) continue;
      entries.push({ key: `capture:${c.id}`, text: captureText(c), pin: null, length: c.input.shape[1],
        captures: [{ id: c.id, step: c.step }], kinds: c.kinds, layers: c.layers });
    }
    this.entries = entries;
    this.render();
  }

  pinEntry(pin) {
    return { key: `pin:${pin.id}`, text: pin.text ?? (pin.tokens || []).join(" "), pin,
      captures: pin.captures.map((c) => ({ id: c.id, step: c.step })), kinds: ["attention"], layers: null };
  }

  /** Pinned inputs' new captures; a pinned input shown at its newest capture follows them. */
  async refresh() {
    if (!this.runId || !this.entries.some((e) => e.pin)) return;
    const runId = this.runId;
    let pins;
    try {
      pins = (await api.pins(runId)).items;
    } catch {
      return;
    }
    if (runId !== this.runId) return;
    for (const pin of pins) {
      const entry = this.entry(`pin:${pin.id}`);
      if (!entry) continue;
      const atNewest = this.shown && this.shown.key === entry.key
        && this.shown.id === (entry.captures[entry.captures.length - 1] || {}).id;
      const first = this.awaiting === entry.key;
      Object.assign(entry, this.pinEntry(pin));
      const newest = entry.captures[entry.captures.length - 1];
      if (first && (newest || pin.state === "failed")) {
        this.awaiting = null;
        if (!this.pending) this.setWaiting("");
        if (pin.state === "failed") this.setError(`“${cut(entry.text)}”: ${pin.message}`);
      }
      if (newest && (atNewest || first) && newest.id !== (this.shown || {}).id) this.show(entry.key, newest.id);
    }
    this.render();
  }

  entry(key) {
    return this.entries.find((e) => e.key === key) || null;
  }

  render() {
    this.list.replaceChildren(...this.entries.map((entry) => {
      const newest = entry.captures[entry.captures.length - 1];
      const meta = entry.pin
        ? `pinned · every ${entry.pin.every} · ${entry.captures.length} capture${entry.captures.length === 1 ? "" : "s"}`
        : `step ${newest && newest.step !== null ? newest.step : "–"}`;
      const chip = el("span", { class: `look-chip${entry.pin ? " pinned" : ""}${
        this.shown && this.shown.key === entry.key ? " shown" : ""}`, "data-key": entry.key,
      title: `${entry.text}\n${entry.pin ? entry.pin.message : "click to show it"}` },
      el("button", { type: "button", class: "look-open" }, el("span", { class: "look-chip-text", text: `“${cut(entry.text)}”` }),
        el("small", { text: meta })),
      el("button", { type: "button", class: "look-remove", "aria-label": entry.pin ? "unpin" : "delete this capture",
        title: entry.pin ? "Unpin (its captures are deleted)" : "Delete this capture" }, "×"));
      return chip;
    }));
    this.list.hidden = !this.entries.length;
    this.renderBar();
  }

  // ---------------------------------------------------------------- taking captures

  /** The request body's input: {text}, or {tokens} for a run without a tokenizer; null
   * (and the panel says why) when the box holds neither. */
  given() {
    const text = this.text.value;
    let why = null;
    if (!text.trim()) why = "type something to look at";
    else if (this.input && this.input.text) return { text };
    else if (parseIds(text)) return { tokens: parseIds(text) };
    else why = this.input && this.input.message ? this.input.message : "type token ids: numbers separated by spaces";
    this.setError(why);
    return null;
  }

  /** Capture the text box's input and show it; the page says it waits, and can cancel. */
  async look() {
    if (!this.runId || this.pending) return;
    const given = this.given();
    if (!given) return;
    this.setError("");
    const controller = new AbortController();
    const text = given.text ?? given.tokens.join(" ");
    this.pending = { controller, text };
    this.setWaiting(`capturing “${cut(text)}”: ${this.waitReason("waiting for")}`, "Cancel");
    const body = { run: this.runId, kinds: LOOK_KINDS, name: `look: ${cut(text, 180)}`,
      ...(given.text !== undefined ? { text: given.text } : { tokens: [given.tokens] }) };
    const runId = this.runId;
    try {
      const made = await api.capture(body, controller.signal);
      if (runId !== this.runId) return;
      this.pending = null; // taken: no more waiting, whatever drawing it takes
      this.setWaiting("");
      const entry = { key: `capture:${made.id}`, text, pin: null, length: made.input.shape[1],
        captures: [{ id: made.id, step: made.step }], kinds: made.kinds, layers: made.layers };
      this.entries = [entry, ...this.entries.filter((e) => e.key !== entry.key)];
      this.render();
      await this.show(entry.key, made.id);
    } catch (err) {
      if (err.name !== "AbortError") this.setError(`could not capture “${cut(text)}”: ${failure(err)}`);
    } finally {
      if (!this.pending || this.pending.controller === controller) {
        this.pending = null;
        this.setWaiting(""); // a look started meanwhile keeps its own status
      }
    }
  }

  /** Why a capture waits: the run's loop must reach a step boundary (or resume).
   * `lead`: "waiting for" (a look) or "taken when" (a pin's first capture). */
  waitReason(lead) {
    const run = this.hooks.run();
    const name = run ? `'${run.name || run.id}'` : "the run";
    if (run && run.status === "paused") return `run ${name} is paused: it takes the capture while it waits`;
    return `${lead} run ${name} ${lead === "waiting for" ? "to reach" : "reaches"} its next step boundary`;
  }

  /** Stop waiting for the capture being taken (the server then keeps nothing of it), or
   * unpin the input pinned last whose first capture has not come. */
  cancel() {
    if (this.pending) {
      this.pending.controller.abort();
      this.pending = null;
    } else if (this.awaiting) {
      const key = this.awaiting;
      this.awaiting = null;
      this.remove(key);
    } else {
      return;
    }
    this.setWaiting("");
    this.setError("cancelled: nothing was kept");
  }

  /** Pin the text box's input: captured now and every k steps (within the cost budget). */
  async pin() {
    if (!this.runId) return;
    const given = this.given();
    if (!given) return;
    const every = Number.parseInt(this.every.value, 10);
    this.setError("");
    try {
      const pin = await api.pin({ run: this.runId, ...given,
        ...(Number.isInteger(every) && every > 0 ? { every } : {}) });
      const entry = this.pinEntry(pin);
      this.entries = [entry, ...this.entries];
      this.awaiting = entry.key; // shown once its first capture is in (refresh)
      this.render();
      this.setWaiting(`pinned “${cut(entry.text)}”, every ${pin.every} steps: its first capture is ${
        this.waitReason("taken when")}`, "Cancel");
      setTimeout(() => this.refresh(), 500);
    } catch (err) {
      this.setError(`could not pin “${cut(this.text.value)}”: ${failure(err)}`);
    }
  }

  async remove(key) {
    const entry = this.entry(key);
    if (!entry) return;
    try {
      if (entry.pin) await api.unpin(entry.pin.id);
      else await api.removeCapture(entry.captures[0].id);
    } catch (err) {
      if (err.status !== 404) { this.setError(failure(err)); return; }
    }
    if (this.shown && this.shown.key === key) this.leave();
    this.entries = this.entries.filter((e) => e.key !== key);
    this.render();
  }

  setWaiting(text, button = "Cancel") {
    this.status.hidden = !text;
    this.statusText.textContent = text;
    this.cancelButton.hidden = !button;
  }

  setError(text) {
    this.error.textContent = text;
    this.error.hidden = !text;
  }

  // ---------------------------------------------------------------- the main view

  /** Show input `key` (its newest capture) in the main view. */
  open(key) {
    const entry = this.entry(key);
    if (!entry) return;
    const newest = entry.captures[entry.captures.length - 1];
    if (newest) this.show(key, newest.id);
    else this.setError(`“${cut(entry.text)}” has no capture yet: ${entry.pin ? entry.pin.message : ""}`);
  }

  /** Draw capture `id` of input `key` in the main view (every layer, its heads' roles). */
  async show(key, id) {
    const entry = this.entry(key);
    if (!entry) return;
    const t0 = performance.now();
    const capture = entry.captures.find((c) => c.id === id);
    if (!this.shown) this.hooks.onShow();
    this.shown = { key, id, step: capture ? capture.step : null };
    this.render();
    const request = ++this.request;
    const view = this.hooks.view();
    const kind = entry.kinds.includes(view.kind) ? view.kind : "attention";
    const layers = entry.layers ? view.layers.filter((l) => entry.layers.includes(l)) : view.layers;
    try {
      const frames = await Promise.all(layers.map((layer) => api.captureFrame(id, {
        layer, kind, heads: view.heads, maxSide: view.maxSide })));
      if (request !== this.request || !this.shown) return;
      this.hooks.showFrames(frames);
      this.kindNote = kind === view.kind ? "" : ` · ${view.kind === "qkv_norms" ? "q/k/v norms are" : `${view.kind} is`} not captured: showing attention`;
      this.renderBar();
      requestAnimationFrame(() => { this.lastResponseMs = performance.now() - t0; });
      const heads = await api.captureHeads(id);
      if (request === this.request && this.shown) this.hooks.showHeads(heads);
    } catch (err) {
      if (request === this.request) this.setError(failure(err));
    }
  }

  /** The main view changed (focus, map, kind): draw the shown capture for it. */
  refetch() {
    if (this.shown) this.show(this.shown.key, this.shown.id);
  }

  /** Back to the live stream. */
  leave(notify = true) {
    if (!this.shown) return;
    this.shown = null;
    this.request += 1;
    this.render();
    if (notify) this.hooks.onLive();
  }

  /** The bar saying what the main view shows; a pinned input's slider and next capture. */
  renderBar() {
    const shown = this.shown;
    this.bar.hidden = !shown;
    this.root.classList.toggle("showing", Boolean(shown));
    if (!shown) return;
    const entry = this.entry(shown.key);
    if (!entry) return;
    const pinned = Boolean(entry.pin);
    const index = entry.captures.findIndex((c) => c.id === shown.id);
    this.what.textContent = `showing “${cut(entry.text, 60)}” · captured at step ${shown.step ?? "–"}${
      pinned ? ` · ${index + 1} of ${entry.captures.length}` : ""}${this.kindNote || ""}`;
    this.what.title = entry.text;
    this.slider.hidden = !pinned || entry.captures.length < 2;
    this.slider.max = String(Math.max(0, entry.captures.length - 1));
    this.slider.value = String(Math.max(0, index));
    this.next.hidden = !pinned;
    if (pinned) this.next.textContent = this.nextText(entry.pin);
  }

  /** When a pinned input's next capture comes, in steps and about how long. */
  nextText(pin) {
    if (pin.state !== "waiting" || pin.next_step === null) return pin.message;
    const rate = this.hooks.rate();
    const step = this.hooks.step();
    let seconds = pin.not_before ? (Date.parse(pin.not_before) - Date.now()) / 1000 : 0;
    if (rate && step !== null && step !== undefined) seconds = Math.max(seconds, (pin.next_step - step) / rate);
    const about = seconds > 0.5 ? `, in about ${seconds < 90 ? `${Math.ceil(seconds)} s` : `${Math.round(seconds / 60)} min`}` : "";
    return `next capture after step ${pin.next_step}${about}`;
  }

  // ---------------------------------------------------------------- compare

  /** Inputs as picks of the compare panel; a pinned one's step picks its capture. */
  compareSources() {
    return this.entries.filter((e) => e.captures.length).map((entry) => ({
      value: `input:${entry.key}`,
      label: `“${cut(entry.text, 30)}”${entry.pin ? ` (pinned, ${entry.captures.length} captures)` : ""}`,
      fetch: (layer, head, step) => {
        let capture = entry.captures[entry.captures.length - 1];
        if (step !== null) {
          const before = entry.captures.filter((c) => c.step !== null && c.step <= step);
          capture = before.length ? before[before.length - 1] : entry.captures[0];
        }
        return api.captureFrame(capture.id, { layer, kind: "attention", heads: [head], maxSide: 256 });
      },
    }));
  }

  /** The shown input beside another: a pinned input's first capture, else the previous input. */
  compare() {
    const shown = this.shown;
    const entry = shown && this.entry(shown.key);
    if (!entry) return;
    let other;
    if (entry.pin && entry.captures.length > 1) {
      other = { value: `input:${entry.key}`, step: entry.captures[0].step };
    } else {
      const others = this.entries.filter((e) => e.key !== entry.key && e.captures.length);
      // one of the same length first: A − B needs it
      const next = others.find((e) => e.length && e.length === entry.length) || others[0];
      if (!next) {
        this.setError("look at a second input (or pin one) to compare it with this one");
        return;
      }
      other = { value: `input:${next.key}`, step: null };
    }
    this.hooks.compare({ value: `input:${entry.key}`, step: entry.pin ? shown.step : null }, other);
  }
}
