// Export of the current view: the focus view through plotly (PNG or SVG), the overview
// grid from its canvases (PNG: one composed canvas; SVG: one <image> per cell plus labels),
// and the current matrices as .npz through the capture API (docs/captures.md).

import { api } from "./api.js";
import { downloadPlot } from "./heatmaps.js";

const SVG_NS = "http://www.w3.org/2000/svg";

export function triggerDownload(href, filename) {
  const a = document.createElement("a");
  a.href = href;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
}

/** Safe file name part: letters, digits, dot, dash, underscore. */
export function fileStem(...parts) {
  return parts.map((p) => String(p).replace(/[^A-Za-z0-9._-]+/g, "_")).join("-");
}

/** The focus view as PNG / SVG: `target` is the plot element or a {data, layout} figure. */
export function exportFocus(target, format, stem) {
  return downloadPlot(target, format, stem);
}

export function exportGridPng(grid, stem) {
  triggerDownload(grid.composite(2).toDataURL("image/png"), `${stem}.png`);
}

/** Build the grid as an SVG document string (cells embedded as PNG data URLs). */
export function gridSvg(grid, title) {
  const size = 64;
  const pad = 28;
  const svg = document.createElementNS(SVG_NS, "svg");
  const width = pad + grid.heads * (size + 4);
  const height = pad + 18 + grid.layers * (size + 4);
  svg.setAttribute("xmlns", SVG_NS);
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text; // serialised escaped
    svg.append(el);
    return el;
  };
  add("rect", { width, height, fill: "#0f1117" });
  const font = { fill: "#d7dae0", "font-family": "sans-serif", "font-size": 11 };
  add("text", { ...font, x: 4, y: 14, "font-size": 13 }, title);
  for (let h = 0; h < grid.heads; h++) add("text", { ...font, x: pad + h * (size + 4) + 22, y: pad + 12 }, `H${h}`);
  for (let l = 0; l < grid.layers; l++) {
    const y = pad + 18 + l * (size + 4);
    add("text", { ...font, x: 2, y: y + size / 2 }, `L${l}`);
    for (let h = 0; h < grid.heads; h++) {
      const cell = grid.cell(l, h);
      if (!cell) continue;
      add("image", {
        x: pad + h * (size + 4), y, width: size, height: size, preserveAspectRatio: "none",
        style: "image-rendering:pixelated", href: cell.canvas.toDataURL("image/png"),
      });
    }
  }
  return new XMLSerializer().serializeToString(svg);
}

export function exportGridSvg(grid, title, stem) {
  const blob = new Blob([gridSvg(grid, title)], { type: "image/svg+xml" });
  const url = URL.createObjectURL(blob);
  triggerDownload(url, `${stem}.svg`);
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

const CAPTURE_KIND = { attention: "attention", qk_logits: "qk_logits", qkv_norms: "qkv" };

/**
 * Re-run the model on the input of the frame on screen through POST /api/v1/captures and
 * download the result as .npz. The input is rebuilt from the frame's token labels (runs with
 * a tokenizer, such as the demo); the server's 422 explains when a run cannot take text.
 */
export async function exportNpz({ run, frame, kind, layers, heads, stem }) {
  if (!frame) throw new Error("nothing on screen yet");
  const labels = frame.header.labels && frame.header.labels.queries;
  if (!Array.isArray(labels)) throw new Error("this run sends no token labels, so its input cannot be captured");
  if (frame.header.pool !== 1) throw new Error("the view is pooled; open the focus view to export its matrices");
  const meta = await api.capture({
    run, text: labels.join(" "), kinds: [CAPTURE_KIND[kind] ?? "attention"], layers, heads, name: stem,
  });
  const url = meta.urls && meta.urls.npz;
  if (!url) throw new Error("the capture API returned no npz URL");
  triggerDownload(url, `${stem}.npz`);
  return meta;
}

/** A composed canvas (the layers x heads map) as an SVG with its title. */
export function exportCanvasSvg(canvas, title, stem) {
  const svg = document.createElementNS(SVG_NS, "svg");
  const width = canvas.width / 2;
  const height = canvas.height / 2 + 20;
  svg.setAttribute("xmlns", SVG_NS);
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  const text = document.createElementNS(SVG_NS, "text");
  for (const [k, v] of Object.entries({ x: 4, y: 14, fill: "#d7dae0", "font-family": "sans-serif", "font-size": 13 })) {
    text.setAttribute(k, String(v));
  }
  text.textContent = title;
  const image = document.createElementNS(SVG_NS, "image");
  for (const [k, v] of Object.entries({ x: 0, y: 20, width, height: height - 20, href: canvas.toDataURL("image/png") })) {
    image.setAttribute(k, String(v));
  }
  svg.append(text, image);
  const blob = new Blob([new XMLSerializer().serializeToString(svg)], { type: "image/svg+xml" });
  const url = URL.createObjectURL(blob);
  triggerDownload(url, `${stem}.svg`);
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
