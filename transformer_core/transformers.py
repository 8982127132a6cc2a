"""Encoder and decoder layers and stacks (post-norm, as fast-transformers and
``torch.nn.TransformerEncoderLayer`` with ``norm_first=False``).

Each layer dispatches an :class:`~transformer_core.events.IntermediateOutput`
with its output when someone listens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionLayer
from .events import EventDispatcher, IntermediateOutput
from .masking import BaseMask, FullMask, LengthMask

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _check_input(x: torch.Tensor, d_model: int, name: str = "x") -> None:
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name}: expected shape (N, L, {d_model}) (d_model = n_heads * value_dimensions), "
            f"got {tuple(x.shape)}"
        )


def _defaults(x, attn_mask, length_mask, S=None):
    """Default masks: nothing masked, all lengths full; no L x S matrix is built."""
    N, L = x.shape[0], x.shape[1]
    S = L if S is None else S
    attn_mask = attn_mask if attn_mask is not None else FullMask(L, S, device=x.device)
    if length_mask is None:
        length_mask = LengthMask.full(N, S, device=x.device)
    return attn_mask, length_mask


class _FeedForward(nn.Module):
    """Shared by encoder and decoder layers: the position-wise MLP with a residual."""

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.activation(self.linear1(x)))
        return x + self.dropout(self.linear2(y))

    def _emit(self, x: torch.Tensor) -> torch.Tensor:
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(IntermediateOutput(self, x))
        return x


class TransformerEncoderLayer(_FeedForward):
    """Self-attention and a feed-forward block, each with residual + LayerNorm.

    Arguments: attention (an AttentionLayer), d_model, d_ff (default 4 *
    d_model), dropout (0.1), activation ("relu" or "gelu"), event_dispatcher.
    """

    def __init__(self, attention, d_model, d_ff=None, dropout=0.1, activation="relu",
                 event_dispatcher=""):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        d_ff = d_ff or 4 * d_model
        self.attention = attention
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]
        self.d_model = d_model
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, x: torch.Tensor, attn_mask: BaseMask | None = None,
                length_mask: BaseMask | None = None) -> torch.Tensor:
        """x (N, L, d_model) -> (N, L, d_model)."""
        attn_mask, length_mask = _defaults(x, attn_mask, length_mask)
        x = x + self.dropout(self.attention(
            x, x, x, attn_mask=attn_mask, query_lengths=length_mask, key_lengths=length_mask
        ))
        x = self.norm1(x)
        return self._emit(self.norm2(self._feed_forward(x)))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers (``self.layers``) and an optional final norm."""

    def __init__(self, layers, norm_layer=None, event_dispatcher=""):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm_layer
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, x: torch.Tensor, attn_mask: BaseMask | None = None,
                length_mask: BaseMask | None = None) -> torch.Tensor:
        """x (N, L, d_model) -> (N, L, d_model); masks as in fast-transformers."""
        _check_input(x, self.layers[0].d_model)
        attn_mask, length_mask = _defaults(x, attn_mask, length_mask)
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask, length_mask=length_mask)
        return self.norm(x) if self.norm is not None else x


class TransformerDecoderLayer(_FeedForward):
    """Self-attention, cross-attention to ``memory``, feed-forward; post-norm.

    The cross-attention's inner attention is marked ``role = "cross"``, so its
    AttentionEvents say ``is_cross``.
    """

    def __init__(self, self_attention, cross_attention, d_model, d_ff=None, dropout=0.1,
                 activation="relu", event_dispatcher=""):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        d_ff = d_ff or 4 * d_model
        self.self_attention = self_attention
        self.cross_attention = cross_attention
        self.cross_attention.inner_attention.role = "cross"
        # the memory's feature size (None: unknown, not checked)
        self.d_model_memory = (cross_attention.d_model_keys
                               if isinstance(cross_attention, AttentionLayer) else None)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]
        self.d_model = d_model
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, x, memory, x_mask=None, x_length_mask=None, memory_mask=None,
                memory_length_mask=None):
        """x (N, L, d_model), memory (N, S, d_model) -> (N, L, d_model)."""
        S = memory.shape[1]
        x_mask, x_length_mask = _defaults(x, x_mask, x_length_mask)
        memory_mask, _ = _defaults(x, memory_mask, None, S)
        if memory_length_mask is None:
            memory_length_mask = LengthMask.full(x.shape[0], S, device=x.device)
        x = self.norm1(x + self.dropout(self.self_attention(
            x, x, x, attn_mask=x_mask, query_lengths=x_length_mask, key_lengths=x_length_mask
        )))
        x = self.norm2(x + self.dropout(self.cross_attention(
            x, memory, memory, attn_mask=memory_mask, query_lengths=x_length_mask,
            key_lengths=memory_length_mask,
        )))
        return self._emit(self.norm3(self._feed_forward(x)))


class TransformerDecoder(nn.Module):
    """A stack of decoder layers (``self.layers``) and an optional final norm."""

    def __init__(self, layers, norm_layer=None, event_dispatcher=""):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm_layer
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, x, memory, x_mask=None, x_length_mask=None, memory_mask=None,
                memory_length_mask=None):
        """x (N, L, d_model), memory (N, S, d_model) -> (N, L, d_model)."""
        first = self.layers[0]
        _check_input(x, first.d_model)
        if first.d_model_memory is not None:
            _check_input(memory, first.d_model_memory, "memory")
        if memory.shape[0] != x.shape[0]:
            raise ValueError(f"memory: batch size {memory.shape[0]} != x batch size {x.shape[0]}")
        for layer in self.layers:
            x = layer(x, memory, x_mask, x_length_mask, memory_mask, memory_length_mask)
        return self.norm(x) if self.norm is not None else x


__all__ = [
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
