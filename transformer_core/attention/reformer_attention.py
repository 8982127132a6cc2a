"""Reformer attention (Kitaev et al., 2020): shared-QK, LSH buckets, chunked softmax."""

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
from ._events import lazy_event
from ._masks import key_mask, rows
from .full_attention import masked_softmax


def _chunks(t: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N, H, P, X) -> (N, H, P // chunk, chunk, X)."""
    N, H, P = t.shape[:3]
    return t.reshape(N, H, P // chunk, chunk, *t.shape[3:])


def _look_back(t: torch.Tensor) -> torch.Tensor:
    """Chunks (N, H, B, C, ...) -> each chunk preceded by the previous one (N, H, B, 2C, ...);
    the first chunk's predecessor is itself, masked by the caller."""
    previous = torch.cat([t[:, :, :1], t[:, :, :-1]], dim=2)
    return torch.cat([previous, t], dim=3)


class ReformerAttention(nn.Module):
    """LSH attention: queries double as keys (normalised), are hashed into buckets by
    ``bits`` random rotations (2 * bits buckets), sorted by bucket and position, cut
    into chunks of ``chunk_size``; each query attends with a softmax to its chunk and
    the previous one. ``rounds`` hashings are averaged. Time and memory O(L chunk_size).

    ``keys`` are ignored (shared-QK, as in the paper); values must have S == L.
    ``masked``: a query attends to itself only when it can attend to nothing else.
    The dispatched matrix (N, H, L, L) is the average over rounds of the weights applied.
    """

    attention_type = "reformer"

    def __init__(self, chunk_size=32, bits=8, rounds=4, masked=False, softmax_temp=None,
                 attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        self.chunk_size = chunk_size
        self.bits = bits
        self.rounds = rounds
        self.masked = masked
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
        """queries (N, L, H, E), values (N, L, H, D) -> (N, L, H, D); keys are not used."""
        N, L, H, E = queries.shape
        if values.shape[1] != L:
            raise ValueError(f"values: reformer attention shares queries and keys, so it needs "
                             f"L == S; got L={L}, S={values.shape[1]}")
        scale = self.softmax_temp if self.softmax_temp is not None else 1.0 / math.sqrt(E)
        C = min(self.chunk_size, L)
        P = -(-L // C) * C  # L padded to whole chunks
        q = nn.functional.pad(queries.transpose(1, 2), (0, 0, 0, P - L))  # (N, H, P, E)
        v = nn.functional.pad(values.transpose(1, 2), (0, 0, 0, P - L))  # (N, H, P, D)
        k = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        allowed = torch.arange(P, device=q.device) < L  # (P,)
        allowed = allowed.expand(N, P)
        keys_ok = key_mask(key_lengths, L)
        if keys_ok is not None:
            allowed = allowed & nn.functional.pad(keys_ok, (0, P - L))
        dense = None
        if attn_mask is not None and not attn_mask.all_ones:
            mask = attn_mask.bool_matrix[:L, :L]  # (L, L)
            dense = nn.functional.pad(mask, (0, P - mask.shape[1], 0, P - mask.shape[0]))
        listening = self.event_dispatcher.has_listeners
        out, kept = 0.0, []
        for _ in range(self.rounds):
            order = self._sort(k, allowed)  # (N, H, P)
            weights, pos_q, pos_k = self._round(q, k, order, allowed, dense, scale, C)
            v_sorted = v.gather(2, order[..., None].expand_as(v))  # (N, H, P, D)
            v_lb = _look_back(_chunks(v_sorted, C))  # (N, H, B, 2C, D)
            out_sorted = self.dropout(weights) @ v_lb  # (N, H, B, C, D)
            out = out + torch.zeros_like(v).scatter(
                2, order[..., None].expand_as(v), out_sorted.reshape(v.shape))
            if listening:
                kept.append((weights, pos_q, pos_k))
        out = out / self.rounds
        if listening:
            self.event_dispatcher.dispatch(lazy_event(
                self, (N, H, L, L), lambda n, h: _dense(kept, n, h, P, L),
                queries=queries, key_lengths=key_lengths, attn_mask=attn_mask))
        return out[:, :, :L].transpose(1, 2).contiguous()

    def _sort(self, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """A random rotation's buckets of keys (N, H, P, E), as a sort order (N, H, P)
        by bucket, then position; masked and padded positions go last."""
        rotations = torch.randn(k.shape[-1], self.bits, device=k.device, dtype=k.dtype)
        projected = k @ rotations  # (N, H, P, bits)
        buckets = torch.cat([projected, -projected], dim=-1).argmax(-1)  # (N, H, P)
        buckets = buckets.masked_fill(~allowed[:, None, :], 2 * self.bits)
        return buckets.argsort(dim=-1, stable=True)

    def _round(self, q, k, order, allowed, dense, scale, C):
        """Weights (N, H, B, C, 2C) of one hashing round, and the original positions of
        their queries (N, H, B, C) and keys (N, H, B, 2C)."""
        E = q.shape[-1]
        index = order[..., None].expand(-1, -1, -1, E)
        q_s = _chunks(q.gather(2, index), C)  # (N, H, B, C, E)
        k_lb = _look_back(_chunks(k.gather(2, index), C))  # (N, H, B, 2C, E)
        pos_q = _chunks(order, C)  # (N, H, B, C)
        pos_k = _look_back(pos_q)  # (N, H, B, 2C)
        logits = q_s @ k_lb.transpose(-1, -2) * scale  # (N, H, B, C, 2C)
        ok = allowed.gather(1, pos_k.flatten(1)).view(pos_k.shape)[..., None, :]
        first = torch.zeros(pos_k.shape[2], 2 * C, dtype=torch.bool, device=q.device)
        first[0, :C] = True  # the first chunk has no predecessor
        ok = ok & ~first[:, None, :]
        if dense is not None:
            ok = ok & dense[pos_q[..., :, None], pos_k[..., None, :]]
        if self.masked:  # itself only when nothing else is allowed (Reformer's rule)
            myself = pos_q[..., :, None] == pos_k[..., None, :]
            others = (ok & ~myself).any(-1, keepdim=True)
            ok = ok & ~(myself & others)
        logits = logits.masked_fill(~ok, float("-inf"))
        return masked_softmax(logits), pos_q, pos_k


def _dense(kept, samples, heads, P: int, L: int) -> torch.Tensor:
    """The rounds' average weights as dense rows (n, h, L, L) for samples and heads."""
    total = None
    for weights, pos_q, pos_k in kept:
        w = rows(weights, samples, heads)  # (n, h, B, C, 2C)
        flat = (rows(pos_q, samples, heads)[..., :, None] * P
                + rows(pos_k, samples, heads)[..., None, :])  # (n, h, B, C, 2C)
        n, h = w.shape[:2]
        dense = w.new_zeros(n, h, P * P).scatter_add(
            2, flat.reshape(n, h, -1), w.reshape(n, h, -1))
        total = dense if total is None else total + dense
    return (total / len(kept)).view(n, h, P, P)[:, :, :L, :L]


AttentionRegistry.register("reformer", ReformerAttention, [
    ("chunk_size", Optional(Int, 32)),
    ("bits", Optional(Int, 63)),
    ("rounds", Optional(Int, 4)),
    ("masked", Optional(Bool, False)),
    ("softmax_temp", Optional(Float)),
    ("attention_dropout", Optional(Float, 0.1)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])

__all__ = ["ReformerAttention"]
