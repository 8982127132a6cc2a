"""Local (banded) softmax attention: each query sees a window of nearby keys."""

from __future__ import annotations

import torch

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
        """queries (N, L, H, E), keys (N, S, H, E), values (N, S, H, D) -> (N, L, H, D)."""
        L, S = queries.shape[1], keys.shape[1]
        band = band_mask(L, S, self.local_context, queries.device)  # (L, S)
        if attn_mask is not None and not attn_mask.all_ones:
            band = band & attn_mask.bool_matrix
        return super().forward(queries, keys, values, FullMask(band), query_lengths, key_lengths)


AttentionRegistry.register("local", LocalAttention, [
    ("local_context", Int),
    ("softmax_temp", Optional(Float)),
    ("attention_dropout", Optional(Float, 0.1)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])
