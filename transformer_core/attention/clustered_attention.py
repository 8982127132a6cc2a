"""Clustered attention: queries grouped by LSH + Lloyd; each group shares its
centroid's attention (Vyas et al., 2020)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..attention_registry import (
    AttentionRegistry,
    Bool,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
)
from ..events import EventDispatcher
from ..masking import BaseMask
from ._clustering import centroids_of, hash_codes, lloyd, per_query
from ._events import lazy_event
from ._masks import UnsupportedMaskError, key_mask, query_mask, rows
from .full_attention import masked_softmax


class ClusteredBase(nn.Module):
    """What the clustered attentions share: parameters, grouping the queries and the
    centroids' scores. Tensors inside are laid out (N, H, L, E)."""

    def __init__(self, clusters, iterations=10, bits=32, hash_bias=True, softmax_temp=None,
                 attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        self.clusters = clusters
        self.iterations = iterations
        self.bits = bits
        self.hash_bias = hash_bias
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.role = "self"
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def _centroid_logits(self, q, k, query_lengths, key_lengths):
        """Queries (N, H, L, E), keys (N, H, S, E) -> (cluster of each query (N, H, L),
        centroid logits (N, H, C, S) with masked keys at -inf, scale, whether any key
        is masked)."""
        L, E = q.shape[2], q.shape[3]
        scale = self.softmax_temp if self.softmax_temp is not None else 1.0 / math.sqrt(E)
        valid = query_mask(query_lengths, L)
        with torch.no_grad():  # the grouping is discrete: no gradient flows through it
            codes = hash_codes(q.detach(), self.bits, self.hash_bias)  # (N, H, L, B)
            assign = lloyd(codes, valid, self.clusters, self.iterations)  # (N, H, L)
        C = min(self.clusters, L)
        centroids = centroids_of(q, assign, valid, C)  # (N, H, C, E)
        logits = (centroids * scale) @ k.transpose(-1, -2)  # (N, H, C, S)
        keys_ok = key_mask(key_lengths, k.shape[2])
        if keys_ok is not None:
            logits = logits.masked_fill(~keys_ok[:, None, None, :], float("-inf"))
        return assign, logits, scale, keys_ok is not None

    @staticmethod
    def _softmax(logits: torch.Tensor, masked: bool) -> torch.Tensor:
        """softmax over keys of ``logits`` (N, H, C, S); only masked keys (``masked``)
        can leave a row all -inf, which ``masked_softmax`` turns into zeros."""
        return masked_softmax(logits) if masked else torch.softmax(logits, -1)

    def _require_all_ones(self, attn_mask: BaseMask | None) -> None:
        if attn_mask is not None and not attn_mask.all_ones:
            raise UnsupportedMaskError(
                f"attn_mask: {self.attention_type} attention supports only an all-ones "
                "attention mask (queries of one cluster share their keys); pad with key lengths")


class ClusteredAttention(ClusteredBase):
    """Each query gets the softmax attention of its cluster's centroid.

    Queries are hashed with ``bits`` random hyperplanes and grouped into
    ``clusters`` by ``iterations`` Lloyd steps in Hamming space; the centroid of a
    group is the mean of its queries. Cost O(L C + C S) instead of O(L S).
    The dispatched matrix gives each query its centroid's row (N, H, L, S).
    Only an all-ones ``attn_mask`` is supported (padding goes through lengths).
    """

    attention_type = "clustered"

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
        assign, logits, _, masked = self._centroid_logits(q, k, query_lengths, key_lengths)
        matrix = self._softmax(logits, masked)  # (N, H, C, S)
        out = per_query(self.dropout(matrix) @ v, assign)  # (N, H, L, D)
        if self.event_dispatcher.has_listeners:
            shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            self.event_dispatcher.dispatch(lazy_event(
                self, shape,
                lambda n, h: per_query(rows(matrix, n, h), rows(assign, n, h)),
                lambda n, h: per_query(rows(logits, n, h), rows(assign, n, h)),
                queries=queries, keys=keys, key_lengths=key_lengths))
        return out.transpose(1, 2).contiguous()


_CLUSTER_PARAMS = [
    ("clusters", Int),
    ("iterations", Optional(Int, 10)),
    ("bits", Optional(Int, 63)),
    ("hash_bias", Optional(Bool, True)),
]
_SOFTMAX_PARAMS = [
    ("softmax_temp", Optional(Float)),
    ("attention_dropout", Optional(Float, 0.1)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
]
AttentionRegistry.register("clustered", ClusteredAttention, _CLUSTER_PARAMS + _SOFTMAX_PARAMS)

__all__ = ["ClusteredAttention", "ClusteredBase"]
