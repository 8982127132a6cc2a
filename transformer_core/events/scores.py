"""What a softmax attention's logits are, so that they can be read by rows, not as a matrix.

An emitter whose attention is exactly ``softmax(logits)`` describes those logits as a
:class:`SoftmaxScores`: queries, keys (fewer key heads under grouped-query attention),
the scale, a soft cap, a diagonal band (causal, sliding windows), boolean masks and an
additive bias. Readers (:mod:`.statistics`) then compute any block of query rows, or
hand the description to a fused kernel, without the L x S matrix.

>>> q, k = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 1, 3)  # 2 query heads, 1 key head
>>> scores = SoftmaxScores(q, k, scale=0.5, band=(None, 0))   # causal
>>> scores.shape, scores.logits(slice(None), [1], torch.tensor([1, 3])).shape
((1, 2, 4, 4), torch.Size([1, 1, 2, 4]))
>>> scores.logits(slice(None), [0], torch.tensor([1]))[0, 0, 0, 2:].tolist()
[-inf, -inf]

Shape legend: N batch, L queries, S keys, H query heads, K key heads (H % K == 0),
E query/key dimension per head, R query rows, C key columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

Band = tuple[int | None, int | None]


@dataclass(frozen=True)
class SoftmaxScores:
    """``logits[n, h, i, j]`` of a softmax attention, defined for any rows and columns:

    * ``scale * queries[n, i, h] . keys[n, j, h // (H // K)]``,
    * capped as ``softcap * tanh(x / softcap)`` when ``softcap`` is set (Gemma-style),
    * plus ``bias[n, h, i, j]`` when given (float, broadcastable to (N, H, L, S), e.g. an
      ALiBi or T5 position bias; ``-inf`` or the dtype's lowest value masks a key),
    * ``-inf`` where a ``masks`` entry (bool, broadcastable to (N, H, L, S), True: may
      attend) forbids it, or where ``j - i`` falls outside ``band`` = (lo, hi), inclusive,
      None for no bound: ``(None, 0)`` is the top-left causal pattern the fused kernels
      apply, ``(-w, 0)`` a causal sliding window of w + 1 keys.

    Masks and biases may be longer than S in their last dimension (a cache's
    capacity); only their first S columns count.
    """

    queries: torch.Tensor  # (N, L, H, E)
    keys: torch.Tensor  # (N, S, K, E)
    scale: float
    band: Band = (None, None)
    masks: tuple[torch.Tensor, ...] = field(default=())
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.queries.ndim != 4 or self.keys.ndim != 4:
            raise ValueError(f"queries (N, L, H, E) and keys (N, S, K, E): got shapes "
                             f"{tuple(self.queries.shape)} and {tuple(self.keys.shape)}")
        H, K = self.queries.shape[2], self.keys.shape[2]
        if H % K:
            raise ValueError(f"keys: {K} key heads do not divide {H} query heads")
        for name, t in [*(("masks", m) for m in self.masks), ("bias", self.bias)]:
            if t is not None and t.ndim != 4:
                raise ValueError(f"{name}: expected 4 dimensions broadcastable to "
                                 f"(N, H, L, S), got shape {tuple(t.shape)}")
        if any(m.dtype != torch.bool for m in self.masks):
            raise ValueError("masks: expected bool tensors (True: may attend); pass a float "
                             "mask as bias")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, H, L, S)."""
        N, L, H, _ = self.queries.shape
        return (N, H, L, self.keys.shape[1])

    @property
    def causal(self) -> bool:
        """Whether every query sees only keys j <= i (the band's upper bound is <= 0)."""
        return self.band[1] is not None and self.band[1] <= 0

    @cached_property
    def bias_masks_only(self) -> bool:
        """Whether the bias only masks (every entry 0, -inf or the dtype's lowest value): it
        then adds nothing to a visible logit, and a fused kernel may take it as a mask.
        Checked once, in slices of rows (no second (L, S) tensor)."""
        bias = self.bias
        if bias is None:
            return True
        low = torch.finfo(bias.dtype).min
        step = max(1, (1 << 22) // max(1, bias[0, 0, 0].numel()))
        flat = bias.flatten(0, 1)  # (N|1 * H|1, L|1, S')
        return all(bool(((b == 0) | (b <= low)).all()) for b in flat.split(step, dim=1))

    def restricted(self, lo: int | None, hi: int | None) -> SoftmaxScores:
        """These scores with the band narrowed to ``lo <= j - i <= hi`` as well.

        >>> s = SoftmaxScores(torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2), 1.0, (-2, None))
        >>> s.restricted(None, 0).band
        (-2, 0)
        """
        a, b = self.band
        lo = a if lo is None else lo if a is None else max(a, lo)
        hi = b if hi is None else hi if b is None else min(b, hi)
        return replace(self, band=(lo, hi))

    # -- rows and columns ------------------------------------------------------------

    def head_index(self, heads: Any) -> torch.Tensor:
        """The query heads ``heads`` selects, as a 1-D LongTensor (h,)."""
        H = self.queries.shape[2]
        return torch.arange(H, device=self.queries.device)[heads].reshape(-1)

    def selected(self, samples: Any, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (n, h, L, E) and keys (n, h, S, E) of ``samples`` and query heads
        ``heads`` (h,): each query head paired with its key head."""
        H, K = self.queries.shape[2], self.keys.shape[2]
        every = len(heads) == H and bool((heads == torch.arange(H, device=heads.device)).all())
        q = self.queries[samples]  # (n, L, H, E): a view for a slice of samples
        q = q if every else q[:, :, heads]  # (n, L, h, E)
        k = self.keys[samples]
        k = k if every and K == H else k[:, :, heads // (H // K)]  # (n, S, h, E)
        return q.transpose(1, 2), k.transpose(1, 2)

    def visible(self, samples: Any, heads: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor, pairs: bool = False) -> torch.Tensor | None:
        """(n|1, h|1, R, C) bool: which of ``cols`` each of ``rows`` may see (band, masks,
        a masking bias); None when every key is visible. With ``pairs``, ``rows`` and
        ``cols`` are (R,) each and row r is asked about column ``cols[r]`` alone:
        (n|1, h|1, R)."""
        out = None
        lo, hi = self.band
        if lo is not None or hi is not None:
            r, c = (rows, cols) if pairs else (rows[:, None], cols[None, :])  # (R,) | (R, C)
            ok = c <= r + hi if hi is not None else None  # j - i <= hi
            if lo is not None:
                ok = c >= r + lo if ok is None else ok & (c >= r + lo)
            out = ok[None, None]  # (1, 1, R) | (1, 1, R, C)
        for m in self.masks:
            part = _rows_cols(m, samples, heads, rows, cols, pairs)  # (n|1, h|1, R[, C])
            out = part if out is None else out & part
        if self.bias is not None:
            part = _rows_cols(self.bias, samples, heads, rows, cols, pairs) > \
                torch.finfo(self.bias.dtype).min
            out = part if out is None else out & part
        return out

    def logits(self, samples: Any, heads: Any, rows: torch.Tensor,
               cols: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (n, h, R, C) of ``rows`` (R,) against ``cols`` (C,; None: all S keys),
        invisible keys at ``-inf``."""
        head_idx = self.head_index(heads)
        q, k = self.selected(samples, head_idx)  # (n, h, L, E), (n, h, S, E)
        if cols is None:
            cols = torch.arange(k.shape[2], device=k.device)
        logits = torch.matmul(q[:, :, rows].float(), k[:, :, cols].float().transpose(-1, -2))
        return self.finish(logits * self.scale, samples, head_idx, rows, cols)  # (n, h, R, C)

    def finish(self, logits: torch.Tensor, samples: Any, heads: torch.Tensor,
               rows: torch.Tensor, cols: torch.Tensor, pairs: bool = False,
               inplace: bool = False) -> torch.Tensor:
        """Scaled dot products (n, h, R, C) -> logits: the cap, the bias, and ``-inf`` at
        invisible keys. With ``pairs``: (n, h, R) dot products of row r with ``cols[r]``.
        ``inplace``: ``logits`` may be overwritten (a block the caller owns)."""
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.bias is not None:
            logits = logits + _rows_cols(self.bias, samples, heads, rows, cols, pairs).float()
        allowed = self.visible(samples, heads, rows, cols, pairs)
        if allowed is None:
            return logits
        if inplace:
            return logits.masked_fill_(allowed.logical_not(), float("-inf"))
        return logits.masked_fill(allowed.logical_not(), float("-inf"))

    def pair_logits(self, samples: Any, heads: Any, rows: torch.Tensor,
                    cols: torch.Tensor) -> torch.Tensor:
        """The logit (n, h, R) of each of ``rows`` (R,) at its own key ``cols`` (R,), from
        one dot product per row; ``cols`` must be in range."""
        head_idx = self.head_index(heads)
        q, k = self.selected(samples, head_idx)  # (n, h, L, E), (n, h, S, E)
        dots = (q[:, :, rows].float() * k[:, :, cols].float()).sum(-1)  # (n, h, R)
        return self.finish(dots * self.scale, samples, head_idx, rows, cols, pairs=True)


def _rows_cols(t: torch.Tensor, samples: Any, heads: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    """A (N|1, H|1, L|1, S') tensor at ``samples``, ``heads``, ``rows`` and ``cols``:
    (n|1, h|1, R, C), broadcast dimensions kept at 1; with ``pairs``, at (rows[r],
    cols[r]): (n|1, h|1, R)."""
    if t.shape[0] > 1:
        t = t[samples]
    if t.shape[1] > 1:
        t = t[:, heads.to(t.device)]
    rows, cols = rows.to(t.device), cols.to(t.device)
    if pairs:
        return t[:, :, rows if t.shape[2] > 1 else torch.zeros_like(rows), cols]
    t = t[:, :, rows] if t.shape[2] > 1 else t.expand(-1, -1, len(rows), -1)
    return t[..., cols]
