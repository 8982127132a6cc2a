"""Per-query statistics of an attention, computed without its L x S matrix.

For query i with logits s_ij and weights p_ij = softmax_j(s_ij), the entropy is
``H_i = lse_i - sum_j p_ij s_ij``. Where s_ij = scale q_i . k_j (masked keys at -inf),
``sum_j p_ij s_ij = scale q_i . o_i`` with ``o_i = sum_j p_ij k_j``: the output of the
same attention with the keys as values. A fused kernel returns ``o`` and the
log-sum-exp together, so :func:`row_statistics` needs O((L + S) E) memory, never
O(L S). Three methods (docs/statistics.md says what each costs):

* ``fused``: the fused kernel with the keys as values (CPU:
  ``_scaled_dot_product_flash_attention_for_cpu``; CUDA: the memory-efficient kernel,
  in float32). Needs :class:`~.scores.SoftmaxScores` without a soft cap or a bias
  that adds to visible logits. All rows in one call when nothing but a top-left
  causal pattern masks them; otherwise blocks of rows with a float mask of (B, S).
* ``blocks``: exact logits of blocks of B query rows, O(B S) memory: soft caps, biases.
* ``matrix``: attentions whose matrix is not softmax(q k^T) (linear, clustered,
  reformer, top-k, AFT): from ``event.logits`` and ``event.attention``, one sample at
  a time, O(h L S) memory; what they apply is that matrix, so that is what is measured.

Rows: ``rows`` picks query rows (all by default); each picked row is exact, and the
cost scales with their number (:func:`spread_rows`).

>>> q, k = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4)
>>> scores = SoftmaxScores(q, k, scale=0.5, band=(None, 0))
>>> st = scores_statistics(scores)
>>> p = torch.softmax(scores.logits(slice(None), slice(None), torch.arange(6)), -1)
>>> bool(torch.allclose(st.entropy, -torch.xlogy(p, p).sum(-1), atol=1e-5))
True
>>> st.method, st.keys[0, 0].tolist()
('fused', [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])

Shape legend: N batch, n selected samples, L queries, S keys, H heads, h selected heads,
E query/key dimension, R query rows computed, B rows per block, F key features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .scores import SoftmaxScores

if TYPE_CHECKING:  # pragma: no cover
    from .event import AttentionEvent, Index

logger = logging.getLogger(__name__)

METHODS = ("auto", "fused", "blocks", "matrix")
# Logits (or mask entries) held per block of rows: 16 MiB of float32, which keeps a
# block well inside a CPU's caches' reach and 12 heads x 8192 keys at 42 rows a block.
BLOCK_ELEMENTS = 1 << 22


class StatisticsError(ValueError):
    """A statistics method that cannot apply to this attention (the message says which
    method can)."""


@dataclass(frozen=True)
class RowStatistics:
    """Statistics of query ``rows`` (R,) per selected sample and head, each (n, h, R):

    * ``entropy``: of the row's weights, in nats (0 for a row with no visible key);
    * ``logsumexp``: of the row's logits (-inf for a row with no visible key);
    * ``keys``: how many keys the row may see (float);
    * ``max_logit``: the largest logit, or None when not asked for (``max_logit=True``);
    * ``expected``: (n, h, R, F) the weighted mean of each key feature asked for
      (``key_features``), or None;
    * ``method``: ``fused``, ``blocks`` or ``matrix``.
    """

    rows: torch.Tensor
    entropy: torch.Tensor
    logsumexp: torch.Tensor
    keys: torch.Tensor
    max_logit: torch.Tensor | None
    expected: torch.Tensor | None
    method: str

    @property
    def max_weight(self) -> torch.Tensor:
        """The largest weight of each row (n, h, R) = exp(max logit - log-sum-exp); 0 for
        a row with no visible key."""
        if self.max_logit is None:
            raise StatisticsError("max_weight: computed with max_logit=True only")
        w = torch.exp(self.max_logit - self.logsumexp)
        return torch.where(self.keys > 0, w, torch.zeros_like(w))

    def normalised_entropy(self) -> torch.Tensor:
        """Entropy over log(visible keys) (n, h, R): 0 one-hot, 1 uniform; rows with at most
        one visible key are 0."""
        many = self.keys > 1
        return torch.where(many, self.entropy / self.keys.clamp_min(2).log(),
                           torch.zeros_like(self.entropy))


def spread_rows(length: int, count: int | None, device: Any = None) -> torch.Tensor:
    """``count`` query rows spread evenly over ``length`` (the first and the last among
    them); all rows when ``count`` is None, 0 or at least ``length``.

    >>> spread_rows(10, 4).tolist(), spread_rows(3, 8).tolist()
    ([0, 3, 6, 9], [0, 1, 2])
    """
    if not count or count >= length:
        return torch.arange(length, device=device)
    if count < 1:
        raise ValueError(f"count: expected a positive number of rows, got {count}")
    return torch.linspace(0, length - 1, count, device=device).round().long().unique()


def row_statistics(event: AttentionEvent, sample: Index = None, heads: Index = None,
                   rows: torch.Tensor | None = None, *, method: str = "auto",
                   max_logit: bool = False, key_features: torch.Tensor | None = None,
                   block_elements: int = BLOCK_ELEMENTS) -> RowStatistics:
    """:class:`RowStatistics` of ``event`` for ``sample`` and ``heads`` (an int, list,
    slice or None, as :meth:`~.event.AttentionEvent.attention` takes them; every
    dimension is kept) and query ``rows`` (R,) (None: all L), under ``torch.no_grad``.

    ``method`` ``auto`` takes ``fused`` where the emitter describes its logits
    (``event.scores``) and a fused kernel applies, else ``blocks`` where it describes
    them, else ``matrix``. ``max_logit=True`` adds the exact max logit per row (on the
    fused path one more pass over the logits, in blocks of rows); ``key_features``
    (S, F) adds their weighted mean per row (``expected``).
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    from .event import _as_indexer  # the event's own index rules

    samples, _ = _as_indexer(sample, event.shape[0], "sample")
    scores = event.scores
    if scores is None:
        if method in ("fused", "blocks"):
            raise StatisticsError(
                f"method={method!r}: a {event.attention_type!r} attention does not describe "
                "its logits as softmax(q k^T) (event.scores is None); use method='matrix'")
        return _matrix_statistics(event, samples, heads, rows, max_logit, key_features)
    if method == "matrix":
        return _matrix_statistics(event, samples, heads, rows, max_logit, key_features)
    return scores_statistics(scores, samples, heads, rows, method=method,
                             max_logit=max_logit, key_features=key_features,
                             block_elements=block_elements)


def scores_statistics(scores: SoftmaxScores, samples: Any = slice(None), heads: Any = None,
                      rows: torch.Tensor | None = None, *, method: str = "auto",
                      max_logit: bool = False, key_features: torch.Tensor | None = None,
                      block_elements: int = BLOCK_ELEMENTS) -> RowStatistics:
    """:func:`row_statistics` of a :class:`~.scores.SoftmaxScores` (``samples`` a slice
    or 1-D LongTensor; ``heads`` anything that indexes a 1-D tensor; None: all)."""
    N, H, L, S = scores.shape
    head_idx = scores.head_index(slice(None) if heads is None else heads)
    rows = torch.arange(L) if rows is None else torch.as_tensor(rows).long().reshape(-1)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= L):
        raise IndexError(f"rows: {rows.tolist()[:8]}... out of range for {L} queries")
    fusable = scores.softcap is None and scores.bias_masks_only
    if method == "fused" and not fusable:
        why = "a soft cap" if scores.softcap is not None else "a bias added to visible logits"
        raise StatisticsError(f"method='fused': these logits have {why}, which no fused "
                              "kernel takes; use method='blocks' (exact, O(B S) memory)")
    if method == "matrix":
        raise StatisticsError("method='matrix' needs the event (row_statistics)")
    with torch.no_grad():
        if fusable and method in ("auto", "fused"):
            try:
                return _fused(scores, samples, head_idx, rows, max_logit, key_features,
                              block_elements)
            except RuntimeError:
                if method == "fused" or scores.queries.device.type == "cpu":
                    raise
                # A device kernel that refuses these shapes (head size, alignment):
                # the exact block path gives the same values.
                logger.debug("fused statistics kernel refused %s; computing in blocks",
                             tuple(scores.queries.shape), exc_info=True)
        return _blocks(scores, samples, head_idx, rows, max_logit, key_features,
                       block_elements)


# -- fused -------------------------------------------------------------------------------


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (n, h, B, E') and log-sum-exp (n, h, B) of softmax(scale q k^T + mask) v."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, 0.0, causal, scale=scale)[:2]
        return out, lse[..., : q.shape[-2]]  # the kernel pads rows to a multiple of 32
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _fused(scores: SoftmaxScores, samples: Any, heads: torch.Tensor, rows: torch.Tensor,
           max_logit: bool, key_features: torch.Tensor | None,
           block_elements: int) -> RowStatistics:
    q, kq = scores.selected(samples, heads)  # (n, h, L, E), (n, h, S, E)
    q, kq = q.float(), kq.float()
    n, h, L, E = q.shape
    S = kq.shape[2]
    k = v = kq
    if key_features is not None:  # appended as value columns; q and k padded with zeros
        f = key_features.to(k.device, torch.float32).reshape(S, -1)
        F = f.shape[1]
        v = torch.cat([kq, f.expand(n, h, S, F)], -1)  # (n, h, S, E + F)
        k = torch.cat([kq, kq.new_zeros(n, h, S, F)], -1)  # (n, h, S, E + F)
    whole = len(rows) == L and bool((rows == torch.arange(L)).all())
    simple = not scores.masks and scores.bias is None  # a band at most: counted, not summed
    outs, lses, counts = [], [], []
    if whole and simple and scores.band in ((None, None), (None, 0)):  # one call, no mask
        qe = q if key_features is None else _padded(q, v.shape[-1])
        out, lse = _kernel(qe, k, v, None, scores.band == (None, 0), scores.scale)
        outs, lses = [out], [lse]
        i = torch.arange(L, device=q.device)
        counts = [(i + 1).clamp(max=S).float().expand(n, h, L) if scores.causal
                  else torch.full((n, h, L), float(S), device=q.device)]
    else:
        for block in row_blocks(scores, rows, S, block_elements):
            r = block.to(q.device)
            c0, c1 = _columns(scores, block, S)
            cols = torch.arange(c0, c1, device=q.device)
            visible = scores.visible(samples, heads, r, cols)  # (n|1, h|1, B, C) or None
            mask = None if visible is None else _float_mask(visible, q.is_cuda)
            qe = q[:, :, r] if key_features is None else _padded(q[:, :, r], v.shape[-1])
            out, lse = _kernel(qe, k[:, :, c0:c1], v[:, :, c0:c1], mask, False, scores.scale)
            outs.append(out)
            lses.append(lse)
            counts.append(_band_counts(scores, r, c0, c1).expand(n, h, -1) if simple
                          else visible.sum(-1).float().expand(n, h, -1))
    out, lse, keys = torch.cat(outs, 2), torch.cat(lses, 2), torch.cat(counts, 2)  # (n, h, R..)
    qr = q[:, :, rows.to(q.device)]  # (n, h, R, E)
    mean_logit = scores.scale * (qr * out[..., :E]).sum(-1)  # sum_j p_ij s_ij  (n, h, R)
    empty = keys == 0
    # lse - mean logit cancels for a near one-hot row: rounding may leave -1e-6, not 0
    entropy = torch.where(empty, torch.zeros_like(lse), (lse - mean_logit).clamp_min(0.0))
    lse = lse.masked_fill(empty, float("-inf"))  # the kernel gives 0 for an empty row
    expected = None if key_features is None else out[..., E:]
    top = None
    if max_logit:
        top = _over_blocks(scores, samples, heads, rows, q, kq, block_elements,
                           lambda logits: logits.amax(-1))
    return RowStatistics(rows, entropy, lse, keys, top, expected, "fused")


def _padded(q: torch.Tensor, width: int) -> torch.Tensor:
    """``q`` (n, h, B, E) with zero columns up to ``width`` (for appended key features)."""
    return torch.cat([q, q.new_zeros(*q.shape[:-1], width - q.shape[-1])], -1)


def _band_counts(scores: SoftmaxScores, rows: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Keys (R,) float each row sees among columns c0:c1 under the band alone."""
    lo, hi = scores.band
    first = torch.full_like(rows, c0) if lo is None else (rows + lo).clamp(min=c0)
    last = torch.full_like(rows, c1 - 1) if hi is None else (rows + hi).clamp(max=c1 - 1)
    return (last - first + 1).clamp(min=0).float()


def _float_mask(visible: torch.Tensor, aligned: bool) -> torch.Tensor:
    """(n|1, h|1, B, C) bool -> float32 0 / -inf; on CUDA in memory whose rows start at a
    multiple of 16 elements, as the memory-efficient kernel requires of a bias."""
    if not aligned:
        return torch.where(visible, 0.0, float("-inf"))
    C = visible.shape[-1]
    padded = torch.zeros(*visible.shape[:-1], -(-C // 16) * 16, device=visible.device)
    out = padded[..., :C]
    return out.masked_fill_(~visible, float("-inf"))


def block_logits(scores: SoftmaxScores, samples: Any, heads: torch.Tensor, q: torch.Tensor,
                  k: torch.Tensor, rows: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Exact logits (n, h, B, C) of ``rows`` against keys ``c0:c1``, from q (n, h, L, E) and
    k (n, h, S, E) float32, selected already."""
    r = rows.to(q.device)
    dots = torch.matmul(q[:, :, r] * scores.scale, k[:, :, c0:c1].transpose(-1, -2))
    return scores.finish(dots, samples, heads, r, torch.arange(c0, c1, device=q.device),
                         inplace=True)


def _over_blocks(scores: SoftmaxScores, samples: Any, heads: torch.Tensor, rows: torch.Tensor,
                 q: torch.Tensor, k: torch.Tensor, block_elements: int, reduce) -> torch.Tensor:
    """``reduce(logits)`` (n, h, B) of each block of ``rows``' exact logits, joined."""
    S = k.shape[2]
    out = []
    for block in row_blocks(scores, rows, q.shape[0] * q.shape[1] * S, block_elements):
        out.append(reduce(block_logits(scores, samples, heads, q, k, block,
                                        *_columns(scores, block, S))))
    return torch.cat(out, 2)


# -- blocks ------------------------------------------------------------------------------


def _blocks(scores: SoftmaxScores, samples: Any, heads: torch.Tensor, rows: torch.Tensor,
            max_logit: bool, key_features: torch.Tensor | None,
            block_elements: int) -> RowStatistics:
    q, k = scores.selected(samples, heads)  # (n, h, L, E), (n, h, S, E)
    q, k = q.float(), k.float()
    S = k.shape[2]
    features = None if key_features is None else \
        key_features.to(q.device, torch.float32).reshape(S, -1)
    parts: dict[str, list[torch.Tensor]] = {"entropy": [], "lse": [], "keys": [], "max": [],
                                            "expected": []}
    for block in row_blocks(scores, rows, q.shape[0] * q.shape[1] * S, block_elements):
        c0, c1 = _columns(scores, block, S)
        logits = block_logits(scores, samples, heads, q, k, block, c0, c1)  # (n, h, B, C)
        _reduce_rows(logits, None, parts, None if features is None else features[c0:c1])
    return _collect(rows, parts, max_logit, key_features is not None, "blocks")


def _reduce_rows(logits: torch.Tensor, p: torch.Tensor | None, parts: dict[str, list],
                 features: torch.Tensor | None) -> None:
    """Statistics of rows of ``logits`` (n, h, B, C) (and their weights ``p``, when the
    attention gives its own) appended to ``parts``."""
    keys = (~torch.isneginf(logits)).sum(-1).float()  # (n, h, B)
    empty = keys == 0
    lse = torch.logsumexp(logits, -1)  # (n, h, B); -inf for an empty row
    if p is None:
        p = torch.exp(logits - lse.masked_fill(empty, 0.0)[..., None])  # (n, h, B, C)
        plogit = torch.where(p > 0, p * logits, torch.zeros_like(p)).sum(-1)
        entropy = (lse - plogit).clamp_min(0.0)  # rounding on a near one-hot row
    else:
        entropy = -torch.xlogy(p, p).sum(-1)
    parts["entropy"].append(torch.where(empty, torch.zeros_like(entropy), entropy))
    parts["lse"].append(lse)
    parts["keys"].append(keys)
    parts["max"].append(logits.amax(-1))
    if features is not None:
        parts["expected"].append(torch.matmul(p, features))  # (n, h, B, F)


def _collect(rows: torch.Tensor, parts: dict[str, list], max_logit: bool, expected: bool,
             method: str) -> RowStatistics:
    return RowStatistics(rows, torch.cat(parts["entropy"], 2), torch.cat(parts["lse"], 2),
                         torch.cat(parts["keys"], 2),
                         torch.cat(parts["max"], 2) if max_logit else None,
                         torch.cat(parts["expected"], 2) if expected else None, method)


def row_blocks(scores: SoftmaxScores, rows: torch.Tensor, per_row: int,
                block_elements: int) -> list[torch.Tensor]:
    """``rows`` in blocks of about ``block_elements / per_row`` rows. Under a band of
    width W (both ends bounded), blocks span about W positions (at least 16 rows: fewer
    calls), so that each sees about 2 W keys, not all S; under a causal band, blocks of
    at most 32 rows, so that early rows do not carry the keys only late rows see."""
    size = max(1, block_elements // max(1, per_row))
    lo, hi = scores.band
    if hi is not None and len(rows) > 1:
        stride = max(1.0, float(rows.max() - rows.min()) / (len(rows) - 1))
        width = (hi - lo + 1) / stride if lo is not None else 32
        size = min(size, max(16, int(width)))
    return list(rows.split(size)) if len(rows) else [rows]


def _columns(scores: SoftmaxScores, block: torch.Tensor, S: int) -> tuple[int, int]:
    """The key columns [start, stop) a block of rows can see at all: those the band allows
    the block's first and last rows (all S without a band)."""
    lo, hi = scores.band
    first = 0 if lo is None or not len(block) else max(0, int(block.min()) + lo)
    last = S - 1 if hi is None or not len(block) else min(S - 1, int(block.max()) + hi)
    if last < first:  # no key in reach: one column, invisible to every row of the block
        first = min(first, max(S - 1, 0))
        return first, first + 1
    return first, last + 1


# -- matrix ------------------------------------------------------------------------------


def _matrix_statistics(event: AttentionEvent, samples: Any, heads: Index,
                       rows: torch.Tensor | None, max_logit: bool,
                       key_features: torch.Tensor | None) -> RowStatistics:
    """From the event's own matrix and logits, one sample at a time: (h, L, S) each."""
    N, H, L, S = event.shape
    rows = torch.arange(L) if rows is None else torch.as_tensor(rows).long().reshape(-1)
    parts: dict[str, list[torch.Tensor]] = {"entropy": [], "lse": [], "keys": [], "max": [],
                                            "expected": []}
    per_sample: list[dict[str, list]] = []
    with torch.no_grad():
        for s in torch.arange(N)[samples].reshape(-1).tolist():
            p = event.attention(s, heads).float()  # (h, L, S) or (L, S) for one head
            logits = event.logits(s, heads).float()
            if p.ndim == 2:
                p, logits = p[None], logits[None]
            one: dict[str, list] = {k: [] for k in parts}
            features = None if key_features is None else \
                key_features.to(p.device, torch.float32).reshape(S, -1)
            _reduce_rows(logits[None][:, :, rows.to(p.device)], p[None][:, :, rows.to(p.device)],
                         one, features)
            per_sample.append(one)
    if not per_sample:
        raise IndexError("sample: selects no sample")
    for name in parts:
        if per_sample[0][name]:
            parts[name] = [torch.cat([one[name][0] for one in per_sample])]
    return _collect(rows, parts, max_logit, key_features is not None, "matrix")


def weights_at(scores: SoftmaxScores, stats: RowStatistics, cols: torch.Tensor,
               samples: Any = slice(None), heads: Any = None) -> torch.Tensor:
    """The weight p_{i, c_i} (n, h, R) each of ``stats.rows`` gives one key ``cols`` (R,)
    (e.g. key 0, key i - 1, key i): exp(logit - log-sum-exp), from one dot product per
    row; 0 where that key is out of range or invisible. ``samples`` and ``heads`` as
    ``stats`` was computed with.

    >>> s = SoftmaxScores(torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4), 0.5, (None, 0))
    >>> st = scores_statistics(s)
    >>> w = weights_at(s, st, st.rows)  # the diagonal
    >>> p = torch.softmax(s.logits(slice(None), None, torch.arange(5)), -1)[0, 0]
    >>> bool(torch.allclose(w[0, 0], p.diagonal(), atol=1e-6))
    True
    """
    S = scores.shape[3]
    rows = stats.rows
    cols = torch.as_tensor(cols).long().reshape(-1).to(rows.device)  # (R,)
    inside = (cols >= 0) & (cols < S)
    with torch.no_grad():
        logit = scores.pair_logits(samples, slice(None) if heads is None else heads, rows,
                                   cols.clamp(0, max(S - 1, 0)))  # (n, h, R)
    lse = stats.logsumexp.to(logit.device)
    w = torch.exp(logit - lse.masked_fill(stats.keys.to(lse.device) == 0, 0.0))
    ok = inside.to(w.device) & torch.isfinite(logit)
    return torch.where(ok, w, torch.zeros_like(w))
