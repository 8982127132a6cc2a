// The view on screen as one standalone .html file (docs/standalone.md): the server's
// standalone page without data (GET /export/standalone.html: plotly.js, the styles and the
// standalone page's scripts) with the data this page holds filled in, then downloaded.
// No new capture: the file shows the matrices, statistics and roles on screen.

import { triggerDownload } from "./export.js";

const SHELL_URL = "/export/standalone.html";
const DATA_MARKER = "<!--attnscope:data-->";
const LIMIT = /<meta name="attnscope-max-data-bytes" content="(\d+)">/;

function base64(floats) {
  const bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength);
  const chunks = [];
  for (let i = 0; i < bytes.length; i += 0x8000) chunks.push(String.fromCharCode(...bytes.subarray(i, i + 0x8000)));
  return btoa(chunks.join(""));
}

function mb(n) {
  return `${(n / 2 ** 20).toFixed(1)} MiB`;
}

/** A decoded frame as a frame of the file (float32: the page keeps decoded values). */
export function frameEntry({ header, data, shape }) {
  return { kind: header.kind, layer: header.layer, heads: header.heads, shape, dtype: "float32",
    pool: header.pool ?? 1, labels: header.labels ?? null, data: base64(data) };
}

/** The head map's values ("layer:head" -> {statistic: value}) as the file's stats, by layer. */
export function statsEntries(values) {
  const byLayer = new Map();
  for (const [key, record] of values) {
    const [layer, head] = key.split(":").map(Number);
    if (!byLayer.has(layer)) byLayer.set(layer, []);
    byLayer.get(layer).push([head, record]);
  }
  return [...byLayer].sort((a, b) => a[0] - b[0]).map(([layer, list]) => {
    list.sort((a, b) => a[0] - b[0]);
    const out = {};
    for (const name of new Set(list.flatMap(([, r]) => Object.keys(r)))) {
      out[name] = list.map(([, r]) => (Number.isFinite(r[name]) ? r[name] : null));
    }
    return { layer, heads: list.map(([h]) => h), values: out };
  });
}

/**
 * Download the view as a standalone file. `view`: "overview", "map" or "focus" (of `focus`,
 * {layer, head}); `frames`: the decoded frames it shows; `headmap`: the page's HeadMap
 * (statistics and roles, so the file has the map too). Resolves to the data embedded.
 */
export async function exportHtml({ run, step, kind, view, scale, focus, frames, headmap, stem }) {
  const model = (run && run.model) || {};
  const pooled = frames.some((f) => (f.header.pool ?? 1) > 1);
  const data = {
    format: "attnscope-standalone", version: 1,
    title: `${run ? run.name || run.id : ""} · step ${step}`,
    subtitle: `${kind} · exported from the live page`,
    kind, view, scale, focus: focus ? { layer: focus.layer, head: focus.head } : null,
    model: { layers: model.layers || 0, heads: model.heads || 0,
      names: (model.layer_details || []).map((d) => d.name) },
    frames: frames.map(frameEntry),
    stats: statsEntries(headmap.values),
    roles: headmap.roles,
    notes: pooled ? ["pooled as on the page; export a head from its focus view for its whole matrix"] : [],
  };
  const response = await fetch(SHELL_URL);
  if (!response.ok) throw new Error(`${SHELL_URL} answered ${response.status}`);
  const shell = await response.text();
  const text = JSON.stringify(data).replace(/</g, "\\u003c");
  const limit = Number((shell.match(LIMIT) || [])[1] || Infinity);
  if (text.length > limit) {
    throw new Error(`this view is ${mb(text.length)} of data, over the ${mb(limit)} a standalone `
      + "file holds: export the layers × heads map, or one head from its focus view");
  }
  const element = `<script type="application/json" id="attnscope-data">${text}</script>`;
  const html = shell.replace(DATA_MARKER, () => element); // a function: no "$&" patterns
  const url = URL.createObjectURL(new Blob([html], { type: "text/html" }));
  triggerDownload(url, `${stem}.html`);
  setTimeout(() => URL.revokeObjectURL(url), 1000);
  return data;
}
