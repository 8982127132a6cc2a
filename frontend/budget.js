// The header's cost-budget badge: what watching costs the training loop, and what the
// dashboard thinned to stay under its budget (server/training/budget.py; the run summary's
// `budget` and the websocket's `budget` messages carry the same object).
//
// It reads steadily: the figure shown is averaged over the last few reports, its colour
// changes only once a new state held SETTLE reports in a row (and "over" ends only below
// LEAVE_OVER of the budget), and the text is short; the details are in the tooltip.

const SMOOTHING = 0.3; // weight of the newest report in the figure shown (~5 reports' memory)
const SETTLE = 3; // reports a new colour must hold before it is shown
const LEAVE_OVER = 0.9; // "over" ends below 90 % of the budget, not at the first dip under it

// 0.03 -> "3 %", 0.001 -> "0.1 %", 0.0123 -> "1.2 %" (as the server's text writes them)
export const pct = (x) => {
  if (x == null) return "–";
  const v = Math.round(1000 * x) / 10;
  return `${v >= 1 || v === 0 ? String(v) : v.toFixed(1)} %`;
};

function isThinning(budget) {
  const t = budget.thinned || {};
  return (t.stats_every || 1) > 1 || (t.snapshot_stride || 1) > 1 || (t.stream_factor || 1) > 1
    || (t.view_scale || 1) < 1;
}

export class BudgetBadge {
  constructor(el) {
    this.el = el; // a <span> in the header; textContent only (no HTML from the server)
    this.reset();
  }

  reset() {
    this.state = null; // "ok" | "thinned" | "over", as shown
    this.pending = null;
    this.held = 0;
    this.overhead = null; // smoothed
    this.changes = 0; // colour changes shown (test hook)
  }

  /** The state this report asks for, with the "over" band's hysteresis. */
  wanted(budget) {
    const { overhead } = budget;
    const max = limitOf(budget);
    if (max != null && overhead != null) {
      const limit = this.state === "over" ? LEAVE_OVER * max : max;
      if (overhead > limit) return "over";
    }
    return isThinning(budget) ? "thinned" : "ok";
  }

  settle(wanted) {
    if (this.state === null || wanted === this.state) {
      if (this.state !== wanted) this.changes += this.state === null ? 0 : 1;
      this.state = wanted;
      this.pending = null;
      this.held = 0;
      return;
    }
    this.held = wanted === this.pending ? this.held + 1 : 1;
    this.pending = wanted;
    if (this.held >= SETTLE) {
      this.state = wanted;
      this.pending = null;
      this.held = 0;
      this.changes += 1;
    }
  }

  // `budget`: Budget.status() of the run shown, or null (a remote run: none here).
  show(budget) {
    const el = this.el;
    if (!budget) {
      el.hidden = true;
      el.textContent = "";
      this.reset();
      return;
    }
    if (budget.overhead != null) {
      this.overhead = this.overhead == null ? budget.overhead
        : this.overhead + SMOOTHING * (budget.overhead - this.overhead);
    }
    this.settle(this.wanted(budget));
    el.hidden = false;
    el.dataset.state = this.state;
    const limit = limitOf(budget);
    const of = limit == null ? "" : ` of ${pct(limit)}`;
    const tail = this.state === "over" ? " · thinning" : this.state === "thinned" ? " · thinned" : "";
    el.textContent = `cost ${pct(this.overhead)}${of}${tail}`;
    const costs = budget.costs || {};
    const parts = Object.keys(costs).map((k) => `${k} ${pct(costs[k])}`).join(", ");
    const thinned = (budget.thinning || []).join(", ");
    el.title = `What watching costs the training loop (averaged over the last reports).\n${budget.text}`
      + (thinned ? `\nthinned: ${thinned}` : "")
      + `\nlast window: ${pct(budget.overhead)}; per part: ${parts || "–"}`
      + `\nsince the start: ${pct(budget.overhead_total)}`
      + (budget.dropped ? `\nhistory records dropped: ${budget.dropped}` : "");
  }
}

/** The limit in force: the budget while watched, or the smaller one while nobody watches
 * (a server older than that field sends only max_overhead). */
function limitOf(budget) {
  return budget.limit !== undefined ? budget.limit : budget.max_overhead;
}
