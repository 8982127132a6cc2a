"""Improved clustered attention: centroid weights, refined on each cluster's top-k keys
(Vyas et al., 2020, i-clustered), and its causal variant."""

from __future__ import annotations

import torch

from ..attention_registry import AttentionRegistry, Int, Optional
from ..masking import BaseMask
from ._clustering import Blocks, block_keys, blocks, from_blocks, per_query, to_blocks
from ._events import lazy_event
from ._masks import UnsupportedMaskError, rows
from .clustered_attention import _CLUSTER_PARAMS, _SOFTMAX_PARAMS, ClusteredBase
from .full_attention import masked_softmax


def sparse_rows(weights: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base`` (n, h, L, S) with ``weights`` (n, h, L, k) written at keys ``index``."""
    return base.scatter(-1, index, weights)


def top_key_weights(queries, keys, top, layout, scale, hidden_fn):
    """Exact softmax weights (P, size, k) of each query over its cluster's top keys.

    queries (N, L, H, E), keys (N, S, H, E), top: the clusters' top keys (indices and
    values (N, H, C, k)), ``layout`` the queries' :class:`Blocks`.
    ``hidden_fn(keys (P, 1, k))`` -> bool (P, size or 1, k) or None: keys a query may
    not see besides the ones masked for its cluster.
    """
    C, topk = top.indices.shape[2:]
    exact = torch.bmm(to_blocks(queries, layout),
                      block_keys(keys, top.indices, layout).transpose(1, 2))  # (P, size, k)
    exact = exact.mul_(scale)  # in place: bmm's backward does not need its output
    masked = torch.isneginf(top.values.reshape(-1, topk)[layout.cluster])[:, None, :]
    hidden = hidden_fn(top.indices.reshape(-1, topk)[layout.cluster][:, None, :])
    hidden = masked if hidden is None else hidden | masked
    if not hidden.any():
        return torch.softmax(exact, -1)
    return masked_softmax(exact.masked_fill(hidden, float("-inf")))


def per_query_weights(weights: torch.Tensor, layout: Blocks, shape) -> torch.Tensor:
    """Block weights (P, size, k) -> each query's weights (N, H, L, k) for ``shape``
    (N, H, L)."""
    N, H, L = shape
    return from_blocks(weights, layout, (N, L, H)).transpose(1, 2)


class ImprovedClusteredAttention(ClusteredBase):
    """Clustered attention whose ``topk`` strongest keys (per cluster) are recomputed
    exactly for each query.

    For query i in cluster c with centroid attention A_c and top keys T_c (the
    ``topk`` keys with the largest centroid scores): key j outside T_c gets A_c[j];
    keys in T_c share A_c's mass on T_c, m_c = sum_{j in T_c} A_c[j], in proportion
    to softmax(q_i . k_j * scale) over T_c. Rows still sum to 1. The dispatched
    matrix is exactly these rows. Only an all-ones ``attn_mask`` is supported.

    The queries of a cluster are computed together: regrouped into blocks of about
    L / C queries of one cluster each, they meet their cluster's top keys in one
    batched matmul (time O(L topk E), memory O((L + C topk) E)).
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
        N, H, L, _ = q.shape
        assign, logits, scale, masked = self._centroid_logits(q, k, query_lengths, key_lengths)
        centroid = self._softmax(logits, masked)  # (N, H, C, S)
        top = logits.topk(min(self.topk, k.shape[2]), dim=-1, sorted=False)  # (N, H, C, k)
        mass = centroid.gather(-1, top.indices).sum(-1)  # (N, H, C)
        rest = centroid.scatter(-1, top.indices, 0.0)  # (N, H, C, S): keys outside T_c
        layout = blocks(assign, logits.shape[2])
        weights = top_key_weights(queries, keys, top, layout, scale, lambda keys: None)
        weights = weights * mass.reshape(-1)[layout.cluster][:, None, None]  # (P, size, k)
        exact = torch.bmm(self.dropout(weights), block_keys(values, top.indices, layout))
        out = from_blocks(exact, layout, (N, L, H)) + per_query(
            self.dropout(rest) @ v, assign).transpose(1, 2)  # (N, L, H, D)
        if self.event_dispatcher.has_listeners:
            shape = (N, H, L, k.shape[2])
            index = per_query(top.indices, assign)  # (N, H, L, k)
            self.event_dispatcher.dispatch(lazy_event(
                self, shape,
                lambda n, h: sparse_rows(
                    rows(per_query_weights(weights.detach(), layout, (N, H, L)), n, h),
                    rows(index, n, h), per_query(rows(rest, n, h), rows(assign, n, h))),
                queries=queries, keys=keys, key_lengths=key_lengths))
        return out.contiguous()


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
        N, H, L, _ = q.shape
        assign, logits, scale, _ = self._centroid_logits(q, k, query_lengths, key_lengths)
        top = logits.topk(min(self.topk, k.shape[2]), dim=-1, sorted=False)  # (N, H, C, k)
        layout = blocks(assign, logits.shape[2])
        position = layout.position.reshape(-1, layout.size, 1)  # (P, size, 1)
        weights = top_key_weights(queries, keys, top, layout, scale,
                                  lambda keys: keys > position)  # (P, size, k)
        exact = torch.bmm(self.dropout(weights), block_keys(values, top.indices, layout))
        out = from_blocks(exact, layout, (N, L, H))  # (N, L, H, D)
        if self.event_dispatcher.has_listeners:
            shape = (N, H, L, k.shape[2])
            index = per_query(top.indices, assign)  # (N, H, L, k)
            self.event_dispatcher.dispatch(lazy_event(
                self, shape,
                lambda n, h: _causal_rows(weights.detach(), layout, index, n, h, shape),
                queries=queries, keys=keys, attn_mask=attn_mask, key_lengths=key_lengths))
        return out.contiguous()


def _causal_rows(weights, layout, index, n, h, shape):
    """The causal matrix (n, h, L, S) of the selected samples and heads: each query's
    top-key weights, 0 elsewhere."""
    picked = rows(per_query_weights(weights, layout, shape[:3]), n, h)  # (n, h, L, k)
    base = picked.new_zeros(*picked.shape[:3], shape[3])
    return sparse_rows(picked, rows(index, n, h), base)


_IMPROVED_PARAMS = _CLUSTER_PARAMS + [("topk", Optional(Int, 32))] + _SOFTMAX_PARAMS
AttentionRegistry.register("improved-clustered", ImprovedClusteredAttention, _IMPROVED_PARAMS)
AttentionRegistry.register("causal-improved-clustered", ImprovedClusteredCausalAttention,
                           _IMPROVED_PARAMS)

__all__ = ["ImprovedClusteredAttention", "ImprovedClusteredCausalAttention"]
