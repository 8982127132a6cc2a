"""Recurrent encoder and decoder layers and stacks: the step-by-step duals of
:mod:`transformer_core.transformers` (post-norm, same parameter names, so a batch
model's ``state_dict`` loads into its recurrent twin).

Inputs are one position (N, d_model); each layer keeps its own state, and each
stack a list of them. Each layer dispatches an
:class:`~transformer_core.events.IntermediateOutput` with its output (N, 1, d_model)
when someone listens.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..events import EventDispatcher, IntermediateOutput
from ..masking import BaseMask, LengthMask
from ..transformers import ACTIVATIONS
from ._utils import check_state


def _check_step(x: torch.Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(
            f"x: expected one position of shape (N, d_model), got {tuple(x.shape)}; "
            "recurrent models take a sequence one position per call")


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class _Step(nn.Module):
    """Shared by the recurrent layers: the feed-forward block and the output event."""

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.activation(self.linear1(x)))
        return x + self.dropout(self.linear2(y))

    def _emit(self, x: torch.Tensor) -> torch.Tensor:
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(IntermediateOutput(self, x[:, None]))  # (N, 1, d)
        return x


class RecurrentTransformerEncoderLayer(_Step):
    """Self-attention to the positions so far and a feed-forward block, each with
    residual + LayerNorm: the dual of ``TransformerEncoderLayer`` under a causal mask.

    Arguments: attention (a ``RecurrentAttentionLayer``), d_model, d_ff (default
    4 * d_model), dropout (0.1), activation ("relu" or "gelu"), event_dispatcher.
    """

    def __init__(self, attention, d_model, d_ff=None, dropout=0.1, activation="relu",
                 event_dispatcher=""):
        super().__init__()
        d_ff = d_ff or 4 * d_model
        self.attention = attention
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.d_model = d_model
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, x: torch.Tensor, state=None, memory=None):
        """x (N, d_model), state (or ``memory``, deprecated) -> (x (N, d_model), state)."""
        state = check_state(state, memory)
        x2, state = self.attention(x, x, x, state)
        x = self.norm1(x + self.dropout(x2))
        return self._emit(self.norm2(self._feed_forward(x))), state


class RecurrentTransformerEncoder(nn.Module):
    """A stack of recurrent encoder layers (``self.layers``), one state per layer,
    and an optional final norm.

    >>> from transformer_core.recurrent.attention import RecurrentAttentionLayer, \\
    ...     RecurrentLinearAttention
    >>> enc = RecurrentTransformerEncoder([RecurrentTransformerEncoderLayer(
    ...     RecurrentAttentionLayer(RecurrentLinearAttention(4), 16, 4), 16)
    ...     for _ in range(2)]).eval()
    >>> state = None
    >>> for x in torch.rand(5, 3, 16):  # five positions of a batch of 3
    ...     y, state = enc(x, state=state)
    >>> tuple(y.shape), len(state), tuple(state[0][0].shape)
    ((3, 16), 2, (3, 4, 4, 4))
    """

    def __init__(self, layers, norm_layer=None, event_dispatcher=""):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm_layer
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, x: torch.Tensor, state=None, memory=None):
        """x (N, d_model), state: a list with one state per layer, or None (or
        ``memory``, deprecated) -> (x (N, d_model), new list of states)."""
        state = check_state(state, memory)
        _check_step(x)
        states = [None] * len(self.layers) if state is None else list(state)
        if len(states) != len(self.layers):
            raise ValueError(f"state: expected one entry per layer ({len(self.layers)}), "
                             f"got {len(states)}")
        for i, layer in enumerate(self.layers):
            x, states[i] = layer(x, state=states[i])
        return (self.norm(x) if self.norm is not None else x), states


class RecurrentTransformerDecoderLayer(_Step):
    """Self-attention to the positions so far, cross-attention to ``memory`` and a
    feed-forward block, post-norm: the dual of ``TransformerDecoderLayer`` under a
    causal ``x_mask``. The memory's attention mask is taken to be all ones.

    Its state is ``[self-attention state, cross-attention state]``.
    """

    def __init__(self, self_attention, cross_attention, d_model, d_ff=None, dropout=0.1,
                 activation="relu", event_dispatcher=""):
        super().__init__()
        d_ff = d_ff or 4 * d_model
        self.self_attention = self_attention
        self.cross_attention = cross_attention
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.d_model = d_model
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                memory_length_mask: BaseMask | None = None, state=None):
        """x (N, d_model), memory (N, S, d_model), memory_length_mask (N, S) (default:
        nothing padded) -> (x (N, d_model), [self state, cross state])."""
        if memory_length_mask is None:
            memory_length_mask = LengthMask.full(x.shape[0], memory.shape[1], device=x.device)
        self_state, cross_state = state if state is not None else (None, None)
        x2, self_state = self.self_attention(x, x, x, state=self_state)
        x = self.norm1(x + self.dropout(x2))
        x2, cross_state = self.cross_attention(x, memory, memory, memory_length_mask,
                                               state=cross_state)
        x = self.norm2(x + self.dropout(x2))
        return self._emit(self.norm3(self._feed_forward(x))), [self_state, cross_state]


class RecurrentTransformerDecoder(nn.Module):
    """A stack of recurrent decoder layers (``self.layers``), one state per layer,
    and an optional final norm.

    >>> from transformer_core.recurrent.attention import RecurrentAttentionLayer, \\
    ...     RecurrentCrossAttentionLayer, RecurrentFullAttention, RecurrentCrossFullAttention
    >>> dec = RecurrentTransformerDecoder([RecurrentTransformerDecoderLayer(
    ...     RecurrentAttentionLayer(RecurrentFullAttention(), 16, 4),
    ...     RecurrentCrossAttentionLayer(RecurrentCrossFullAttention(), 16, 4), 16)]).eval()
    >>> memory, state = torch.rand(3, 9, 16), None
    >>> for x in torch.rand(5, 3, 16):
    ...     y, state = dec(x, memory, state=state)
    >>> tuple(y.shape), tuple(state[0][0][0].shape)
    ((3, 16), (3, 4, 5, 4))
    """

    def __init__(self, layers, norm_layer=None, event_dispatcher=""):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm_layer
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                memory_length_mask: BaseMask | None = None, state=None):
        """x (N, d_model), memory (N, S, d_model), state: one entry per layer or None
        -> (x (N, d_model), new list of states)."""
        _check_step(x)
        if memory.ndim != 3 or memory.shape[0] != x.shape[0]:
            raise ValueError(f"memory: expected shape ({x.shape[0]}, S, d_model), "
                             f"got {tuple(memory.shape)}")
        states = [None] * len(self.layers) if state is None else list(state)
        if len(states) != len(self.layers):
            raise ValueError(f"state: expected one entry per layer ({len(self.layers)}), "
                             f"got {len(states)}")
        for i, layer in enumerate(self.layers):
            x, states[i] = layer(x, memory, memory_length_mask=memory_length_mask,
                                 state=states[i])
        return (self.norm(x) if self.norm is not None else x), states


__all__ = [
    "RecurrentTransformerDecoder",
    "RecurrentTransformerDecoderLayer",
    "RecurrentTransformerEncoder",
    "RecurrentTransformerEncoderLayer",
]
