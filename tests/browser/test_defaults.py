"""Defaults that read well, checked on the page's own modules in Chromium: a steady cost
badge, token labels that fit, sparse series drawn as points, the colour scale of causal
heads."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

HOVERING = """async () => {
  const { BudgetBadge } = await import('/budget.js');
  const span = document.createElement('span');
  document.body.append(span);
  const badge = new BudgetBadge(span);
  const states = [], texts = [];
  // A run whose cost hovers at its 3 % budget: 2.7 % and 3.3 % by turns, thinning by turns.
  for (let i = 0; i < 60; i++) {
    const over = i % 2 === 1;
    badge.show({ max_overhead: 0.03, overhead: over ? 0.033 : 0.027, overhead_total: 0.03,
      costs: { stats: 0.01 }, thinned: { stats_every: i % 4 < 2 ? 2 : 1, snapshot_stride: 1,
      stream_factor: 1, view_scale: 1 }, thinning: i % 4 < 2 ? ['stats every 2 steps'] : [],
      dropped: 0, text: 'the whole sentence' });
    states.push(span.dataset.state);
    texts.push(span.textContent);
  }
  const title = span.title;
  // Then clearly over for good: shown after a few reports.
  for (let i = 0; i < 5; i++) {
    badge.show({ max_overhead: 0.03, overhead: 0.08, overhead_total: 0.05, costs: {},
      thinned: { stats_every: 4 }, thinning: ['stats every 4 steps'], dropped: 0, text: 't' });
    states.push(span.dataset.state);
  }
  return { states, texts, changes: badge.changes, title };
}"""


def test_the_cost_badge_is_steady_when_the_cost_hovers_at_the_budget(blank):
    got = blank.evaluate(HOVERING)
    hovering = got["states"][:60]
    flips = sum(a != b for a, b in zip(hovering, hovering[1:], strict=False))
    assert flips <= 1, hovering
    assert all(len(t) < 40 for t in got["texts"])  # short: "cost 3 % of 3 % · thinned"
    assert {t.split(" of ")[0] for t in got["texts"][10:]} <= {"cost 3 %", "cost 2.9 %",
                                                               "cost 3.1 %"}  # averaged
    assert got["states"][-1] == "over" and got["states"][60] != "over"  # held a few reports
    assert "the whole sentence" in got["title"]


TICKS = """async () => {
  const h = await import('/heatmaps.js');
  const labels = Array.from({ length: 64 },
    (_, i) => (i % 8 === 0 ? ' the' : i % 8 === 7 ? '\\n' : 'ab'));
  const wide = h.ticks(labels, 64, 1000, true);
  const narrow = h.ticks(labels, 64, 400, true);
  const side = h.ticks(labels, 64, 900, false);
  const few = h.ticks(['a', 'b', 'c'], 3, 600, true);
  const shown = [' the', '\\n', '', '\\tx'].map(h.showToken);
  const sparse = [h.sparse([1, null, null, null, 2, null]),
    h.sparse(Array.from({ length: 100 }, (_, i) => i))];
  return { wide, narrow, side, few, shown, sparse };
}"""


def test_token_labels_fit_the_axis_and_whitespace_shows(blank):
    got = blank.evaluate(TICKS)
    assert got["shown"] == ["·the", "↵", "∅", "⇥x"]
    wide = got["wide"]
    assert len(wide["tickvals"]) == 64 and wide["tickangle"] == -90  # all, turned
    assert wide["ticktext"][:2] == ["·the", "ab"] and wide["ticktext"][7] == "↵"
    # 400 px hold 28 rows of 12 px text (and 2 px between): every 3rd of 64
    assert got["narrow"]["tickvals"][:3] == [0, 3, 6] and len(got["narrow"]["tickvals"]) == 22
    assert len(got["side"]["tickvals"]) == 64 and "tickangle" not in got["side"]
    assert got["few"]["tickangle"] == 0  # short labels stay upright
    assert got["sparse"] == [True, False]  # a loss every few steps gets points


SCALE = """async () => {
  const c = await import('/colormap.js');
  const L = 6;
  const causal = new Float32Array(L * L), full = new Float32Array(L * L).fill(1 / L);
  for (let r = 0; r < L; r++) for (let k = 0; k <= r; k++) causal[r * L + k] = 1 / (r + 1);
  return [c.scaleMatrix('auto', 'attention', causal, 0, L, L).title,
          c.scaleMatrix('auto', 'attention', full, 0, L, L).title,
          c.scaleMatrix('auto', 'qk_logits', causal, 0, L, L).title];
}"""


def test_the_auto_scale_is_per_row_for_causal_heads(blank):
    assert blank.evaluate(SCALE) == ["weight / row max", "weight", "logit"]
