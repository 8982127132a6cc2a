"""Exact top-k attention: each query's softmax over only its k highest-scoring keys."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..attention_registry import AttentionRegistry, EventDispatcherInstance, Float, Int, Optional
from ..events import AttentionEvent, EventDispatcher
from ..masking import BaseMask
from .full_attention import masked_softmax, softmax_logits


def topk_logits(queries, keys, scale, topk, attn_mask, key_lengths, samples, heads):
    """Scaled, masked dot products (n, h, L, S) with all but each row's ``topk``
    largest set to -inf (ties broken by ``torch.topk``)."""
    logits = softmax_logits(queries, keys, scale, attn_mask, key_lengths, samples, heads)
    top = logits.topk(min(topk, logits.shape[-1]), dim=-1)  # (n, h, L, k)
    return torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)


class ExactTopKAttention(nn.Module):
    """softmax over the ``topk`` keys with the largest scores of each query; the
    other keys get weight 0 (Gupta et al., 2021, "Memory-efficient Transformers
    via Top-k Attention"). The scores are computed exactly, so time and memory
    are O(L S), as for full attention.

    Arguments: topk (32), softmax_temp (None: 1/sqrt(E)), attention_dropout (0.1),
    event_dispatcher. The dispatched matrix is the sparse one applied.
    """

    attention_type = "exact-topk"

    def __init__(self, topk=32, softmax_temp=None, attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        self.topk = topk
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.role = "self"
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

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
        N, L, H, E = queries.shape
        scale = self.softmax_temp if self.softmax_temp is not None else 1.0 / math.sqrt(E)
        all_ = slice(None)
        logits = topk_logits(queries, keys, scale, self.topk, attn_mask, key_lengths, all_, all_)
        matrix = masked_softmax(logits)  # (N, H, L, S)
        out = torch.einsum("nhls,nshd->nlhd", self.dropout(matrix), values)  # (N, L, H, D)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(
                self._event(queries, keys, scale, attn_mask, key_lengths, matrix))
        return out.contiguous()

    def _event(self, queries, keys, scale, attn_mask, key_lengths, matrix) -> AttentionEvent:
        topk = self.topk

        def logits(n, h):
            return topk_logits(queries, keys, scale, topk, attn_mask, key_lengths, n, h)

        return AttentionEvent(
            self, tuple(matrix.shape), logits, lambda n, h: masked_softmax(logits(n, h)),
            queries=queries, keys=keys, attn_mask=attn_mask, key_lengths=key_lengths,
            softmax_temp=scale, role=self.role, attention_type=self.attention_type,
            matrix=matrix,
        )


AttentionRegistry.register("exact-topk", ExactTopKAttention, [
    ("topk", Optional(Int, 32)),
    ("softmax_temp", Optional(Float)),
    ("attention_dropout", Optional(Float, 0.1)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])

__all__ = ["ExactTopKAttention"]
