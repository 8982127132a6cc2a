// Alerts (server/alerts: entropy collapse, NaN/Inf, dead and uniform heads): a banner for
// the newest alert not dismissed yet, and one mark per alert on the history bar's timeline;
// clicking either opens that head (or layer) at that step. The alerts come with every
// "heads" message and GET /heads answer (`alerts`, the latest 500). This module builds its
// own banner (text only ever through textContent) and talks to app.js through `onOpen`.

import { el } from "./view.js";

const LEVEL = { critical: "bad", warning: "warn" };

/** "L1 H2" or "L1" (a layer's alert). */
export function alertWhere(alert) {
  return alert.head === null || alert.head === undefined ? `L${alert.layer}` : `L${alert.layer} H${alert.head}`;
}

export class AlertView {
  /** @param {{onOpen: (alert: object) => void, anchor: HTMLElement}} hooks the banner goes after `anchor` */
  constructor({ onOpen, anchor }) {
    this.onOpen = onOpen;
    this.alerts = []; // oldest first, as the server lists them
    this.session = null;
    this.dismissed = -1; // alerts with seq <= this are not bannered (per session)
    this.text = el("span", { id: "alert-text", class: "alert-text" });
    this.more = el("span", { id: "alert-more", class: "alert-more" });
    this.open = el("button", { type: "button", id: "alert-open", title: "Open this head at this step" }, "show");
    this.close = el("button", { type: "button", id: "alert-close", "aria-label": "dismiss alerts" }, "×");
    this.banner = el("div", { id: "alert-banner", class: "alert-banner", role: "alert", hidden: "" },
      el("span", { class: "alert-icon", text: "⚠" }), this.text, this.more, this.open, this.close);
    anchor.after(this.banner);
    this.open.addEventListener("click", () => this.latest() && this.onOpen(this.latest()));
    this.close.addEventListener("click", () => this.dismiss());
    this.text.addEventListener("click", () => this.latest() && this.onOpen(this.latest()));
  }

  /** A new run: nothing shown until its alerts arrive. */
  reset() {
    this.alerts = [];
    this.session = null;
    this.dismissed = -1;
    this.banner.hidden = true;
  }

  latest() {
    return this.alerts.length ? this.alerts[this.alerts.length - 1] : null;
  }

  /** Take the alerts of a heads message or answer (`live`: not a scrubbed step's). */
  update(alerts, session, live = true) {
    if (session !== this.session) {
      this.session = session;
      this.dismissed = -1;
    }
    this.alerts = alerts || [];
    if (live) this.draw();
  }

  dismiss() {
    const last = this.latest();
    if (last) this.dismissed = last.seq;
    this.banner.hidden = true;
  }

  draw() {
    const last = this.latest();
    if (!last || last.seq <= this.dismissed) {
      this.banner.hidden = true;
      return;
    }
    const unseen = this.alerts.filter((a) => a.seq > this.dismissed).length;
    this.banner.dataset.level = LEVEL[last.severity] || "warn";
    this.banner.dataset.step = String(last.step);
    this.text.textContent = last.text;
    this.text.title = `rule ${last.rule} · ${Object.entries(last.values || {})
      .map(([k, v]) => `${k} ${typeof v === "number" ? Number(v.toPrecision(3)) : v}`).join(" · ")}`;
    this.more.textContent = unseen > 1 ? `(+${unseen - 1} more)` : "";
    this.banner.hidden = false;
  }

  /** The alerts as marks for the history bar: {step, title, level, alert}. */
  marks() {
    return this.alerts.map((a) => ({ step: a.step, title: `${a.text} — click to open ${alertWhere(a)} at step ${a.step}`,
      level: LEVEL[a.severity] || "warn", alert: a }));
  }

  /** Dashed lines on a plotly chart sharing the step axis: one per step with alerts (the
   * first such step, and the newest 20). */
  shapes() {
    const byStep = new Map();
    for (const a of this.alerts) {
      const seen = byStep.get(a.step);
      if (!seen || (a.severity === "critical" && seen.severity !== "critical")) byStep.set(a.step, a);
    }
    const steps = [...byStep.values()];
    const shown = steps.length > 21 ? [steps[0], ...steps.slice(-20)] : steps;
    return shown.map((a) => ({
      type: "line", xref: "x", yref: "paper", x0: a.step, x1: a.step, y0: 0, y1: 1,
      line: { color: a.severity === "critical" ? "#ff4d6d" : "#f4a261", width: 1, dash: "dash" },
      name: a.text,
    }));
  }
}
