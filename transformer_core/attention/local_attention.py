"""Local (banded) softmax attention: each query sees a window of nearby keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention_registry import (
    AttentionRegistry,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
)
from ..masking import BaseMask, FullMask
from .full_attention import FullAttention


def band_mask(L: int, S: int, local_context: int, device=None) -> torch.Tensor:
    """(L, S) bool: key j is visible from query i when i - w//2 <= j < i - w//2 + w."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    start = i - local_context // 2
    return (j >= start) & (j < start + local_context)


class LocalAttention(FullAttention):
    """Softmax attention restricted to ``local_context`` keys around each query.

    The band is combined with any ``attn_mask`` and ``key_lengths``; the
    dispatched matrix is zero outside the band.
    """

    attention_type = "local"

    def __init__(
        self, local_context, softmax_temp=None, attention_dropout=0.1, event_dispatcher=""
    ):
        super().__init__(softmax_temp, attention_dropout, event_dispatcher)
        if not isinstance(local_context, int) or local_context < 1:
            raise ValueError(f"local_context must be a positive int, got {local_context!r}")
        self.local_context = local_context

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attn_mask: BaseMask | None = None,
        query_lengths: BaseMask | None = None,
        key_lengths: BaseMask | None = None,
    ) -> torch.Tensor:
        """queries (N, L, H, E), keys (N, S, H, E), values (N, S, H, D) -> (N, L, H, D).

        When the band is much narrower than the keys, only the band is computed: query
        blocks of ``B`` rows against their ``B + w - 1`` keys (O(L w), not O(L S));
        otherwise (and with ``use_fused`` off) as full attention under the band mask.
        """
        L, S = queries.shape[1], keys.shape[1]
        w = self.local_context
        if not self.use_fused or 4 * (w + _block(w)) > S:
            return super().forward(queries, keys, values, self._band(L, S, attn_mask, queries),
                                   query_lengths, key_lengths)
        scale = self.softmax_temp if self.softmax_temp is not None else queries.shape[-1] ** -0.5
        out = self._banded(queries, keys, values, scale, attn_mask, key_lengths)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(
                self._event(queries, keys, scale, self._band(L, S, attn_mask, queries),
                            key_lengths))
        return out

    def _band(self, L: int, S: int, attn_mask: BaseMask | None,
              queries: torch.Tensor) -> FullMask:
        """The band of ``local_context`` keys around each query, and ``attn_mask`` (L, S)."""
        band = band_mask(L, S, self.local_context, queries.device)  # (L, S)
        if attn_mask is not None and not attn_mask.all_ones:
            band = band & attn_mask.bool_matrix.to(band.device)
        return FullMask(band)

    def _banded(self, queries, keys, values, scale, attn_mask, key_lengths) -> torch.Tensor:
        """Blocks of B queries, each against the W = B + w - 1 keys its band can reach:
        key j = b B - w // 2 + c for column c of block b; query i = b B + r sees it when
        r <= c < r + w (and 0 <= j < S, and the masks allow it)."""
        N, L, H, E = queries.shape
        S, D = keys.shape[1], values.shape[-1]
        w, B = self.local_context, _block(self.local_context)
        W, nb, left = B + w - 1, -(-L // B), w // 2
        T = (nb - 1) * B + W  # padded key positions: t = j + left
        q = F.pad(queries.transpose(1, 2), (0, 0, 0, nb * B - L))  # (N, H, nb B, E)
        q = q.view(N, H, nb, B, E)

        def windows(x: torch.Tensor) -> torch.Tensor:  # (N, S, H, X) -> (N, H, nb, W, X)
            x = x.transpose(1, 2)[:, :, : T - left]  # (N, H, <= T - left, X)
            x = F.pad(x, (0, 0, left, T - left - x.shape[2]))  # (N, H, T, X)
            return x.unfold(2, W, B).transpose(-1, -2)  # (N, H, nb, W, X)

        k, v = windows(keys), windows(values)
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # (N, H, nb, B, W)
        r = torch.arange(B, device=q.device)[:, None]  # (B, 1)
        c = torch.arange(W, device=q.device)[None, :]  # (1, W)
        j = torch.arange(nb, device=q.device)[:, None, None] * B - left + c  # (nb, 1, W)
        allowed = (c >= r) & (c < r + w) & (j >= 0) & (j < S)  # (nb, B, W)
        jc = j.clamp(0, S - 1).expand(nb, B, W)
        i = torch.arange(nb, device=q.device)[:, None, None] * B + r  # (nb, B, 1)
        if attn_mask is not None and not attn_mask.all_ones:
            dense = attn_mask.bool_matrix.to(q.device)  # (L, S)
            allowed = allowed & dense[i.clamp(max=L - 1).expand(nb, B, W), jc]
        # Padding rows (i >= L) see every column: no all-masked row, so no NaN reaches the
        # keys' gradients; their outputs are cut off below.
        allowed = allowed | (i >= L)
        allowed = allowed[None, None]  # (1, 1, nb, B, W)
        if key_lengths is not None and not key_lengths.all_ones:
            keys_ok = key_lengths.bool_matrix[:, :S].to(q.device)  # (N, S)
            allowed = allowed & keys_ok[:, jc][:, None]  # (N, 1, nb, B, W)
        # A query with no visible key gets an all-zero row, as full attention gives it
        # (masked_softmax); computed over all columns first, so no NaN reaches a gradient.
        empty = ~allowed.any(-1, keepdim=True)
        weights = torch.softmax(logits.masked_fill(~(allowed | empty), float("-inf")), dim=-1)
        weights = weights.masked_fill(empty, 0.0)
        weights = F.dropout(weights, self.dropout_p, self.training)
        out = torch.matmul(weights, v)  # (N, H, nb, B, D)
        return out.reshape(N, H, nb * B, D)[:, :, :L].transpose(1, 2).contiguous()  # (N, L, H, D)


def _block(local_context: int) -> int:
    """Query rows per block: the window's width (at least 32: fewer, larger matmuls)."""
    return max(32, local_context)


AttentionRegistry.register("local", LocalAttention, [
    ("local_context", Int),
    ("softmax_temp", Optional(Float)),
    ("attention_dropout", Optional(Float, 0.1)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])
