"""Attention Free Transformer (Zhai et al., 2021): AFT-full and AFT-simple.

    y_i = sigmoid(q_i) * sum_j exp(k_j + w_ij) * v_j / sum_j exp(k_j + w_ij)

elementwise over the D channels: every channel has its own weights over keys.
The dispatched matrix (N, H, L, S) is those weights averaged over the channels
(rows sum to 1); the output is sigmoid(q) * (per-channel weights @ values).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..attention_registry import AttentionRegistry, EventDispatcherInstance, Int, Optional
from ..events import EventDispatcher
from ..masking import BaseMask
from ._events import lazy_event
from ._masks import UnsupportedMaskError, key_mask


def _key_factors(keys: torch.Tensor, keys_ok: torch.Tensor | None) -> torch.Tensor:
    """exp(k - max_j k) (N, S, H, D), zero at masked keys: the keys' share of the weights."""
    if keys_ok is not None:
        keys = keys.masked_fill(~keys_ok[:, :, None, None], float("-inf"))
    peak = keys.amax(dim=1, keepdim=True).nan_to_num(neginf=0.0).detach()  # (N, 1, H, D)
    return (keys - peak).exp()


def _bias_factors(bias: torch.Tensor) -> torch.Tensor:
    """exp(w - max_j w) (L, S) of a position bias with -inf where masked."""
    peak = bias.amax(dim=1, keepdim=True).nan_to_num(neginf=0.0).detach()
    return (bias - peak).exp()


def _normaliser(den: torch.Tensor) -> torch.Tensor:
    """1 / den, 0 where a query has no key (den == 0)."""
    return torch.where(den > 0, 1.0 / den.clamp(min=torch.finfo(den.dtype).tiny), 0.0)


def channel_mean_matrix(position, key_factors, inverse, samples, heads) -> torch.Tensor:
    """mean_d position[l, s] key_factors[n, s, h, d] inverse[n, l, h, d]: (n, h, L, S)."""
    k = key_factors[samples][:, :, heads]  # (n, S, h, D)
    z = inverse[samples][:, :, heads]  # (n, L, h, D)
    return torch.einsum("ls,nshd,nlhd->nhls", position, k, z) / k.shape[-1]


class _AFT(nn.Module):
    role: str

    def _check(self, queries: torch.Tensor, values: torch.Tensor) -> None:
        if queries.shape[-1] != values.shape[-1]:
            raise ValueError(
                f"values: AFT gates values with the queries, so E == D is needed; got "
                f"E={queries.shape[-1]}, D={values.shape[-1]}")

    def _dispatch(self, queries, keys, attn_mask, key_lengths, position_fn, key_factors,
                  inverse) -> None:
        """Dispatch the lazy event: position factors (L, S) from ``position_fn()``, key
        factors (N, S, H, D), normalisers (N, L, H, D)."""
        N, L, H, _ = queries.shape

        def matrix(n, h):
            return channel_mean_matrix(position_fn(), key_factors, inverse, n, h)

        self.event_dispatcher.dispatch(lazy_event(
            self, (N, H, L, keys.shape[1]), matrix,
            queries=queries, keys=keys, attn_mask=attn_mask, key_lengths=key_lengths))


class AFTFullAttention(_AFT):
    """AFT-full: a learned position bias w = U V^T (rank ``aft_parameterization``) for
    sequences up to ``max_sequence_length``. Any ``attn_mask`` applies (-inf in w).
    Time O(L S D)."""

    attention_type = "aft-full"

    def __init__(self, max_sequence_length=1024, aft_parameterization=64, event_dispatcher=""):
        super().__init__()
        self.max_sequence_length = max_sequence_length
        # small random factors: w starts near 0, i.e. near AFT-simple
        self.u = nn.Parameter(torch.randn(max_sequence_length, aft_parameterization) * 0.01)
        self.v = nn.Parameter(torch.randn(max_sequence_length, aft_parameterization) * 0.01)
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
        """queries (N, L, H, D), keys (N, S, H, D), values (N, S, H, D) -> (N, L, H, D)."""
        self._check(queries, values)
        L, S = queries.shape[1], keys.shape[1]
        if max(L, S) > self.max_sequence_length:
            raise ValueError(f"queries/keys: AFT-full was built for max_sequence_length="
                             f"{self.max_sequence_length}, got L={L}, S={S}")
        bias = self.u[:L] @ self.v[:S].T  # (L, S)
        if attn_mask is not None and not attn_mask.all_ones:
            bias = bias.masked_fill(~attn_mask.bool_matrix, float("-inf"))
        position = _bias_factors(bias.to(queries.dtype))  # (L, S)
        key_factors = _key_factors(keys, key_mask(key_lengths, S))  # (N, S, H, D)
        num = torch.einsum("ls,nshd->nlhd", position, key_factors * values)  # (N, L, H, D)
        inverse = _normaliser(torch.einsum("ls,nshd->nlhd", position, key_factors))
        if self.event_dispatcher.has_listeners:
            self._dispatch(queries, keys, attn_mask, key_lengths, lambda: position,
                           key_factors, inverse)
        return (torch.sigmoid(queries) * num * inverse).contiguous()


class AFTSimpleAttention(_AFT):
    """AFT-simple: no position bias, so a query's weights are softmax(k) over the keys
    it may see. Supports an all-ones or a causal ``attn_mask`` only (time O(L D)
    for those); anything else raises :class:`UnsupportedMaskError`."""

    attention_type = "aft-simple"

    def __init__(self, event_dispatcher=""):
        super().__init__()
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
        """queries (N, L, H, D), keys (N, S, H, D), values (N, S, H, D) -> (N, L, H, D)."""
        self._check(queries, values)
        L, S = queries.shape[1], keys.shape[1]
        causal = attn_mask is not None and not attn_mask.all_ones
        if causal and not attn_mask.lower_triangular:
            raise UnsupportedMaskError(
                "attn_mask: AFT-simple supports only an all-ones or a causal attention mask "
                "(anything else is quadratic); use attention_type='aft-full'")
        key_factors = _key_factors(keys, key_mask(key_lengths, S))  # (N, S, H, D)
        num, den = key_factors * values, key_factors
        if causal:  # running sums: query i sees keys j <= i
            last = torch.arange(L, device=keys.device).clamp(max=S - 1)
            num, den = num.cumsum(1)[:, last], den.cumsum(1)[:, last]  # (N, L, H, D)
        else:
            num, den = num.sum(1, keepdim=True), den.sum(1, keepdim=True)  # (N, 1, H, D)
        inverse = _normaliser(den).expand(-1, L, -1, -1)  # (N, L, H, D)
        if self.event_dispatcher.has_listeners:
            ones = queries.new_ones

            def position() -> torch.Tensor:  # (L, S), built only when the matrix is read
                return ones(L, S).tril() if causal else ones(L, S)

            self._dispatch(queries, keys, attn_mask, key_lengths, position, key_factors,
                           inverse)
        return (torch.sigmoid(queries) * num * inverse).contiguous()


AttentionRegistry.register("aft-full", AFTFullAttention, [
    ("max_sequence_length", Optional(Int, 1024)),
    ("aft_parameterization", Optional(Int, 64)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])
AttentionRegistry.register("aft-simple", AFTSimpleAttention, [
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])

__all__ = ["AFTFullAttention", "AFTSimpleAttention"]
