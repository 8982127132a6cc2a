// Overview grid: one small canvas per (layer, head), painted straight from the decoded
// bytes with the same colour scale as plotly. No plotly here: 144 plotly heatmaps would
// freeze a browser, 144 putImageData calls do not.

import { paintScaled, scaleMatrix } from "./colormap.js";
import { labelsOf } from "./heatmaps.js";
import { classifyHead, HEALTH } from "./store.js";

const NORM_COLOURS = ["#4cc9f0", "#f72585", "#ffd166"]; // q, k, v
const LINE_CANVAS = 128; // drawn smooth, not pixelated

export class Grid {
  /**
   * @param {HTMLElement} container element that receives the grid
   * @param {(layer: number, head: number) => void} onOpen called when a cell is clicked
   */
  constructor(container, onOpen) {
    this.container = container;
    this.onOpen = onOpen;
    this.cells = new Map(); // "layer:head" -> cell record
    this.layers = 0;
    this.heads = 0;
    this.scale = "auto"; // colour scale of the thumbnails (colormap.js SCALES)
    this.reserve = 0; // px kept free under the grid (the history slider stays in view)
    container.addEventListener("click", (event) => {
      const cell = event.target.closest(".cell");
      if (cell) this.onOpen(Number(cell.dataset.layer), Number(cell.dataset.head));
    });
    new ResizeObserver(() => this.fit()).observe(container);
    window.addEventListener("resize", () => this.fit());
  }

  /** (Re)build an empty layers x heads grid. */
  build(layers, heads) {
    this.layers = layers;
    this.heads = heads;
    this.cells.clear();
    const root = this.container;
    root.replaceChildren();
    root.style.setProperty("--heads", String(heads));
    root.append(label("div", "corner", "layer \\ head"));
    for (let h = 0; h < heads; h++) root.append(label("div", "col-label", `H${h}`));
    for (let l = 0; l < layers; l++) {
      root.append(label("div", "row-label", `L${l}`));
      for (let h = 0; h < heads; h++) root.append(this.makeCell(l, h));
    }
    this.fit();
  }

  makeCell(layer, head) {
    const button = document.createElement("button");
    button.className = "cell empty";
    button.type = "button";
    button.dataset.layer = String(layer);
    button.dataset.head = String(head);
    const canvas = document.createElement("canvas");
    canvas.width = 1;
    canvas.height = 1;
    button.append(canvas);
    const base = `Layer ${layer} · head ${head} — click to open`;
    button.title = base;
    button.setAttribute("aria-label", base);
    const ctx = canvas.getContext("2d", { alpha: true });
    this.cells.set(`${layer}:${head}`, { button, canvas, ctx, image: null, pixels: null, base, kind: null });
    return button;
  }

  /** Size cells so the whole grid fits the container's width and the window's height,
   * less `reserve` (what must stay in view below it). */
  fit() {
    if (!this.heads || !this.container.clientWidth) return; // hidden: sized when shown
    const byWidth = Math.floor((this.container.clientWidth - 44) / this.heads) - 4;
    const top = this.container.getBoundingClientRect().top + window.scrollY;
    const byHeight = Math.floor((window.innerHeight - top - 24 - this.reserve)
      / Math.max(1, this.layers)) - 4;
    const size = Math.max(24, Math.min(240, byWidth, byHeight));
    this.container.style.setProperty("--cell", `${size}px`);
    this.short = size < 64; // short role tags in small cells
  }

  cell(layer, head) {
    return this.cells.get(`${layer}:${head}`);
  }

  /** Draw every head of one decoded frame (attention / qk_logits: (h, L, S); qkv_norms: (3, h, P)). */
  draw(frame) {
    const { header, data, shape } = frame;
    const heads = header.heads;
    for (let i = 0; i < heads.length; i++) {
      const cell = this.cell(header.layer, heads[i]);
      if (!cell) continue;
      if (header.kind === "qkv_norms") drawNorms(cell, data, shape, i);
      else drawMatrix(cell, header.kind, data, shape, i, this.scale);
      if (cell.kind === null) cell.button.classList.remove("empty");
      cell.kind = header.kind;
    }
  }

  /** Outline unhealthy heads of one layer and explain why in the tooltip. */
  setHealth(stats) {
    stats.heads.forEach((head, i) => {
      const cell = this.cell(stats.layer, head);
      if (!cell) return;
      const values = {
        entropy: stats.entropy[i], max_weight: stats.max_weight[i], first_token: stats.first_token?.[i],
        nan: stats.nan[i], inf: stats.inf[i],
      };
      const { level, reasons } = classifyHead(values);
      const b = cell.button;
      b.classList.toggle("bad", level === "bad");
      b.classList.toggle("warn", level === "warn");
      const numbers = `entropy ${fmt(values.entropy)} · max weight ${fmt(values.max_weight)}`
        + ` · first token ${fmt(values.first_token)} (step ${stats.step})`;
      const why = reasons.map((r) => `⚠ ${r}`).join("\n");
      b.title = [cell.base, numbers, why].filter(Boolean).join("\n");
      b.dataset.health = level;
    });
  }

  /** Role tags on the thumbnails: roles[layer][head] is a role name or null. */
  setRoles(roles) {
    for (const [key, cell] of this.cells) {
      const [l, h] = key.split(":").map(Number);
      const role = roles && roles[l] ? roles[l][h] ?? null : null;
      setTag(cell.button, role, this.short);
    }
  }

  /** All cells composed into one canvas (for PNG export); labels drawn as text. */
  composite(scale = 2) {
    const size = 64 * scale;
    const pad = 24 * scale;
    const out = document.createElement("canvas");
    out.width = pad + this.heads * (size + 4);
    out.height = pad + this.layers * (size + 4);
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#0f1117";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.fillStyle = "#d7dae0";
    ctx.font = `${10 * scale}px sans-serif`;
    ctx.imageSmoothingEnabled = false;
    for (let h = 0; h < this.heads; h++) ctx.fillText(`H${h}`, pad + h * (size + 4) + size / 3, pad * 0.7);
    for (let l = 0; l < this.layers; l++) {
      ctx.fillText(`L${l}`, 4, pad + l * (size + 4) + size / 2);
      for (let h = 0; h < this.heads; h++) {
        const cell = this.cell(l, h);
        if (cell) ctx.drawImage(cell.canvas, pad + h * (size + 4), pad + l * (size + 4), size, size);
      }
    }
    return out;
  }
}

function drawMatrix(cell, kind, data, shape, i, scale) {
  const rows = shape[1];
  const cols = shape[2];
  const start = i * rows * cols;
  const { canvas } = cell;
  if (canvas.width !== cols || canvas.height !== rows || !cell.image) {
    canvas.classList.remove("lines");
    canvas.width = cols;
    canvas.height = rows;
    cell.image = cell.ctx.createImageData(cols, rows);
    cell.pixels = new Uint32Array(cell.image.data.buffer);
  }
  paintScaled(cell.pixels, scaleMatrix(scale, kind, data, start, rows, cols), rows, cols);
  cell.ctx.putImageData(cell.image, 0, 0);
}

function drawNorms(cell, data, shape, i) {
  const [, heads, positions] = shape;
  const { canvas, ctx } = cell;
  if (canvas.width !== LINE_CANVAS || canvas.height !== LINE_CANVAS) {
    canvas.width = LINE_CANVAS;
    canvas.height = LINE_CANVAS;
    canvas.classList.add("lines");
    cell.image = null;
  }
  let max = 0;
  for (let r = 0; r < 3; r++) {
    const start = (r * heads + i) * positions;
    for (let p = 0; p < positions; p++) {
      const v = data[start + p];
      if (Number.isFinite(v) && v > max) max = v;
    }
  }
  ctx.fillStyle = "#11141b";
  ctx.fillRect(0, 0, LINE_CANVAS, LINE_CANVAS);
  if (max <= 0 || positions < 1) return;
  const dx = positions > 1 ? (LINE_CANVAS - 4) / (positions - 1) : 0;
  ctx.lineJoin = "round";
  ctx.lineWidth = 2.5;
  for (let r = 0; r < 3; r++) {
    const start = (r * heads + i) * positions;
    ctx.strokeStyle = NORM_COLOURS[r];
    ctx.beginPath();
    let pen = false;
    for (let p = 0; p < positions; p++) {
      const v = data[start + p];
      if (!Number.isFinite(v)) { pen = false; continue; }
      const x = 2 + p * dx;
      const y = LINE_CANVAS - 2 - (v / max) * (LINE_CANVAS - 4);
      if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      pen = true;
    }
    ctx.stroke();
  }
}

export const VALUE_NAMES = { attention: "weight", qk_logits: "logit" };

/** A token as hover text shows it: quoted, so spaces and newlines can be seen. */
export function quoteToken(labels, i) {
  return labels ? `“${String(labels[i]).replace(/\n/g, "↵").replace(/\t/g, "⇥")}”` : "";
}

/**
 * What the mouse is over on a thumbnail: the lines of a tip (head, query and key with their
 * tokens, the value), or null off a matrix. `frameOf(layer)` gives the frame drawn there.
 */
export function thumbnailTip(event, frameOf) {
  const cell = event.target.closest(".cell");
  const frame = cell && frameOf(Number(cell.dataset.layer));
  const index = frame ? frame.header.heads.indexOf(Number(cell.dataset.head)) : -1;
  if (index < 0 || frame.header.kind === "qkv_norms") return null;
  const [, rows, cols] = frame.shape;
  const box = cell.querySelector("canvas").getBoundingClientRect();
  const row = Math.min(rows - 1, Math.max(0, Math.floor(((event.clientY - box.top) / box.height) * rows)));
  const col = Math.min(cols - 1, Math.max(0, Math.floor(((event.clientX - box.left) / box.width) * cols)));
  const queries = labelsOf(frame.header, "queries", rows);
  const keys = labelsOf(frame.header, "keys", cols);
  const value = frame.data[(index * rows + row) * cols + col];
  return [`L${frame.header.layer} H${cell.dataset.head} — click to open`,
    `query #${row} ${quoteToken(queries, row)}`, `key #${col} ${quoteToken(keys, col)}`,
    `${VALUE_NAMES[frame.header.kind] ?? "value"} ${fmt(value, 4)}`].join("\n");
}

/** Put `tip` (text `text`) beside the mouse, on the side with room. */
export function placeTip(tip, text, event) {
  tip.textContent = text;
  tip.hidden = false;
  const below = event.clientY + 14 + tip.offsetHeight <= window.innerHeight;
  const right = event.clientX + 14 + tip.offsetWidth <= window.innerWidth;
  tip.style.left = `${right ? event.pageX + 14 : event.pageX - 14 - tip.offsetWidth}px`;
  tip.style.top = `${below ? event.pageY + 14 : event.pageY - 14 - tip.offsetHeight}px`;
}

/** Short role names for tags (map cells, thumbnails, focus title). */
export const ROLE_TAGS = {
  previous_token: "prev", sink: "sink", diagonal: "self", local: "local", uniform: "uniform",
  induction: "induction", duplicate_token: "dup",
};

/** The same, for cells narrower than ~64 px. */
export const ROLE_SHORT = { ...ROLE_TAGS, uniform: "unif", induction: "ind", local: "loc" };

export function setTag(button, role, short = false) {
  let tag = button.querySelector(".role-tag");
  if (!role) {
    if (tag) tag.remove();
    delete button.dataset.role;
    return;
  }
  if (!tag) {
    tag = document.createElement("span");
    tag.className = "role-tag";
    button.append(tag);
  }
  tag.textContent = (short ? ROLE_SHORT : ROLE_TAGS)[role] ?? role;
  tag.dataset.role = role;
  button.dataset.role = role;
}

function label(tag, className, text) {
  const el = document.createElement(tag);
  el.className = className;
  el.textContent = text;
  return el;
}

function fmt(v, digits = 3) {
  return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "–";
}

export { HEALTH };
