// One colour scale for the canvas thumbnails and the plotly focus view.
// VIRIDIS is plotly's own "Viridis" colorscale (same stops); both sides interpolate
// linearly in RGB between them, so a value gets the same colour in the grid and in plotly.

export const VIRIDIS = [
  [0, "#440154"], [0.06274509803921569, "#48186a"], [0.12549019607843137, "#472d7b"],
  [0.18823529411764706, "#424086"], [0.25098039215686274, "#3b528b"], [0.3137254901960784, "#33638d"],
  [0.3764705882352941, "#2c728e"], [0.4392156862745098, "#26828e"], [0.5019607843137255, "#21918c"],
  [0.5647058823529412, "#1fa088"], [0.6274509803921569, "#28ae80"], [0.6901960784313725, "#3fbc73"],
  [0.7529411764705882, "#5ec962"], [0.8156862745098039, "#84d44b"], [0.8784313725490196, "#addc30"],
  [0.9411764705882353, "#d8e219"], [1, "#fde725"],
];

const LUT_SIZE = 256;

function hexToRgb(hex) {
  const v = parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

/** 256 RGBA entries (Uint32 in platform byte order, ready for an ImageData Uint32Array view). */
export const LUT32 = (() => {
  const bytes = new Uint8ClampedArray(LUT_SIZE * 4);
  const stops = VIRIDIS.map(([t, hex]) => [t, hexToRgb(hex)]);
  for (let i = 0; i < LUT_SIZE; i++) {
    const t = i / (LUT_SIZE - 1);
    let j = 1;
    while (j < stops.length - 1 && stops[j][0] < t) j++;
    const [t0, c0] = stops[j - 1];
    const [t1, c1] = stops[j];
    const u = t1 > t0 ? (t - t0) / (t1 - t0) : 0;
    for (let c = 0; c < 3; c++) bytes[4 * i + c] = Math.round(c0[c] + u * (c1[c] - c0[c]));
    bytes[4 * i + 3] = 255;
  }
  return new Uint32Array(bytes.buffer);
})();

/**
 * Colour range of one matrix, shared by grid and focus view.
 * attention: [0, max] (weights are >= 0; 0 anchors "no attention"); other kinds: [min, max].
 * Non-finite values are ignored; a constant or empty matrix gets a non-empty range.
 */
export function valueRange(kind, data, start = 0, end = data.length) {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = start; i < end; i++) {
    const v = data[i];
    if (v < lo) lo = v; // NaN compares false; +-Infinity filtered below
    if (v > hi) hi = v;
  }
  if (lo === -Infinity || hi === Infinity) {
    lo = Infinity; hi = -Infinity;
    for (let i = start; i < end; i++) {
      const v = data[i];
      if (!Number.isFinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  if (!(lo <= hi)) return [0, 1];
  if (kind === "attention") lo = 0;
  if (hi - lo < 1e-9) hi = lo + 1e-6;
  return [lo, hi];
}

/**
 * Paint rows x cols values (data[start ...], C order) into a Uint32Array of pixels.
 * Non-finite values become transparent, as plotly draws them as gaps.
 */
export function paintMatrix(pixels, data, start, rows, cols, zmin, zmax) {
  const n = rows * cols;
  const k = (LUT_SIZE - 1) / (zmax - zmin);
  for (let i = 0; i < n; i++) {
    const v = data[start + i];
    if (v !== v || v === Infinity || v === -Infinity) { pixels[i] = 0; continue; }
    let idx = ((v - zmin) * k + 0.5) | 0;
    if (idx < 0) idx = 0; else if (idx > 255) idx = 255;
    pixels[i] = LUT32[idx];
  }
}

/** Colour scales the page offers (grid, focus view and exports share the choice). */
export const SCALES = {
  // per row for a causal head (nothing above the diagonal: row 0's one key takes all of
  // its weight and would leave the rest dark), per head otherwise
  auto: "auto",
  head: "per head", // [0, max] of each head: its own pattern at full contrast
  row: "per row", // each query row divided by its max: causal and peaked heads show every row
  log: "log", // log10 weight from 1e-4 to 1: small weights stay visible next to a 1.0
  fixed: "fixed 0–1", // the same scale for every head: heads compare
};
export const LOG_FLOOR = 1e-4;

/**
 * The values to colour for one rows x cols matrix at data[start...] under `scale`, and
 * their range: {values, offset, zmin, zmax, title, log}. `values` is `data` itself (read
 * from `offset` = start) or a new Float32Array (offset 0). With `log` set, `values` are
 * the weights and the colour range is in log10 units: paint with paintScaled, read a
 * value with scaledValue (a log10 per pixel cost more than the rest of a 512 x 512 draw).
 * Only attention weights have a row, log or fixed scale; logits always use their own
 * range (per head).
 */
export function scaleMatrix(scale, kind, data, start, rows, cols) {
  const n = rows * cols;
  if (scale === "auto") scale = kind === "attention" && isCausal(data, start, rows, cols) ? "row" : "head";
  if (kind !== "attention" || scale === "head" || !(scale in SCALES)) {
    const [zmin, zmax] = valueRange(kind, data, start, start + n);
    return { values: data, offset: start, zmin, zmax, title: kind === "attention" ? "weight" : "logit" };
  }
  if (scale === "fixed") return { values: data, offset: start, zmin: 0, zmax: 1, title: "weight" };
  if (scale === "log") {
    return { values: data, offset: start, zmin: Math.log10(LOG_FLOOR), zmax: 0, title: "log10 weight", log: true };
  }
  const out = new Float32Array(n);
  for (let r = 0; r < rows; r++) { // per row
    const base = start + r * cols;
    let max = 0;
    for (let c = 0; c < cols; c++) {
      const v = data[base + c];
      if (Number.isFinite(v) && v > max) max = v;
    }
    for (let c = 0; c < cols; c++) {
      const v = data[base + c];
      out[r * cols + c] = Number.isFinite(v) ? (max > 0 ? v / max : 0) : NaN;
    }
  }
  return { values: out, offset: 0, zmin: 0, zmax: 1, title: "weight / row max" };
}

/**
 * Whether a rows x cols matrix is causal: square, more than one row, and no weight above
 * its diagonal (stops at the first one, so a non-causal head costs a few reads).
 */
export function isCausal(data, start, rows, cols) {
  if (rows !== cols || rows < 2) return false;
  for (let r = 0; r < rows - 1; r++) {
    const base = start + r * cols;
    for (let c = r + 1; c < cols; c++) if (data[base + c] > 1e-6) return false;
  }
  return true;
}

/** Value i (row-major from the matrix's start) of a scaleMatrix result, as coloured. */
export function scaledValue(scaled, i) {
  const v = scaled.values[scaled.offset + i];
  if (!scaled.log) return v;
  return Number.isFinite(v) ? Math.log10(Math.max(v, LOG_FLOOR)) : NaN;
}

let logColours = null;

/**
 * Colour of a float32 by its top 16 bits (sign, exponent, 7 mantissa bits) on the log
 * scale: one table lookup per pixel instead of a log10. A bucket spans 0.8% of a value,
 * 0.2 steps of the 256-colour table; NaN and Inf are transparent.
 */
function logTable() {
  if (logColours) return logColours;
  logColours = new Uint32Array(65536);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  const lo = Math.log10(LOG_FLOOR);
  const k = (LUT_SIZE - 1) / -lo;
  for (let hi = 0; hi < 65536; hi++) {
    u[0] = ((hi << 16) | 0x8000) >>> 0; // the middle of the bucket
    const v = f[0];
    if (!Number.isFinite(v)) continue; // 0: transparent
    let idx = ((Math.log10(Math.max(v, LOG_FLOOR)) - lo) * k + 0.5) | 0;
    if (idx < 0) idx = 0; else if (idx > 255) idx = 255;
    logColours[hi] = LUT32[idx];
  }
  return logColours;
}

/** Paint a scaleMatrix result (rows x cols) into a Uint32Array of pixels. */
export function paintScaled(pixels, scaled, rows, cols) {
  const { values, offset } = scaled;
  if (!scaled.log) {
    paintMatrix(pixels, values, offset, rows, cols, scaled.zmin, scaled.zmax);
    return;
  }
  const n = rows * cols;
  if (values instanceof Float32Array) {
    const table = logTable();
    const bits = new Uint32Array(values.buffer, values.byteOffset + 4 * offset, n);
    for (let i = 0; i < n; i++) pixels[i] = table[bits[i] >>> 16];
    return;
  }
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = scaledValue(scaled, i);
  paintMatrix(pixels, out, 0, rows, cols, scaled.zmin, scaled.zmax);
}

const HEX = Array.from(LUT32, (packed) => {
  const bytes = new Uint8Array(new Uint32Array([packed]).buffer); // platform order: R, G, B, A
  return `#${[bytes[0], bytes[1], bytes[2]].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
});

/** "#rrggbb" of a value in [lo, hi] on the viridis scale (non-finite: null). */
export function colourOf(value, lo, hi) {
  if (!Number.isFinite(value)) return null;
  const t = hi > lo ? Math.min(1, Math.max(0, (value - lo) / (hi - lo))) : 0;
  return HEX[Math.round(t * (LUT_SIZE - 1))];
}
