// DOM of the header, toolbar, focus title and panels. Text from users (run names,
// errors, token labels) only ever goes through textContent / title / option.text.

const byId = (id) => document.getElementById(id);

/** A new element: `attrs` class / text / other attributes; text only via textContent. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

/** Cached element lookups. */
export const els = {
  runSelect: byId("run-select"),
  runName: byId("run-name"),
  runStatus: byId("run-status"),
  step: byId("step"),
  rate: byId("rate"),
  conn: byId("conn"),
  kind: byId("kind"),
  normStyle: byId("norm-style"),
  normStyleWrap: byId("norm-style-wrap"),
  sample: byId("sample"),
  fps: byId("fps"),
  pauseView: byId("pause-view"),
  runPause: byId("run-pause"),
  runResume: byId("run-resume"),
  runRestart: byId("run-restart"),
  runDelete: byId("run-delete"),
  exportPng: byId("export-png"),
  exportSvg: byId("export-svg"),
  exportNpz: byId("export-npz"),
  exportHtml: byId("export-html"),
  overview: byId("overview"),
  grid: byId("grid"),
  focus: byId("focus"),
  focusTitle: byId("focus-title"),
  focusPlot: byId("focus-plot"),
  focusCanvas: byId("focus-canvas"),
  focusColorbar: byId("focus-colorbar"),
  focusBack: byId("focus-back"),
  focusEmpty: byId("focus-empty"),
  healthLayer: byId("health-layer"),
  entropyPlot: byId("entropy-plot"),
  healthList: byId("health-list"),
  curvesPlot: byId("curves-plot"),
  banner: byId("banner"),
  bannerText: byId("banner-text"),
  bannerClose: byId("banner-close"),
  waiting: byId("waiting"),
  overviewMode: byId("overview-mode"),
  mapStat: byId("map-stat"),
  mapStatWrap: byId("map-stat-wrap"),
  changeN: byId("change-n"),
  changeNWrap: byId("change-n-wrap"),
  scale: byId("scale"),
  legendScale: byId("legend-scale"),
  headmap: byId("headmap"),
  focusRole: byId("focus-role"),
  rolesSummary: byId("roles-summary"),
  roleEvents: byId("role-events"),
  rolesNote: byId("roles-note"),
};

/** The overview shows the thumbnail grid or the layers x heads map. */
export function showOverviewMode(mode, stat) {
  els.grid.hidden = mode !== "grid";
  els.headmap.hidden = mode !== "map";
  els.mapStatWrap.hidden = mode !== "map";
  els.changeNWrap.hidden = mode !== "map" || stat !== "change";
}

export function renderMapStats(stats, selected) {
  els.mapStat.replaceChildren(...Object.entries(stats).map(([value, spec]) => {
    const option = document.createElement("option");
    option.value = value;
    option.text = spec.label;
    option.selected = value === selected;
    return option;
  }));
}

/** The latest role events (newest first); each names its head (click to open it). */
export function renderRoleEvents(events, summary) {
  els.rolesSummary.textContent = summary;
  if (!events.length) {
    const li = document.createElement("li");
    li.className = "ok";
    li.textContent = "no role changes yet";
    els.roleEvents.replaceChildren(li);
    return;
  }
  els.roleEvents.replaceChildren(...events.map((e) => {
    const li = document.createElement("li");
    li.className = e.kind === "gained" ? "ok gained" : e.kind === "lost" ? "lost" : "warn";
    li.textContent = e.text;
    li.dataset.layer = String(e.layer);
    li.dataset.head = String(e.head);
    li.dataset.step = String(e.step);
    li.dataset.kind = e.kind;
    return li;
  }));
}

/** Why some roles are missing (no history: no induction probe), or nothing. */
export function setRolesNote(text) {
  els.rolesNote.textContent = text;
  els.rolesNote.hidden = !text;
}

export function setFocusRole(text) {
  els.focusRole.textContent = text;
}

const CONN_TEXT = { connecting: "connecting…", open: "connected", reconnecting: "reconnecting" };

export function setConnection(state, delayMs) {
  els.conn.dataset.state = state;
  els.conn.textContent = state === "reconnecting" && delayMs
    ? `reconnecting in ${(delayMs / 1000).toFixed(1)} s`
    : CONN_TEXT[state] ?? state;
}

/** Header: run name, status badge, step and steps/s. */
export function renderHeader(run, step, rate) {
  els.runName.textContent = run ? run.name || run.id : "no run";
  els.runStatus.textContent = run ? run.status : "–";
  els.runStatus.dataset.status = run ? run.status : "";
  els.runStatus.title = run && run.error ? `ended with an error: ${run.error}` : "";
  els.step.textContent = step === null || step === undefined ? "–" : String(step);
  els.rate.textContent = rate === null || rate === undefined ? "– steps/s" : `${rate.toFixed(1)} steps/s`;
}

export function renderRunOptions(runs, selectedId) {
  const options = runs.map((run) => {
    const option = document.createElement("option");
    option.value = run.id;
    option.text = run.status === "ended"
      ? `${run.name || run.id} — ended${run.step === null || run.step === undefined ? "" : ` at step ${run.step}`}`
      : `${run.name || run.id} (${run.status})`;
    option.selected = run.id === selectedId;
    return option;
  });
  els.runSelect.replaceChildren(...options);
  els.runSelect.disabled = runs.length < 2;
}

/** Run control buttons follow the run's `controls` list and status. */
export function renderRunControls(run) {
  const allowed = new Set(run ? run.controls || [] : []);
  const status = run ? run.status : null;
  const over = status === "ended";
  els.runPause.hidden = !allowed.has("pause") || over;
  els.runResume.hidden = !allowed.has("resume") || over;
  els.runRestart.hidden = !allowed.has("restart");
  els.runPause.disabled = status !== "live";
  els.runResume.disabled = status !== "paused";
  els.runRestart.disabled = !allowed.has("restart");
  els.runDelete.hidden = status !== "ended" && status !== "idle";
}

export function renderLayerOptions(layers, selected) {
  const options = [];
  for (let l = 0; l < layers; l++) {
    const option = document.createElement("option");
    option.value = String(l);
    option.text = `layer ${l}`;
    option.selected = l === selected;
    options.push(option);
  }
  els.healthLayer.replaceChildren(...options);
}

export function showBanner(text) {
  els.bannerText.textContent = text;
  els.banner.hidden = false;
}

export function hideBanner() {
  els.banner.hidden = true;
}

export function setViewPaused(paused) {
  els.pauseView.textContent = paused ? "Resume view" : "Pause view";
  els.pauseView.setAttribute("aria-pressed", String(paused));
  document.body.classList.toggle("view-paused", paused);
}

export function showFocus(layer, head, kind) {
  els.overview.hidden = true;
  els.focus.hidden = false;
  const names = { attention: "attention weights", qk_logits: "pre-softmax logits", qkv_norms: "q/k/v norms" };
  els.focusTitle.textContent = `Layer ${layer} · head ${head} — ${names[kind] ?? kind}`;
}

export function showOverview() {
  els.focus.hidden = true;
  els.overview.hidden = false;
}

export function setFocusEmpty(empty) {
  els.focusEmpty.hidden = !empty;
}

export function setNormStyleVisible(visible) {
  els.normStyleWrap.hidden = !visible;
}

export function setWaiting(text) {
  els.waiting.hidden = !text;
  els.waiting.textContent = text || "";
}

/** The list of flagged heads under the entropy chart. */
export function renderHealthList(items, haveStats = true) {
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "ok";
    li.textContent = haveStats ? "all heads look healthy" : "waiting for head statistics…";
    els.healthList.replaceChildren(li);
    return;
  }
  els.healthList.replaceChildren(...items.map(({ layer, head, level, reasons }) => {
    const li = document.createElement("li");
    li.className = level;
    const strong = document.createElement("strong");
    strong.textContent = `L${layer} H${head}`;
    li.append(strong, ` ${reasons.join("; ")}`);
    li.dataset.layer = String(layer);
    li.dataset.head = String(head);
    return li;
  }));
}
