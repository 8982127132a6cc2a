"""Head statistics of an attention event without its L x S matrix.

:func:`event_statistics` gives the rows of :func:`~.reduce.layer_statistics`
(``STAT_NAMES + PATTERN_NAMES``) for every sample and head of an event, at any sequence
length (docs/statistics.md). Two ways:

* ``rows``: each statistic is the mean over a set of query rows, every one of them exact:
  all rows up to ``max_rows``, else ``max_rows`` rows spread evenly over the sequence
  (the first and the last among them). Their values come from
  :mod:`transformer_core.events.statistics` without the matrix: fused kernels (a row's
  entropy from its log-sum-exp and the attention output with the keys as values; the max
  logit, the band around the diagonal and single keys in further passes), or exact blocks
  of rows where no fused kernel applies (soft caps, biases). Memory O((L + S) E) plus
  blocks of O(B S).
* ``matrix``: the attention matrix of each sample, all rows (:func:`~.reduce.layer_statistics`).

``auto`` takes ``matrix`` while one sample's matrix holds at most :data:`MATRIX_UP_TO`
values (cheaper there: a few large operations), ``rows`` above. Attentions that do not
describe their logits (linear, clustered...) always take ``matrix``.

>>> from transformer_core.instrument.lazy import SDPACall, sdpa_event
>>> q = torch.zeros(1, 1, 4, 2)                                 # uniform causal attention
>>> ev = sdpa_event(None, SDPACall.of(q, q, is_causal=True))
>>> [round(v, 3) for v in event_statistics(ev)[0, :, 0].tolist()]  # STAT_NAMES + PATTERN_NAMES
[0.75, 0.521, 0.521, 0.0, 0.0, 1.0, 0.361, 0.361, 0.917, 0.361, 1.0]
>>> bool(torch.allclose(event_statistics(ev, method="rows"), event_statistics(ev), atol=1e-6))
True

Shape legend: N samples, H heads, L queries, S keys, R query rows computed, B rows per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transformer_core.events import AttentionEvent, SoftmaxScores, spread_rows
from transformer_core.events.statistics import RowStatistics, scores_statistics, weights_at

from .reduce import layer_statistics, local_window
from .stats import MaskInfo, valid_key_counts

# Query rows per head for the per-step statistics of long sequences: 128 rows spread over
# the sequence, every one exact. 12 layers x 12 heads at L=8192 then cost ~2 % of a
# training step on 2 CPU cores (256 rows: 3.7-6 %; bench/RESULTS.md "statistics"), so the
# cost budget can keep them at every step.
STATS_ROWS = 128
# ``auto`` computes the matrix while one sample's holds at most 4M values (12 heads at
# L = S = 590): there a few large operations cost less than the rows' passes; above, the
# rows, whose cost grows with S only (bench/entropy.py, on 2 CPU cores: 12 heads at
# L=512 0.13 CPU-s with the matrix, 0.37 with rows; at 2048 1.5 and 0.16).
MATRIX_UP_TO = 1 << 22
METHODS = ("auto", "rows", "matrix")


@dataclass
class RowValues:
    """Per sample, head and computed row (N, H, R): what the statistics average."""

    entropy: torch.Tensor  # normalised: over log(visible keys); 0 with at most one key
    max_weight: torch.Tensor
    first: torch.Tensor  # weight on key 0
    nan: torch.Tensor  # 1 where the row's entropy is NaN
    inf: torch.Tensor  # 1 where one of the row's logits is infinite
    keys: torch.Tensor  # visible keys
    previous: torch.Tensor | None = None  # weight on key i - 1 (None: L != S)
    diagonal: torch.Tensor | None = None  # weight on key i
    local: torch.Tensor | None = None  # weight within local_window(S) of i
    distance: torch.Tensor | None = None  # mean |i - j|


def event_statistics(event: AttentionEvent, max_rows: int | None = STATS_ROWS,
                     method: str = "auto") -> torch.Tensor:
    """Statistics (N, 11, H) float32 of every sample of ``event``, on the event's device,
    in ``STAT_NAMES + PATTERN_NAMES`` order: over at most ``max_rows`` query rows (None or
    0: all) with ``rows``, over all rows with ``matrix``.

    With ``rows``, ``nan`` and ``inf`` count query rows (a NaN entropy, an infinite
    logit), not weights as the matrix does.
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    scores = event.scores
    N, H, L, S = event.shape
    if method == "auto":
        method = "rows" if scores is not None and H * L * S > MATRIX_UP_TO else "matrix"
    if method == "matrix" or scores is None:
        masks = MaskInfo.of(event)
        with torch.no_grad():
            return torch.stack([layer_statistics(event.attention(n),
                                                 valid_key_counts(masks, n, L, S, True))
                                for n in range(N)])
    rows = spread_rows(L, max_rows)
    with torch.no_grad():
        values = _row_values(scores, rows)
        return _aggregate(values, rows.to(values.entropy.device), L, S)


def _aggregate(v: RowValues, rows: torch.Tensor, L: int, S: int) -> torch.Tensor:
    """The 11 statistics (N, 11, H) of per-row values: means over the rows (the pattern
    scores over rows i >= 1: row 0 of a causal head has one key)."""
    head = torch.stack([v.entropy.mean(-1), v.max_weight.mean(-1), v.first.mean(-1),
                        v.nan.sum(-1), v.inf.sum(-1)], 1)  # (N, 5, H)
    many = v.keys > 1
    uniform = torch.where(many.any(-1), (v.entropy * many).sum(-1) / many.sum(-1).clamp_min(1),
                          torch.full_like(v.entropy[..., 0], float("nan")))  # (N, H)
    nan = torch.full_like(uniform, float("nan"))
    later = rows >= 1
    if L < 2 or not bool(later.any()):
        patterns = [nan, nan, nan, nan, nan, uniform]
    elif L != S or v.previous is None:
        patterns = [nan, nan, nan, nan, v.first[..., later].mean(-1), uniform]
    else:
        patterns = [x[..., later].mean(-1) for x in (v.distance, v.previous, v.diagonal,
                                                     v.local, v.first)] + [uniform]
    return torch.cat([head, torch.stack(patterns, 1)], 1)  # (N, 11, H)


def _row_values(scores: SoftmaxScores, rows: torch.Tensor) -> RowValues:
    N, H, L, S = scores.shape
    positions = torch.arange(S, dtype=torch.float32)[:, None]  # (S, 1)
    st = scores_statistics(scores, rows=rows, max_logit=True, key_features=positions)
    i = rows.to(st.entropy.device).float()  # (R,)
    first = weights_at(scores, st, torch.zeros_like(rows))  # (N, H, R)
    bad_logit = (st.max_logit.isinf() | st.logsumexp.isposinf()) & (st.keys > 0)
    values = RowValues(st.normalised_entropy(), st.max_weight, first,
                       st.entropy.isnan().float(), bad_logit.float(), st.keys)
    if L == S and L > 1:
        values.previous = weights_at(scores, st, rows - 1)  # key i - 1
        values.diagonal = weights_at(scores, st, rows)  # key i
        w = local_window(S)
        values.local = _share(scores_statistics(scores.restricted(-w, w), rows=rows), st)
        values.distance = _distance(scores, st, i)
    return values


def _share(part: RowStatistics, whole: RowStatistics) -> torch.Tensor:
    """The weight (N, H, R) a row puts on the keys of ``part`` (a narrower band of the same
    logits): exp(its log-sum-exp - the whole row's); 0 where either has no key."""
    share = torch.exp(part.logsumexp - whole.logsumexp.masked_fill(whole.keys == 0, 0.0))
    return torch.where((part.keys > 0) & (whole.keys > 0), share, torch.zeros_like(share))


def _distance(scores: SoftmaxScores, st: RowStatistics, i: torch.Tensor) -> torch.Tensor:
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
