// The header's cost-budget badge: what watching costs the training loop, and what the
// dashboard thinned to stay under its budget (server/budget.py; the run summary's
// `budget` and the websocket's `budget` messages carry the same object).

// 0.03 -> "3 %", 0.001 -> "0.1 %", 0.0123 -> "1.2 %" (as the server's text writes them)
const pct = (x) => {
  if (x == null) return "–";
  const v = Math.round(1000 * x) / 10;
  return `${v >= 1 || v === 0 ? String(v) : v.toFixed(1)} %`;
};

export class BudgetBadge {
  constructor(el) {
    this.el = el; // a <span> in the header; textContent only (no HTML from the server)
  }

  // `budget`: Budget.status() of the run shown, or null (a remote run: none here).
  show(budget) {
    const el = this.el;
    if (!budget) {
      el.hidden = true;
      el.textContent = "";
      return;
    }
    const thinned = budget.thinned || {};
    const thinning = (thinned.stats_every || 1) > 1 || (thinned.snapshot_stride || 1) > 1
      || (thinned.stream_factor || 1) > 1 || (thinned.view_scale || 1) < 1;
    const over = budget.max_overhead != null && budget.overhead != null
      && budget.overhead > budget.max_overhead;
    el.hidden = false;
    el.dataset.state = over ? "over" : thinning ? "thinned" : "ok";
    const items = budget.thinning || [];
    // Two items at most in the header; the whole sentence is in the tooltip.
    const shown = items.length > 2 ? [...items.slice(0, 2), `${items.length - 2} more`] : items;
    el.textContent = thinning
      ? `${shown.join(", ")} to stay under ${pct(budget.max_overhead)} (now ${pct(budget.overhead)})`
      : `dashboard ${pct(budget.overhead)}`
        + (budget.max_overhead == null ? "" : ` / ${pct(budget.max_overhead)}`);
    const costs = budget.costs || {};
    const parts = Object.keys(costs).map((k) => `${k} ${pct(costs[k])}`).join(", ");
    el.title = `${budget.text}\nper part of the last window: ${parts || "–"}`
      + `\nsince the start: ${pct(budget.overhead_total)}`
      + (budget.dropped ? `\nhistory records dropped: ${budget.dropped}` : "");
  }
}
