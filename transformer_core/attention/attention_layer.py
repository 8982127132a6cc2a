"""AttentionLayer: projections around an inner attention; dispatches QKVEvent."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..events import EventDispatcher, QKVEvent
from ..masking import BaseMask


class ProjectedAttention(nn.Module):
    """The projections around an inner attention, shared by the batch and recurrent layers:
    queries d_model -> H x d_keys, keys d_model_keys -> H x d_keys, values d_model_keys ->
    H x d_values, and the output H x d_values -> d_model (the seed's parameter names).

    ``dispatches_qkv``: whether the layer dispatches QKVEvents on its ``event_dispatcher``."""

    dispatches_qkv = True

    def __init__(self, attention, d_model, n_heads, d_keys=None, d_values=None,
                 d_model_keys=None, event_dispatcher=""):
        super().__init__()
        if d_model <= 0 or n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got {d_model} and {n_heads}")
        d_keys = d_keys or d_model // n_heads
        d_values = d_values or d_model // n_heads
        d_model_keys = d_model_keys or d_model
        self.inner_attention = attention
        self.query_projection = nn.Linear(d_model, d_keys * n_heads)
        self.key_projection = nn.Linear(d_model_keys, d_keys * n_heads)
        self.value_projection = nn.Linear(d_model_keys, d_values * n_heads)
        self.out_projection = nn.Linear(d_values * n_heads, d_model)
        self.n_heads = n_heads
        self.d_model = d_model
        self.d_model_keys = d_model_keys
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)


class AttentionLayer(ProjectedAttention):
    """Project inputs to H heads, run ``attention`` on them, project back.

    Arguments
    ---------
    attention: the inner attention module (``FullAttention``, ...), kept as
        ``self.inner_attention`` so module names match fast-transformers'.
    d_model: input and output feature size.
    n_heads: H.
    d_keys: E per head (default d_model // n_heads).
    d_values: D per head (default d_model // n_heads).
    d_model_keys: feature size of the keys and values inputs (default d_model);
        a decoder's cross-attention reads a memory of another width this way.
    event_dispatcher: key or instance; a :class:`QKVEvent` with the projected
        queries (N, L, H, E), keys (N, S, H, E) and values (N, S, H, D) is
        dispatched when someone listens.
    """


    def _project(self, queries, keys, values):
        """(N, L, d_model), (N, S, d_model) x2 -> flat projections, fused for self-attention."""
        if queries is keys and keys is values:
            # One matmul instead of three: the same arithmetic, one pass over x.
            weight = torch.cat(
                [self.query_projection.weight, self.key_projection.weight,
                 self.value_projection.weight]
            )
            bias = torch.cat(
                [self.query_projection.bias, self.key_projection.bias, self.value_projection.bias]
            )
            qkv = F.linear(queries, weight, bias)  # (N, L, H*(2E+D))
            sizes = [self.query_projection.out_features, self.key_projection.out_features,
                     self.value_projection.out_features]
            return qkv.split(sizes, dim=-1)
        return (self.query_projection(queries), self.key_projection(keys),
                self.value_projection(values))

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attn_mask: BaseMask | None = None,
        query_lengths: BaseMask | None = None,
        key_lengths: BaseMask | None = None,
    ) -> torch.Tensor:
        """queries (N, L, d_model), keys and values (N, S, d_model_keys) -> (N, L, d_model)."""
        N, L, _ = queries.shape
        S = keys.shape[1]
        H = self.n_heads
        q, k, v = self._project(queries, keys, values)
        q = q.view(N, L, H, -1)  # (N, L, H, E)
        k = k.view(N, S, H, -1)  # (N, S, H, E)
        v = v.view(N, S, H, -1)  # (N, S, H, D)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(QKVEvent(self, q, k, v))
        out = self.inner_attention(q, k, v, attn_mask, query_lengths, key_lengths)  # (N, L, H, D)
        return self.out_projection(out.reshape(N, L, -1))
