// Page state that is not DOM: runs, histories, step rate, head health rules.
// Pure module (no DOM, no network) so it stays easy to reason about.

/** Thresholds for the head-health outlines; shown in the legend and tooltips. */
export const HEALTH = {
  collapsedEntropy: 0.02, // normalised entropy below this: every query attends to one key
  uniformEntropy: 0.99, // above this: the head averages all keys (no information)
  sinkFirstToken: 0.9, // mean weight on key 0 above this: attention-sink ("dead") head
};

/**
 * Classify one head from its head_stats values.
 * @returns {{level: "ok"|"warn"|"bad", reasons: string[]}}
 */
export function classifyHead({ entropy, first_token: firstToken, nan, inf }) {
  const reasons = [];
  let level = "ok";
  if (nan > 0 || inf > 0) {
    level = "bad";
    reasons.push(`non-finite attention: ${nan} NaN, ${inf} Inf`);
  }
  if (Number.isFinite(entropy) && entropy < HEALTH.collapsedEntropy) {
    if (level === "ok") level = "warn";
    reasons.push(`collapsed: entropy ${entropy.toFixed(3)} < ${HEALTH.collapsedEntropy} (each query looks at a single key)`);
  }
  if (Number.isFinite(entropy) && entropy > HEALTH.uniformEntropy) {
    if (level === "ok") level = "warn";
    reasons.push(`dead: entropy ${entropy.toFixed(3)} > ${HEALTH.uniformEntropy} (uniform over keys)`);
  }
  if (Number.isFinite(firstToken) && firstToken > HEALTH.sinkFirstToken) {
    if (level === "ok") level = "warn";
    reasons.push(`dead: ${(100 * firstToken).toFixed(0)}% of weight on the first token`);
  }
  return { level, reasons };
}

/** A bounded (step -> values) series; halves its resolution instead of growing forever. */
export class Series {
  constructor(limit = 4000) {
    this.limit = limit;
    this.steps = [];
    this.values = new Map(); // name -> number[] aligned with steps
  }

  push(step, record) {
    const last = this.steps.length ? this.steps[this.steps.length - 1] : -Infinity;
    if (step < last) this.clear(); // the run restarted
    else if (step === last) return; // same step seen twice
    const n = this.steps.length;
    this.steps.push(step);
    for (const [name, value] of Object.entries(record)) {
      if (!this.values.has(name)) this.values.set(name, new Array(n).fill(null));
    }
    for (const [name, arr] of this.values) {
      const v = record[name];
      arr.push(typeof v === "number" && Number.isFinite(v) ? v : null);
    }
    if (this.steps.length > this.limit) this.decimate();
  }

  decimate() {
    const keep = (_, i) => i % 2 === 0 || i === this.steps.length - 1;
    this.steps = this.steps.filter(keep);
    for (const [name, arr] of this.values) this.values.set(name, arr.filter(keep));
  }

  clear() {
    this.steps = [];
    this.values = new Map();
  }
}

/** Steps per second over a sliding window of (time, step) observations. */
export class RateMeter {
  constructor(windowMs = 5000) {
    this.windowMs = windowMs;
    this.samples = [];
  }

  observe(step, now = performance.now()) {
    const last = this.samples[this.samples.length - 1];
    if (last && step < last.step) this.samples = [];
    if (last && step === last.step) return;
    this.samples.push({ step, now });
    while (this.samples.length > 2 && now - this.samples[0].now > this.windowMs) this.samples.shift();
  }

  /** Steps per second, or null with fewer than two observations. */
  rate(now = performance.now()) {
    if (this.samples.length < 2) return null;
    const first = this.samples[0];
    const last = this.samples[this.samples.length - 1];
    if (now - last.now > this.windowMs) return 0; // nothing new for a while
    const dt = (last.now - first.now) / 1000;
    return dt > 0 ? (last.step - first.step) / dt : null;
  }

  reset() {
    this.samples = [];
  }
}

/** Per-run histories: scalars (training curves) and head stats (entropy per head per layer). */
export class RunHistory {
  constructor() {
    this.scalars = new Series(4000);
    this.entropy = new Map(); // layer -> Series of {h0: e, h1: e, ...}
    this.latestStats = new Map(); // layer -> latest head_stats message
    this.rate = new RateMeter();
    this.step = null;
  }

  observeStep(step) {
    if (typeof step !== "number") return;
    if (this.step === null || step > this.step || step < this.step - 1) this.step = step;
    this.rate.observe(step);
  }

  addScalars(msg) {
    this.observeStep(msg.step);
    this.scalars.push(msg.step, msg.values || {});
  }

  addHeadStats(msg) {
    this.observeStep(msg.step);
    this.latestStats.set(msg.layer, msg);
    if (!this.entropy.has(msg.layer)) this.entropy.set(msg.layer, new Series(2000));
    const record = {};
    msg.heads.forEach((h, i) => { record[`head ${h}`] = msg.entropy[i]; });
    this.entropy.get(msg.layer).push(msg.step, record);
  }
}
