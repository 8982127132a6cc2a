"""Head statistics of an attention event without its L x S matrix.

:func:`event_statistics` gives the rows of :func:`~.reduce.layer_statistics`
(``STAT_NAMES + PATTERN_NAMES``) for every sample and head of an event, from the
per-query statistics of :mod:`transformer_core.events.statistics` (fused kernels where
the emitter describes its logits; docs/statistics.md): memory O((L + S) E) plus
blocks of O(B S), at any sequence length. Each statistic is the mean over a set of
query rows, every one of them exact: all rows up to ``max_rows``, else ``max_rows``
rows spread evenly over the sequence (the first and the last among them). Attentions
that do not describe their logits (linear, clustered...) are computed from their
matrix as before.

>>> from transformer_core.instrument.lazy import SDPACall, sdpa_event
>>> q = torch.zeros(1, 1, 4, 2)                                 # uniform causal attention
>>> ev = sdpa_event(None, SDPACall.of(q, q, is_causal=True))
>>> [round(v, 3) for v in event_statistics(ev)[0, :, 0].tolist()]  # STAT_NAMES + PATTERN_NAMES
[0.75, 0.521, 0.521, 0.0, 0.0, 1.0, 0.361, 0.361, 0.917, 0.361, 1.0]

Shape legend: N samples, H heads, L queries, S keys, R query rows computed, K statistics.
"""

from __future__ import annotations

import torch

from transformer_core.events import AttentionEvent, spread_rows
from transformer_core.events.statistics import RowStatistics, scores_statistics, weights_at

from .reduce import layer_statistics, local_window

# Query rows per head for the per-step statistics of long sequences: 256 rows spread over
# the sequence. Every row is exact, and at L=8192 they cost 1/32 of all rows (12 layers x
# 12 heads: bench/RESULTS.md "statistics", under 3 % of a training step on the CPU). Up to
# L=256 every row is computed, so short sequences match the stream's statistics exactly.
STATS_ROWS = 256


def event_statistics(event: AttentionEvent, max_rows: int | None = STATS_ROWS,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Statistics (N, 11, H) float32 of every sample of ``event``, on the event's device,
    in ``STAT_NAMES + PATTERN_NAMES`` order, over at most ``max_rows`` query rows
    (None or 0: all). ``valid`` (L,) counts unmasked keys for the matrix fallback (as
    :func:`~.reduce.layer_statistics` takes it).

    Where the matrix path counts NaN and Inf *weights*, this counts query rows whose
    entropy is NaN (``nan``) and rows with an infinite logit (``inf``).
    """
    scores = event.scores
    N, H, L, S = event.shape
    if scores is None:  # the matrix the attention applies is what it is
        with torch.no_grad():
            return torch.stack([layer_statistics(event.attention(n), valid) for n in range(N)])
    rows = spread_rows(L, max_rows)
    positions = torch.arange(S, dtype=torch.float32)[:, None]  # (S, 1)
    with torch.no_grad():
        st = scores_statistics(scores, rows=rows, max_logit=True, key_features=positions)
        device = st.entropy.device
        i = rows.to(device).float()  # (R,)
        norm = st.normalised_entropy()  # (N, H, R)
        first = weights_at(scores, st, torch.zeros_like(rows))  # (N, H, R)
        nan = st.entropy.isnan().sum(-1).float()  # (N, H)
        inf = ((st.max_logit.isinf() | st.logsumexp.isposinf()) & (st.keys > 0)).sum(-1)
        head = torch.stack([norm.mean(-1), st.max_weight.mean(-1), first.mean(-1), nan,
                            inf.float()], 1)  # (N, 5, H)
        return torch.cat([head, _pattern_rows(scores, st, norm, first, i, L, S)], 1)


def _pattern_rows(scores, st: RowStatistics, norm: torch.Tensor, first: torch.Tensor,
                  i: torch.Tensor, L: int, S: int) -> torch.Tensor:
    """The six pattern scores (N, 6, H) of :func:`~.reduce.pattern_rows`, from rows i >= 1
    (row 0 of a causal head has one key) of the computed rows."""
    many = st.keys > 1  # (N, H, R)
    uniform = torch.where(many.any(-1), (norm * many).sum(-1) / many.sum(-1).clamp_min(1),
                          torch.full_like(norm[..., 0], float("nan")))  # (N, H)
    nan = torch.full_like(uniform, float("nan"))
    later = i >= 1  # (R,)
    if L < 2 or not bool(later.any()):
        return torch.stack([nan, nan, nan, nan, nan, uniform], 1)
    sink = first[..., later].mean(-1)
    if L != S:
        return torch.stack([nan, nan, nan, nan, sink, uniform], 1)
    rows = st.rows
    previous = weights_at(scores, st, rows - 1)[..., later].mean(-1)  # key i - 1
    diagonal = weights_at(scores, st, rows)[..., later].mean(-1)  # key i
    w = local_window(S)
    band = scores_statistics(scores.restricted(-w, w), rows=rows)
    local = _share(band, st)[..., later].mean(-1)
    distance = _distance(scores, st, i)[..., later].mean(-1)
    return torch.stack([distance, previous, diagonal, local, sink, uniform], 1)  # (N, 6, H)


def _share(part: RowStatistics, whole: RowStatistics) -> torch.Tensor:
    """The weight (N, H, R) a row puts on the keys of ``part`` (a narrower band of the same
    logits): exp(its log-sum-exp - the whole row's); 0 where either has no key."""
    share = torch.exp(part.logsumexp - whole.logsumexp.masked_fill(whole.keys == 0, 0.0))
    return torch.where((part.keys > 0) & (whole.keys > 0), share, torch.zeros_like(share))


def _distance(scores, st: RowStatistics, i: torch.Tensor) -> torch.Tensor:
    """The attention-weighted mean |i - j| (N, H, R): ``i - E[j]`` where no key lies after
    the query (causal); otherwise the keys j <= i are weighed apart (one more pass)."""
    mean_j = st.expected[..., 0]  # (N, H, R)
    if scores.causal:
        d = i - mean_j
    else:
        before = scores_statistics(scores.restricted(None, 0), rows=st.rows,
                                   key_features=torch.arange(scores.shape[3],
                                                             dtype=torch.float32)[:, None])
        p_le = _share(before, st)  # weight on keys j <= i
        m_le = p_le * before.expected[..., 0]  # sum over j <= i of p_ij j
        d = i * p_le - m_le + (mean_j - m_le) - i * (1 - p_le)
    return torch.where(st.keys > 0, d, torch.zeros_like(d))
