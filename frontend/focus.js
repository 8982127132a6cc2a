// The focus view of one head's matrix (attention weights or logits, up to 512 x 512).
// Pixels go on a <canvas> laid over plotly's plot area, painted with the grid's lookup
// table (colormap.js), so a live update costs one pass over the values and one drawImage;
// the colour bar is a small canvas and three labels beside it. plotly draws only what
// changes rarely: the axes with their token ticks, zoom and pan. Any Plotly.react of this
// view costs 50-300 ms on the 2-core development machine (the tick labels are measured
// one by one), so it runs when the matrix's size or scale changes, and for new token
// labels at most once a second; drawing the whole heatmap with plotly on every update
// gave 3 updates/s at 512 x 512. Exports build the full plotly heatmap once (focusFigure).

import { LUT32, paintScaled, scaledValue, scaleMatrix, VIRIDIS } from "./colormap.js";
import { focusAxes, labelsOf, PLOT_CONFIG, showToken } from "./heatmaps.js";

const Plotly = () => window.Plotly;
const TICKS_INTERVAL_MS = 1000; // new token labels on the axes: at most one plotly redraw a second

function fmt(v) {
  return Number.isFinite(v) ? v.toFixed(4) : "–";
}

/** The values to draw of head `index` of an attention / qk_logits frame (h, L, S). */
export function focusValues(frame, index, scale) {
  const { header, data, shape } = frame;
  const rows = shape[1];
  const cols = shape[2];
  const scaled = scaleMatrix(scale, header.kind, data, index * rows * cols, rows, cols);
  return { ...scaled, rows, cols, queries: labelsOf(header, "queries", rows), keys: labelsOf(header, "keys", cols) };
}

/** The whole focus heatmap as a plotly figure (for PNG / SVG export). */
export function focusFigure(frame, index, scale) {
  const v = focusValues(frame, index, scale);
  const z = new Array(v.rows);
  for (let r = 0; r < v.rows; r++) {
    const row = new Array(v.cols);
    for (let c = 0; c < v.cols; c++) {
      const x = scaledValue(v, r * v.cols + c);
      row[c] = Number.isFinite(x) ? x : null;
    }
    z[r] = row;
  }
  const trace = {
    type: "heatmap", z, zmin: v.zmin, zmax: v.zmax, colorscale: VIRIDIS, zsmooth: false,
    colorbar: { title: { text: v.title, side: "right" }, outlinewidth: 0 },
  };
  return { data: [trace], layout: focusAxes(v, null), config: PLOT_CONFIG };
}

export class FocusCanvas {
  /**
   * @param {HTMLElement} plot the plotly element (axes, ticks, colour bar)
   * @param {HTMLCanvasElement} canvas laid over the plot area (pointer-events: none)
   */
  constructor(plot, canvas, bar) {
    this.plot = plot;
    this.canvas = canvas;
    this.bar = new ColourBar(bar);
    this.tip = document.createElement("div");
    this.tip.className = "focus-tip";
    this.tip.hidden = true;
    document.body.append(this.tip);
    this.src = document.createElement("canvas"); // cols x rows, one pixel per cell
    this.srcCtx = this.src.getContext("2d");
    this.image = null;
    this.pixels = null;
    this.shown = null; // what is painted: focusValues(...) of the latest frame
    this.axesKey = null; // what the axes were drawn for (matrix size, uirevision)
    this.axesDetail = null; // the token labels they show
    this.axesShownAt = -Infinity;
    this.axesTimer = null;
    this.reacts = 0; // plotly redraws (test hook)
    this.onLayout = () => this.blit();
    plot.addEventListener("mousemove", (event) => this.hover(event));
    plot.addEventListener("mouseleave", () => { this.tip.hidden = true; });
  }

  /** Paint head `index` of `frame` under colour `scale`; redraw the axes when they change. */
  draw(frame, index, scale, uirevision) {
    const v = focusValues(frame, index, scale);
    if (this.src.width !== v.cols || this.src.height !== v.rows || !this.image) {
      this.src.width = v.cols;
      this.src.height = v.rows;
      this.image = this.srcCtx.createImageData(v.cols, v.rows);
      this.pixels = new Uint32Array(this.image.data.buffer);
    }
    paintScaled(this.pixels, v, v.rows, v.cols);
    this.srcCtx.putImageData(this.image, 0, 0);
    this.shown = v;
    this.bar.show(v.zmin, v.zmax, v.title);
    const key = `${uirevision}|${v.rows}x${v.cols}`;
    if (key !== this.axesKey) {
      this.axesKey = key;
      this.uirevision = uirevision;
      this.drawAxes();
    } else if (this.detail(v) !== this.axesDetail) {
      this.scheduleAxes();
    }
    this.blit();
  }

  detail(v) {
    const labels = (list) => (list ? list.join("\u0000") : "");
    return `${labels(v.queries)}|${labels(v.keys)}`;
  }

  /** Token labels change with every batch: show the newest at most once a second. */
  scheduleAxes() {
    if (this.axesTimer !== null) return;
    const wait = Math.max(0, this.axesShownAt + TICKS_INTERVAL_MS - performance.now());
    this.axesTimer = setTimeout(() => {
      this.axesTimer = null;
      if (this.shown) this.drawAxes();
    }, wait);
  }

  drawAxes() {
    const v = this.shown;
    this.axesDetail = this.detail(v);
    this.axesShownAt = performance.now();
    this.reacts += 1;
    // The plot area: the element less the margins, the colour bar and the tick labels.
    const side = Math.min(this.plot.clientWidth - 200, this.plot.clientHeight - 80);
    const layout = focusAxes(v, this.uirevision, side > 0 ? side : undefined);
    layout.margin = { ...layout.margin, r: 96 }; // room for the colour bar
    const done = Plotly().react(this.plot, [], layout, PLOT_CONFIG);
    // Zoom, pan and resizes move the plot area: follow them (once; Plotly.purge drops these).
    for (const name of ["plotly_relayout", "plotly_afterplot"]) {
      if (this.plot.removeListener) this.plot.removeListener(name, this.onLayout);
      this.plot.on(name, this.onLayout);
    }
    return Promise.resolve(done).then(() => this.blit());
  }

  /** The plot area in CSS pixels (relative to the plot element) and the axes' ranges. */
  area() {
    const full = this.plot._fullLayout;
    if (!full || !full.xaxis || !full.yaxis) return null;
    const xa = full.xaxis;
    const ya = full.yaxis;
    return { left: xa._offset, top: ya._offset, width: xa._length, height: ya._length,
      x: xa.range.map(Number), y: ya.range.map(Number) };
  }

  /** Copy the visible part of the matrix onto the overlay canvas, crisp. */
  blit() {
    const a = this.area();
    if (!a || !this.shown || a.width <= 0 || a.height <= 0) return;
    const ratio = window.devicePixelRatio || 1;
    const w = Math.round(a.width * ratio);
    const h = Math.round(a.height * ratio);
    const c = this.canvas;
    if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    c.style.left = `${a.left}px`;
    c.style.top = `${a.top}px`;
    c.style.width = `${a.width}px`;
    c.style.height = `${a.height}px`;
    c.hidden = false;
    this.bar.place(a.left + a.width + 14, a.top, a.height);
    const ctx = c.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, w, h);
    // Cell j spans [j - 0.5, j + 0.5] on its axis; the source pixel of value x is x + 0.5.
    const x0 = Math.min(...a.x) + 0.5;
    const x1 = Math.max(...a.x) + 0.5;
    const y0 = Math.min(...a.y) + 0.5;
    const y1 = Math.max(...a.y) + 0.5;
    // drawImage clips a source rect outside the image unevenly: clip it here, map the rest.
    const sx0 = Math.max(0, x0);
    const sx1 = Math.min(this.src.width, x1);
    const sy0 = Math.max(0, y0);
    const sy1 = Math.min(this.src.height, y1);
    if (sx1 <= sx0 || sy1 <= sy0) return;
    const kx = w / (x1 - x0);
    const ky = h / (y1 - y0);
    ctx.drawImage(this.src, sx0, sy0, sx1 - sx0, sy1 - sy0,
      (sx0 - x0) * kx, (sy0 - y0) * ky, (sx1 - sx0) * kx, (sy1 - sy0) * ky);
  }

  /** The cell under the mouse: query and key (with their tokens) and the value shown. */
  hover(event) {
    const a = this.area();
    const v = this.shown;
    if (!a || !v) return;
    const box = this.plot.getBoundingClientRect();
    const px = event.clientX - box.left - a.left;
    const py = event.clientY - box.top - a.top;
    if (px < 0 || py < 0 || px > a.width || py > a.height) { this.tip.hidden = true; return; }
    const col = Math.round(a.x[0] + (px / a.width) * (a.x[1] - a.x[0]));
    const row = Math.round(a.y[1] + (py / a.height) * (a.y[0] - a.y[1]));
    if (col < 0 || row < 0 || col >= v.cols || row >= v.rows) { this.tip.hidden = true; return; }
    const value = scaledValue(v, row * v.cols + col);
    const q = v.queries ? showToken(v.queries[row]) : row;
    const k = v.keys ? showToken(v.keys[col]) : col;
    this.tip.textContent = `query #${row}: ${q}\nkey #${col}: ${k}\n${v.title} ${fmt(value)}`;
    this.tip.hidden = false;
    this.tip.style.left = `${event.pageX + 14}px`;
    this.tip.style.top = `${event.pageY + 14}px`;
  }

  /** Forget the drawing (the view closed, or shows q/k/v norms); call before Plotly.purge. */
  clear() {
    clearTimeout(this.axesTimer);
    this.axesTimer = null;
    this.shown = null;
    this.axesKey = null;
    this.axesDetail = null;
    this.canvas.hidden = true;
    this.tip.hidden = true;
    this.bar.hide();
  }
}

/** The colour bar beside the focus view: the lookup table top (high) to bottom, and labels. */
class ColourBar {
  constructor(root) {
    this.root = root;
    root.replaceChildren();
    this.ramp = document.createElement("canvas");
    this.ramp.width = 1;
    this.ramp.height = 256;
    const ctx = this.ramp.getContext("2d");
    const image = ctx.createImageData(1, 256);
    const pixels = new Uint32Array(image.data.buffer);
    for (let i = 0; i < 256; i++) pixels[i] = LUT32[255 - i];
    ctx.putImageData(image, 0, 0);
    const label = (cls) => {
      const el = document.createElement("span");
      el.className = cls;
      return el;
    };
    this.max = label("bar-max");
    this.mid = label("bar-mid");
    this.min = label("bar-min");
    this.title = label("bar-title");
    root.append(this.ramp, this.max, this.mid, this.min, this.title);
    this.text = null;
  }

  /** The range and title shown (text only changes when they do). */
  show(lo, hi, title) {
    const text = `${lo}|${hi}|${title}`;
    if (text === this.text) return;
    this.text = text;
    this.max.textContent = number(hi);
    this.mid.textContent = number((lo + hi) / 2);
    this.min.textContent = number(lo);
    this.title.textContent = title;
    this.root.dataset.zmin = String(lo);
    this.root.dataset.zmax = String(hi);
  }

  place(left, top, height) {
    const s = this.root.style;
    s.left = `${left}px`;
    s.top = `${top}px`;
    s.height = `${height}px`;
    this.root.hidden = false;
  }

  hide() {
    this.root.hidden = true;
    this.text = null;
  }
}

function number(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(1) : String(Number(v.toPrecision(3)));
}
