"""Head-role scores on hand-built attention matrices with known answers, role assignment
and the per-session role tracker (events, since-steps, the state at a past step)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnscope.backend.history.roles import SETTLE_ROWS, RoleTracker, snapshot_repeat_scores
from attnscope.core.roles import (
    PATTERN_NAMES,
    RoleRule,
    assign_roles,
    local_window,
    pattern_scores,
    repeat_scores,
    repeated_probe,
)
from attnscope.core.stats import HEAD_STATISTICS, head_statistics, head_stats

L = 8


def one_hot(keys: list[int], S: int | None = None) -> torch.Tensor:
    """(L, S) attention where query i puts all its weight on key keys[i]."""
    p = torch.zeros(len(keys), S or len(keys))
    p[torch.arange(len(keys)), torch.tensor(keys)] = 1.0
    return p


def causal_uniform(n: int) -> torch.Tensor:
    return torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]


PREVIOUS = one_hot([0] + list(range(L - 1)))
SINK = one_hot([0] * L)
SELF = one_hot(list(range(L)))
UNIFORM = causal_uniform(L)


def causal(n: int = L) -> torch.Tensor:
    """Unmasked keys per query row of a causal head (L,)."""
    return torch.arange(1, n + 1)


def scores(p: torch.Tensor) -> dict[str, float]:
    return dict(zip(PATTERN_NAMES, pattern_scores(p[None], causal())[:, 0].tolist(),
                    strict=True))


def test_previous_token_head_scores_one_on_previous_and_distance_one():
    s = scores(PREVIOUS)
    assert s["previous_token"] == pytest.approx(1.0)
    assert s["diagonal"] == pytest.approx(0.0)
    assert s["distance"] == pytest.approx(1.0)
    assert s["local"] == pytest.approx(1.0)
    assert s["sink"] == pytest.approx(1 / (L - 1))  # only query 1, whose previous key is 0


def test_sink_and_self_heads():
    sink = scores(SINK)
    assert sink["sink"] == pytest.approx(1.0)
    assert sink["distance"] == pytest.approx(sum(range(1, L)) / (L - 1))  # query i looks i back
    assert sink["diagonal"] == pytest.approx(0.0)
    diag = scores(SELF)
    assert diag["diagonal"] == pytest.approx(1.0) and diag["previous_token"] == 0.0
    assert diag["distance"] == 0.0 and diag["sink"] == 0.0


def test_uniform_causal_head_has_full_entropy_and_spread_scores():
    s = scores(UNIFORM)
    # query i splits its weight over i+1 keys: the weight on key i-1 is 1/(i+1)
    expected = sum(1 / (i + 1) for i in range(1, L)) / (L - 1)
    assert s["previous_token"] == pytest.approx(expected)
    assert s["diagonal"] == pytest.approx(expected)
    assert s["uniform"] == pytest.approx(1.0)  # rows with one key (row 0) do not count
    # head_stats' entropy counts row 0 as 0: the role uses its own score
    assert head_stats(UNIFORM[None], torch.arange(1, L + 1))[0, 0] == pytest.approx((L - 1) / L)


def test_local_band_counts_keys_within_the_window():
    w = local_window(L)
    far = one_hot([0, 0] + [i - (w + 1) if i > w else 0 for i in range(2, L)])
    near = torch.zeros(L, L)
    for i in range(L):
        lo = max(0, i - w)
        near[i, lo: i + 1] = 1.0 / (i + 1 - lo)
    assert scores(near)["local"] == pytest.approx(1.0)
    assert scores(far)["local"] < 0.3


def test_scores_are_batched_over_heads():
    heads = torch.stack([PREVIOUS, SINK, SELF, UNIFORM])  # (H=4, L, S)
    batched = pattern_scores(heads)  # (5, 4)
    for h in range(4):
        single = pattern_scores(heads[h: h + 1])[:, 0]
        assert torch.allclose(batched[:, h], single)


def test_cross_attention_has_no_positional_scores():
    p = torch.full((1, 4, 6), 1 / 6)
    s = pattern_scores(p)[:, 0].tolist()
    assert all(math.isnan(v) for v in s[:4])
    assert s[4] == pytest.approx(1 / 6)


def test_induction_and_duplicate_scores_on_a_repeated_probe():
    T = 5
    n = 2 * T
    induction = one_hot([0] + list(range(T - 1)) + [i - T + 1 for i in range(T, n)])
    duplicate = one_hot([0] + list(range(T - 1)) + [i - T for i in range(T, n)])
    s = repeat_scores(torch.stack([induction, duplicate, causal_uniform(n)]), T)  # (2, 3)
    assert s[:, 0].tolist() == pytest.approx([1.0, 0.0])
    assert s[:, 1].tolist() == pytest.approx([0.0, 1.0])
    expected_uniform = sum(1 / (i + 1) for i in range(T, n)) / T
    assert s[0, 2].item() == pytest.approx(expected_uniform)
    with pytest.raises(ValueError, match="half"):
        repeat_scores(induction[None], T + 1)


def test_repeated_probe_repeats_the_first_half():
    x = torch.arange(2 * 7).view(2, 7)
    r = repeated_probe(x)
    assert r.shape == x.shape  # the same length: the run's view of its input is unchanged
    assert torch.equal(r[:, :3], r[:, 3:6]) and torch.equal(r[:, :3], x[:, :3])
    assert torch.equal(r[:, 6], x[:, 6])
    emb = torch.randn(1, 8, 4)  # (N, L, E) features repeat along L too
    assert torch.equal(repeated_probe(emb)[:, 4:], emb[:, :4])
    with pytest.raises(ValueError, match="x"):
        repeated_probe(torch.zeros(1, 3))


def roles_of(*heads: torch.Tensor, previous=None) -> list[str | None]:
    p = torch.stack(heads)
    stats = head_statistics(p, causal())
    named = {name: stats[i] for i, name in enumerate(HEAD_STATISTICS)}
    return assign_roles(named, previous or [None] * len(heads))


def test_assign_roles_prefers_the_specific_role_over_local():
    # the previous-token head is also fully "local": it is tagged previous_token
    assert roles_of(PREVIOUS, SINK, SELF, UNIFORM) == ["previous_token", "sink", "diagonal",
                                                        "uniform"]


def test_assign_roles_hysteresis_and_no_role():
    rule = RoleRule()
    t = torch.tensor
    mid = (rule.keep + rule.threshold) / 2
    got = assign_roles({"previous_token": t([mid, mid, float("nan")])},
                       ["previous_token", None, "previous_token"])
    # kept above `keep`; not taken below `threshold`; NaN scores lose the role
    assert got == ["previous_token", None, None]


def rows(*patterns: torch.Tensor) -> np.ndarray:
    """One stats row (K=1, R, H) of the given heads."""
    return head_statistics(torch.stack(patterns), causal()).numpy()[None]


def test_tracker_events_since_and_state_at_a_past_step():
    tracker = RoleTracker()
    assert tracker.observe(0, rows(UNIFORM, UNIFORM)) == []  # the roles heads start with
    assert tracker.roles == [["uniform", "uniform"]] and tracker.since == [[0, 0]]
    assert tracker.observe(10, rows(UNIFORM, UNIFORM)) == []  # nothing changed: no event
    # a new role is taken once it held SETTLE_ROWS rows in a row
    assert [tracker.observe(step, rows(PREVIOUS, UNIFORM)) for step in (20, 21)] == [[], []]
    assert tracker.roles == [["uniform", "uniform"]]
    new = tracker.observe(22, rows(PREVIOUS, UNIFORM))
    assert SETTLE_ROWS == 3 and [e.text for e in new] == [
        "step 22: L0 H0 became a previous-token head (was a uniform head)"]
    assert tracker.roles == [["previous_token", "uniform"]]
    assert tracker.since == [[22, 0]]
    roles, since = tracker.roles_at(15)
    assert roles == [["uniform", "uniform"]] and since == [[0, 0]]
    assert tracker.roles_at(25) == ([["previous_token", "uniform"]], [[22, 0]])
    # a collapsed head with no role (one arbitrary key, neither previous nor self nor sink)
    odd = one_hot([0, 0, 0, 1, 1, 2, 3, 4])
    new = [e for step in (30, 31, 32) for e in tracker.observe(step, rows(PREVIOUS, odd))]
    assert [(e.kind, e.head, e.step) for e in new] == [("lost", 1, 32), ("collapsed", 1, 32)]
    nan = UNIFORM.clone()
    nan[3] = float("nan")
    new = tracker.observe(40, rows(nan, odd))  # NaN / Inf is said at once
    assert ("nonfinite", 0) in [(e.kind, e.head) for e in new]


def test_roles_do_not_flip_on_scores_that_hover_at_a_threshold():
    """A uniform head whose score wanders around its thresholds (0.9 to take, 0.85 to keep)
    from batch to batch, as an untrained model's heads do: no role flips back and forth."""
    rule = RoleRule()
    gen = np.random.default_rng(0)
    tracker = RoleTracker(rule)
    base = rows(UNIFORM, UNIFORM)
    uniform = HEAD_STATISTICS.index("uniform")
    centre = (rule.uniform_threshold + rule.uniform_keep) / 2
    for step in range(400):
        row = base.copy()
        row[0, uniform, :] = centre + gen.normal(0, 0.03, size=2)
        tracker.observe(step, row)
    changes = [e for e in tracker.events if e.kind in ("gained", "lost")]
    assert len(changes) <= 2, [e.text for e in changes]
    # without smoothing and settling the same scores flip dozens of times
    raw, previous = 0, [None, None]
    gen = np.random.default_rng(0)
    for _ in range(400):
        scores = torch.tensor(centre + gen.normal(0, 0.03, size=2), dtype=torch.float32)
        roles = assign_roles({"uniform": scores}, previous, rule)
        raw += sum(a != b for a, b in zip(roles, previous, strict=True))
        previous = roles
    assert raw > 20


def test_tracker_takes_induction_scores_from_the_probe_snapshot():
    T, H = 4, 2
    n = 2 * T
    induction = one_hot([0] + list(range(T - 1)) + [i - T + 1 for i in range(T, n)])
    probe = torch.stack([induction, causal_uniform(n)])[None].numpy().astype(np.float16)
    tensors = {"attention.0": np.zeros((1, H, n, n), np.float16), "repeat.0": probe}
    scores = snapshot_repeat_scores(tensors, 1)  # (K=1, 2, H)
    uniform = sum(1 / (i + 1) for i in range(T, n)) / T
    assert scores[0, 0].tolist() == pytest.approx([1.0, uniform], abs=1e-3)
    tracker = RoleTracker()
    tracker.observe(5, rows(UNIFORM, UNIFORM))
    tracker.set_repeat(5, scores)
    for step in range(6, 6 + SETTLE_ROWS):  # each row gets the probe's scores
        tracker.observe(step, tracker.fill(rows(UNIFORM, UNIFORM)))
    assert tracker.roles == [["induction", "uniform"]]
    assert tracker.events[0].text == \
        "step 8: L0 H0 became an induction head (was a uniform head)"


def test_uniform_from_head_stats_entropy_equals_the_direct_computation():
    heads = torch.stack([PREVIOUS, SINK, SELF, UNIFORM, causal_uniform(L).roll(1, 0)])
    direct = pattern_scores(heads, causal())
    entropy = head_stats(heads, causal())[0]
    assert torch.allclose(pattern_scores(heads, causal(), entropy=entropy), direct, atol=1e-6,
                          equal_nan=True)
