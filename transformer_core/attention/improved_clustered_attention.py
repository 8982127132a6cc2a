"""Improved clustered attention: centroid weights, refined on each cluster's top-k keys
(Vyas et al., 2020, i-clustered), and its causal variant."""

from __future__ import annotations

import torch

from ..attention_registry import AttentionRegistry, Int, Optional
from ..masking import BaseMask
from ._clustering import per_query
from ._events import lazy_event
from ._masks import UnsupportedMaskError, rows
from .clustered_attention import _CLUSTER_PARAMS, _SOFTMAX_PARAMS, ClusteredBase
from .full_attention import masked_softmax


def gather_keys(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` (N, H, S, X) at ``index`` (N, H, L, k): (N, H, L, k, X)."""
    N, H = index.shape[:2]
    n = torch.arange(N, device=index.device)[:, None, None, None]
    h = torch.arange(H, device=index.device)[None, :, None, None]
    return t[n, h, index]


def sparse_rows(weights: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base`` (n, h, L, S) with ``weights`` (n, h, L, k) written at keys ``index``."""
    return base.scatter(-1, index, weights)


class ImprovedClusteredAttention(ClusteredBase):
    """Clustered attention whose ``topk`` strongest keys (per cluster) are recomputed
    exactly for each query.

    For query i in cluster c with centroid attention A_c and top keys T_c (the
    ``topk`` keys with the largest centroid scores): key j outside T_c gets A_c[j];
    keys in T_c share A_c's mass on T_c, m_c = sum_{j in T_c} A_c[j], in proportion
    to softmax(q_i . k_j * scale) over T_c. Rows still sum to 1. The dispatched
    matrix is exactly these rows. Only an all-ones ``attn_mask`` is supported.
    Memory: O(L topk E) for the gathered keys.
    """

    attention_type = "improved-clustered"

    def __init__(self, clusters, iterations=10, bits=32, hash_bias=True, topk=32,
                 softmax_temp=None, attention_dropout=0.1, event_dispatcher=""):
        super().__init__(clusters, iterations, bits, hash_bias, softmax_temp, attention_dropout,
                         event_dispatcher)
        self.topk = topk

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
        self._require_all_ones(attn_mask)
        q, k, v = (t.transpose(1, 2) for t in (queries, keys, values))  # (N, H, *, *)
        assign, logits, scale = self._centroid_logits(q, k, query_lengths, key_lengths)
        centroid = masked_softmax(logits)  # (N, H, C, S)
        top = logits.topk(min(self.topk, k.shape[2]), dim=-1)  # (N, H, C, k)
        mass = centroid.gather(-1, top.indices).sum(-1, keepdim=True)  # (N, H, C, 1)
        rest = centroid.scatter(-1, top.indices, 0.0)  # (N, H, C, S): keys outside T_c
        index = per_query(top.indices, assign)  # (N, H, L, k)
        exact = torch.einsum("nhle,nhlke->nhlk", q, gather_keys(k, index)) * scale
        exact = exact.masked_fill(torch.isneginf(per_query(top.values, assign)), float("-inf"))
        weights = masked_softmax(exact) * per_query(mass, assign)  # (N, H, L, k)
        out = per_query(self.dropout(rest) @ v, assign) + torch.einsum(
            "nhlk,nhlkd->nhld", self.dropout(weights), gather_keys(v, index))  # (N, H, L, D)
        if self.event_dispatcher.has_listeners:
            shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            self.event_dispatcher.dispatch(lazy_event(
                self, shape,
                lambda n, h: sparse_rows(rows(weights, n, h), rows(index, n, h),
                                         per_query(rows(rest, n, h), rows(assign, n, h))),
                queries=queries, keys=keys, key_lengths=key_lengths))
        return out.transpose(1, 2).contiguous()


class ImprovedClusteredCausalAttention(ImprovedClusteredAttention):
    """Causal improved clustered attention: query i attends only to the keys j <= i
    among its cluster's ``topk`` top keys, with exact softmax weights over them
    (there is no centroid term, which would see the future). A query none of whose
    top keys is in its past gets a zero row and a zero output.

    Needs a lower-triangular (causal) ``attn_mask``.
    """

    attention_type = "causal-improved-clustered"

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
        if attn_mask is None or not attn_mask.lower_triangular:
            raise UnsupportedMaskError(
                "attn_mask: causal-improved-clustered attention needs a lower-triangular "
                "(causal) attention mask such as TriangularCausalMask(L)")
        q, k, v = (t.transpose(1, 2) for t in (queries, keys, values))  # (N, H, *, *)
        assign, logits, scale = self._centroid_logits(q, k, query_lengths, key_lengths)
        top = logits.topk(min(self.topk, k.shape[2]), dim=-1)  # (N, H, C, k)
        index = per_query(top.indices, assign)  # (N, H, L, k)
        exact = torch.einsum("nhle,nhlke->nhlk", q, gather_keys(k, index)) * scale
        position = torch.arange(q.shape[2], device=q.device)[:, None]  # (L, 1)
        hidden = (index > position) | torch.isneginf(per_query(top.values, assign))
        weights = masked_softmax(exact.masked_fill(hidden, float("-inf")))  # (N, H, L, k)
        out = torch.einsum("nhlk,nhlkd->nhld", self.dropout(weights), gather_keys(v, index))
        if self.event_dispatcher.has_listeners:
            shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            self.event_dispatcher.dispatch(lazy_event(
                self, shape,
                lambda n, h: sparse_rows(rows(weights, n, h), rows(index, n, h),
                                         weights.new_zeros(_rows_shape(weights, n, h, shape))),
                queries=queries, keys=keys, attn_mask=attn_mask, key_lengths=key_lengths))
        return out.transpose(1, 2).contiguous()


def _rows_shape(weights, n, h, shape):
    """(n, h, L, S) of the selected samples and heads."""
    picked = rows(weights[..., :1], n, h)
    return (*picked.shape[:3], shape[3])


_IMPROVED_PARAMS = _CLUSTER_PARAMS + [("topk", Optional(Int, 32))] + _SOFTMAX_PARAMS
AttentionRegistry.register("improved-clustered", ImprovedClusteredAttention, _IMPROVED_PARAMS)
AttentionRegistry.register("causal-improved-clustered", ImprovedClusteredCausalAttention,
                           _IMPROVED_PARAMS)

__all__ = ["ImprovedClusteredAttention", "ImprovedClusteredCausalAttention"]
