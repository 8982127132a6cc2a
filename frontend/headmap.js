// The layers x heads map: one cell per head, coloured by one statistic the user picks,
// with its role tag; hover shows the numbers, a click opens the head. For models with many
// heads (12 x 12 = 144 cells), where 144 thumbnails are too small to read.

import { colourOf } from "./colormap.js";
import { ROLE_TAGS, setTag } from "./grid.js";

/** Statistics the map can show: label, and the colour range (null: 0 to the max shown). */
export const MAP_STATS = {
  entropy: { label: "entropy", range: [0, 1] },
  max_weight: { label: "max weight", range: [0, 1] },
  first_token: { label: "weight on first token", range: [0, 1] },
  distance: { label: "mean distance |i − j|", range: null },
  previous_token: { label: "previous-token score", range: [0, 1] },
  diagonal: { label: "diagonal (self) score", range: [0, 1] },
  induction: { label: "induction score", range: [0, 1] },
  duplicate_token: { label: "duplicate-token score", range: [0, 1] },
  sink: { label: "sink score", range: [0, 1] },
  change: { label: "change since N steps", range: null },
};
// "change": mean absolute change of these statistics between now and N steps ago.
const CHANGE_OF = ["entropy", "max_weight", "first_token", "previous_token", "diagonal", "sink"];

function fmt(v, digits = 3) {
  return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "–";
}

export class HeadMap {
  /**
   * @param {HTMLElement} container element that receives the map
   * @param {(layer: number, head: number) => void} onOpen called when a cell is clicked
   */
  constructor(container, onOpen) {
    this.container = container;
    this.onOpen = onOpen;
    this.cells = new Map(); // "layer:head" -> button
    this.layers = 0;
    this.heads = 0;
    this.stat = "entropy";
    this.values = new Map(); // "layer:head" -> {name: value}
    this.roles = [];
    this.since = [];
    this.curves = new Map(); // "layer:head" -> entropy at each of curveSteps (GET /heads?curve=)
    this.curveSteps = [];
    this.short = false; // short role tags in small cells
    this.tip = document.createElement("div");
    this.tip.className = "map-tip";
    this.tip.hidden = true;
    document.body.append(this.tip);
    container.addEventListener("click", (event) => {
      const cell = event.target.closest(".map-cell");
      if (cell) this.onOpen(Number(cell.dataset.layer), Number(cell.dataset.head));
    });
    container.addEventListener("mousemove", (event) => this.hover(event));
    container.addEventListener("mouseleave", () => { this.tip.hidden = true; });
    new ResizeObserver(() => this.fit()).observe(container);
    window.addEventListener("resize", () => this.fit());
  }

  /** Cells as big as fits the width and the window's height (all layers on screen). */
  fit() {
    if (!this.heads || !this.container.clientWidth) return; // hidden: sized when shown
    const byWidth = Math.floor((this.container.clientWidth - 44) / this.heads) - 4;
    const top = this.container.getBoundingClientRect().top + window.scrollY;
    const byHeight = Math.floor((window.innerHeight - top - 24 - (this.reserve || 0))
      / Math.max(1, this.layers)) - 4;
    const size = Math.max(22, Math.min(120, byWidth, byHeight));
    this.container.style.setProperty("--mapcell", `${size}px`);
    const short = size < 64;
    if (short !== this.short) {
      this.short = short;
      for (const b of this.cells.values()) b.__drawn = null; // re-tag at the new size
    }
  }

  build(layers, heads) {
    this.layers = layers;
    this.heads = heads;
    this.cells.clear();
    this.values.clear();
    const root = this.container;
    root.replaceChildren();
    root.style.setProperty("--heads", String(heads));
    const label = (cls, text) => {
      const el = document.createElement("div");
      el.className = cls;
      el.textContent = text;
      return el;
    };
    root.append(label("corner", "layer \\ head"));
    for (let h = 0; h < heads; h++) root.append(label("col-label", `H${h}`));
    for (let l = 0; l < layers; l++) {
      root.append(label("row-label", `L${l}`));
      for (let h = 0; h < heads; h++) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "map-cell empty";
        b.dataset.layer = String(l);
        b.dataset.head = String(h);
        b.setAttribute("aria-label", `Layer ${l} · head ${h} — click to open`);
        b.__drawn = null; // what draw() last wrote (colour, bright, role)
        this.cells.set(`${l}:${h}`, b);
        root.append(b);
      }
    }
    this.fit();
  }

  /** Take a head_stats message (or a /heads item) of one layer: values by head. */
  setLayerStats(layer, heads, valuesByName) {
    heads.forEach((head, i) => {
      const key = `${layer}:${head}`;
      const record = this.values.get(key) || {};
      for (const [name, list] of Object.entries(valuesByName)) {
        if (Array.isArray(list)) record[name] = list[i];
      }
      this.values.set(key, record);
    });
  }

  /** Take every head's recorded entropy curve (a GET /heads?curve=entropy answer). */
  setCurves(answer) {
    this.curveSteps = answer.curve_steps || [];
    this.curves = new Map((answer.heads || []).map((h) => [`${h.layer}:${h.head}`, h.curve || []]));
  }

  /** The hovered head's entropy over the recorded steps, as a small SVG line (0 to 1). */
  sparkline(key) {
    const values = this.curves.get(key);
    const steps = this.curveSteps;
    if (!values || values.length < 2) return null;
    const ns = "http://www.w3.org/2000/svg";
    const [w, h] = [220, 40];
    const x0 = steps[0];
    const span = Math.max(1, steps[steps.length - 1] - x0);
    const points = [];
    values.forEach((v, i) => {
      if (Number.isFinite(v)) points.push(`${((steps[i] - x0) / span * w).toFixed(1)},${((1 - v) * h).toFixed(1)}`);
    });
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", String(w));
    svg.setAttribute("height", String(h));
    svg.setAttribute("class", "map-spark");
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
    const caption = document.createElement("div");
    caption.className = "map-spark-caption";
    caption.textContent = `entropy, steps ${steps[0]}–${steps[steps.length - 1]}`;
    const box = document.createElement("div");
    box.append(svg, caption);
    return box;
  }

  /** Take the roles (and since-steps) of a /heads answer: [layer][head]. */
  setRoles(roles, since) {
    this.roles = roles || [];
    this.since = since || [];
  }

  /** Recolour every cell for the chosen statistic; `change` values come in `extra`. */
  draw(extra = null) {
    const spec = MAP_STATS[this.stat] || MAP_STATS.entropy;
    const value = (key) => (this.stat === "change"
      ? extra && extra.get(key) : this.values.get(key)?.[this.stat]);
    let [lo, hi] = spec.range || [0, 0];
    if (!spec.range) {
      for (const key of this.cells.keys()) {
        const v = value(key);
        if (Number.isFinite(v) && v > hi) hi = v;
      }
      if (hi <= lo) hi = lo + 1;
    }
    this.range = [lo, hi];
    for (const [key, button] of this.cells) {
      const [l, h] = key.split(":").map(Number);
      const v = value(key);
      const colour = colourOf(v, lo, hi);
      const bright = Number.isFinite(v) && (v - lo) / (hi - lo) > 0.6;
      const role = this.roles[l] ? this.roles[l][h] ?? null : null;
      // Touch the DOM only where something changed: 144 style writes per frame cost layout.
      const last = button.__drawn || {};
      if (last.colour !== colour) {
        button.style.background = colour || "";
        if ((last.colour === null) !== (colour === null) || last.colour === undefined) {
          button.classList.toggle("empty", colour === null);
        }
      }
      if (last.bright !== bright) button.classList.toggle("bright", bright);
      if (last.role !== role) setTag(button, role, this.short);
      button.dataset.value = Number.isFinite(v) ? String(v) : "";
      button.__drawn = { colour, bright, role };
    }
  }

  hover(event) {
    const cell = event.target.closest(".map-cell");
    if (!cell) {
      this.tip.hidden = true;
      return;
    }
    const l = Number(cell.dataset.layer);
    const h = Number(cell.dataset.head);
    const v = this.values.get(`${l}:${h}`) || {};
    const role = this.roles[l] ? this.roles[l][h] : null;
    const since = this.since[l] ? this.since[l][h] : null;
    const lines = [
      `L${l} H${h}${role ? ` — ${ROLE_TAGS[role] ?? role} head${since != null ? ` since step ${since}` : ""}` : ""}`,
      `entropy ${fmt(v.entropy)} · max weight ${fmt(v.max_weight)} · first token ${fmt(v.first_token)}`,
      `distance ${fmt(v.distance, 2)} · prev ${fmt(v.previous_token)} · self ${fmt(v.diagonal)}`,
      `induction ${fmt(v.induction)} · dup ${fmt(v.duplicate_token)} · sink ${fmt(v.sink)}`,
    ];
    if (this.stat === "change") lines.push(`change ${fmt(Number(cell.dataset.value))}`);
    this.tip.textContent = lines.join("\n");
    const spark = this.sparkline(`${l}:${h}`);
    if (spark) this.tip.append(spark);
    this.tip.hidden = false;
    this.tip.style.left = `${event.pageX + 14}px`;
    this.tip.style.top = `${event.pageY + 14}px`;
  }

  /** The map as one canvas (PNG export): cells, labels and role tags. */
  composite(scale = 2) {
    const size = 40 * scale;
    const pad = 28 * scale;
    const out = document.createElement("canvas");
    out.width = pad + this.heads * (size + 4);
    out.height = pad + this.layers * (size + 4);
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#0f1117";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.font = `${9 * scale}px sans-serif`;
    for (let h = 0; h < this.heads; h++) {
      ctx.fillStyle = "#d7dae0";
      ctx.fillText(`H${h}`, pad + h * (size + 4) + size / 3, pad * 0.7);
    }
    for (let l = 0; l < this.layers; l++) {
      ctx.fillStyle = "#d7dae0";
      ctx.fillText(`L${l}`, 4, pad + l * (size + 4) + size / 2);
      for (let h = 0; h < this.heads; h++) {
        const b = this.cells.get(`${l}:${h}`);
        const x = pad + h * (size + 4);
        const y = pad + l * (size + 4);
        ctx.fillStyle = (b && b.style.background) || "#141821";
        ctx.fillRect(x, y, size, size);
        const role = this.roles[l] ? this.roles[l][h] : null;
        if (role) {
          ctx.fillStyle = b.classList.contains("bright") ? "#0f1117" : "#ffffff";
          ctx.fillText(ROLE_TAGS[role] ?? role, x + 3 * scale, y + size - 4 * scale);
        }
      }
    }
    return out;
  }
}

/**
 * "change since N steps": per head, the mean absolute change of CHANGE_OF between the
 * latest stats and those at or before step - n. `ring` maps layer -> [{step, values}] ascending.
 */
export function changeSince(ring, n) {
  const out = new Map();
  for (const [layer, list] of ring) {
    if (!list.length) continue;
    const now = list[list.length - 1];
    let then = null;
    for (let i = list.length - 1; i >= 0; i--) {
      if (list[i].step <= now.step - n) { then = list[i]; break; }
    }
    if (!then) then = list[0];
    now.heads.forEach((head, i) => {
      let sum = 0;
      let count = 0;
      for (const name of CHANGE_OF) {
        const a = now.values[name]?.[i];
        const j = then.heads.indexOf(head);
        const b = j >= 0 ? then.values[name]?.[j] : undefined;
        if (Number.isFinite(a) && Number.isFinite(b)) { sum += Math.abs(a - b); count += 1; }
      }
      out.set(`${layer}:${head}`, count ? sum / count : NaN);
    });
  }
  return out;
}
