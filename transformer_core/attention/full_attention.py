"""Softmax attention on PyTorch's fused kernel, with a lazily computed matrix."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention_registry import AttentionRegistry, EventDispatcherInstance, Float, Optional
from ..events import AttentionEvent, EventDispatcher
from ..events.portable import Recipe
from ..masking import BaseMask, concat_rows, sample_rows
from ._masks import apply_masks, sdpa_mask, select, softmax_scores

# nanoGPT-style feature detection: torch >= 2.0 has the fused kernel.
HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


def softmax_logits(queries, keys, scale, attn_mask, key_lengths, samples, heads) -> torch.Tensor:
    """Scaled, masked dot products (n, h, L, S) for the selected samples and heads."""
    q = select(queries, samples, heads)  # (n, L, h, E)
    k = select(keys, samples, heads)  # (n, S, h, E)
    logits = torch.einsum("nlhe,nshe->nhls", q, k) * scale  # (n, h, L, S)
    return apply_masks(logits, attn_mask, key_lengths, samples)


def masked_softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax over keys of ``logits`` (n, h, L, S); a query whose keys are all masked
    gets an all-zero row (not NaN), as ``scaled_dot_product_attention`` gives it a
    zero output. This keeps a padded query from poisoning later layers with NaN.
    """
    matrix = torch.softmax(logits, dim=-1)  # (n, h, L, S)
    empty = torch.isneginf(logits).all(dim=-1, keepdim=True)  # (n, h, L, 1)
    return matrix.masked_fill(empty, 0.0)


def softmax_matrix(queries, keys, scale, attn_mask, key_lengths, samples, heads) -> torch.Tensor:
    """The attention matrix (n, h, L, S) for the selected samples and heads."""
    logits = softmax_logits(queries, keys, scale, attn_mask, key_lengths, samples, heads)
    masked = (attn_mask is not None and not attn_mask.all_ones) or (
        key_lengths is not None and not key_lengths.all_ones
    )
    return masked_softmax(logits) if masked else torch.softmax(logits, dim=-1)


class FullAttention(nn.Module):
    """softmax(Q K^T * scale) V, computed by ``scaled_dot_product_attention``.

    Arguments
    ---------
    softmax_temp: the scale of the dot products; None means 1/sqrt(E) (as in
        fast-transformers and the original Transformer).
    attention_dropout: dropout on the attention weights while training
        (0.1, fast-transformers' default).
    event_dispatcher: a dispatcher key or instance. With no listener the L x S
        matrix is never built; with one, an :class:`AttentionEvent` that can
        build it on demand is dispatched.

    ``use_fused`` (default: whether this torch has the fused kernel) may be set
    to False to take the explicit path instead: build the (N, H, L, S) matrix,
    as fast-transformers always does. Tests compare both paths; the benchmark
    uses the explicit one as the reference it beats.
    """

    attention_type = "full"

    def __init__(self, softmax_temp=None, attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        self.softmax_temp = softmax_temp
        self.dropout_p = attention_dropout
        self.role = "self"  # set to "cross" by decoder layers
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)
        self.use_fused = HAS_SDPA

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
        S = keys.shape[1]
        scale = self.softmax_temp if self.softmax_temp is not None else 1.0 / math.sqrt(E)
        matrix = None
        if self.use_fused:
            mask, is_causal = sdpa_mask(attn_mask, key_lengths, L, S)
            out = F.scaled_dot_product_attention(
                queries.transpose(1, 2),  # (N, H, L, E)
                keys.transpose(1, 2),  # (N, H, S, E)
                values.transpose(1, 2),  # (N, H, S, D)
                attn_mask=mask,
                dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=is_causal,
                scale=scale,
            )  # (N, H, L, D)
        else:
            all_ = slice(None)
            matrix = softmax_matrix(queries, keys, scale, attn_mask, key_lengths, all_, all_)
            weights = F.dropout(matrix, self.dropout_p, self.training)
            out = torch.einsum("nhls,nshd->nhld", weights, values)  # (N, H, L, D)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(
                self._event(queries, keys, scale, attn_mask, key_lengths, matrix)
            )
        return out.transpose(1, 2).contiguous()  # (N, L, H, D)

    def _event(self, queries, keys, scale, attn_mask, key_lengths, matrix=None) -> AttentionEvent:
        """The lazy event of queries (N, L, H, E) and keys (N, S, H, E)."""
        return softmax_event(self, queries, keys, scale, attn_mask, key_lengths,
                             role=self.role, attention_type=self.attention_type, matrix=matrix)


def softmax_event(source, queries, keys, scale, attn_mask, key_lengths, *, role: str = "self",
                  attention_type: str = "full", matrix=None) -> AttentionEvent:
    """The lazy :class:`AttentionEvent` (N, H, L, S) of softmax attention of queries
    (N, L, H, E) over keys (N, S, H, E) with ``attn_mask`` (L, S) and ``key_lengths``
    (N, S); ``matrix`` (N, H, L, S), when already built, is the cache."""
    N, L, H, _ = queries.shape

    def copy(n: int) -> AttentionEvent:
        q = queries[n : n + 1].detach().clone()  # (1, L, H, E)
        k = keys[n : n + 1].detach().clone()  # (1, S, H, E)
        return softmax_event(source, q, k, scale, attn_mask, sample_rows(key_lengths, n),
                             role=role, attention_type=attention_type)

    def concat(events) -> AttentionEvent | None:
        # One computation for all: only when the events share scale and attention mask.
        masks = [e.attn_mask for e in events]
        same_mask = all(m is masks[0] for m in masks) or all(
            m is None or m.all_ones for m in masks)
        if not same_mask or any(e.softmax_temp != scale or e.queries is None
                                for e in events):
            return None
        q = torch.cat([e.queries for e in events])  # (T, L, H, E)
        k = torch.cat([e.keys for e in events])  # (T, S, H, E)
        rows = concat_rows([e.key_lengths for e in events], k.shape[1])
        return softmax_event(source, q, k, scale, masks[0], rows, role=role,
                             attention_type=attention_type)

    return AttentionEvent(
        source,
        (N, H, L, keys.shape[1]),
        lambda n, h: softmax_logits(queries, keys, scale, attn_mask, key_lengths, n, h),
        lambda n, h: softmax_matrix(queries, keys, scale, attn_mask, key_lengths, n, h),
        queries=queries,
        keys=keys,
        attn_mask=attn_mask,
        key_lengths=key_lengths,
        softmax_temp=scale,
        role=role,
        attention_type=attention_type,
        matrix=matrix,
        copy_fn=copy,
        concat_fn=concat,
        scores_fn=lambda: softmax_scores(queries, keys, scale, attn_mask, key_lengths),
        recipe=Recipe("softmax", {"scale": float(scale)}, {"queries": queries, "keys": keys},
                      {"attn_mask": attn_mask, "key_lengths": key_lengths}),
    )


AttentionRegistry.register("full", FullAttention, [
    ("softmax_temp", Optional(Float)),
    ("attention_dropout", Optional(Float, 0.1)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])
