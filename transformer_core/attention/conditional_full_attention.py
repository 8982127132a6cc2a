"""Full attention for short sequences, another attention for long ones."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..attention_registry import AttentionRegistry, EventDispatcherInstance, Float, Int, Optional
from ..masking import BaseMask
from .full_attention import FullAttention


class ConditionalFullAttention(nn.Module):
    """Exact softmax attention while L and S are at most ``length_limit``;
    ``other_attention`` (e.g. a clustered one) beyond.

    The attention that runs dispatches the AttentionEvent (its ``source`` is
    ``self.full_attention`` or ``self.other_attention``), so the matrix is always
    the one applied. Built as ``attention_type="conditional-full:<other>"``.

    Arguments: other_attention, length_limit (512), softmax_temp, attention_dropout,
    event_dispatcher (those three for the full attention).
    """

    attention_type = "conditional-full"

    def __init__(self, other_attention: nn.Module, length_limit=512, softmax_temp=None,
                 attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        self.full_attention = FullAttention(softmax_temp, attention_dropout, event_dispatcher)
        self.other_attention = other_attention
        self.length_limit = length_limit

    @property
    def role(self) -> str:
        """``"self"`` or ``"cross"``; setting it sets both attentions' role."""
        return self.full_attention.role

    @role.setter
    def role(self, value: str) -> None:
        self.full_attention.role = value
        self.other_attention.role = value

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
        long = max(queries.shape[1], keys.shape[1]) > self.length_limit
        attention = self.other_attention if long else self.full_attention
        return attention(queries, keys, values, attn_mask, query_lengths, key_lengths)


AttentionRegistry.register("conditional-full", ConditionalFullAttention, [
    ("length_limit", Optional(Int, 512)),
    ("softmax_temp", Optional(Float)),
    ("attention_dropout", Optional(Float, 0.1)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])

__all__ = ["ConditionalFullAttention"]
