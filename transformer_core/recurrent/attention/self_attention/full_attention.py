"""Softmax self-attention one step at a time, keeping every key and value seen so far."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ....attention_registry import (
    EventDispatcherInstance,
    Float,
    Optional,
    RecurrentAttentionRegistry,
)
from ....events import EventDispatcher
from ..._utils import check_state
from .._events import softmax_step_event


def check_batch(state_tensor: torch.Tensor, N: int) -> None:
    """ValueError when the state was made for another batch size than N."""
    if state_tensor.shape[0] != N:
        raise ValueError(
            f"state: made for a batch of {state_tensor.shape[0]}, got a query batch of {N}; "
            "the batch size cannot change during a sequence"
        )


class RecurrentFullAttention(nn.Module):
    """Causal softmax attention as a recurrence: the dual of ``FullAttention`` with a
    causal mask.

    Each call takes one position's query (N, H, E), key (N, H, E) and value
    (N, H, D), appends the key and value to the state and returns the query's
    output (N, H, D) and the new state ``[keys (N, H, S, E), values (N, H, S, D)]``.

    Arguments
    ---------
    softmax_temp: scale of the dot products (default 1/sqrt(E)).
    attention_dropout: dropout on the weights while training (0.1, as ``FullAttention``).
    event_dispatcher: key or instance; a listener gets one :class:`AttentionEvent`
        per step whose matrix is the step's row (N, H, 1, S).

    >>> att = RecurrentFullAttention().eval()
    >>> state = None
    >>> for _ in range(3):
    ...     out, state = att(torch.rand(2, 4, 8), torch.rand(2, 4, 8), torch.rand(2, 4, 6), state)
    >>> tuple(out.shape), tuple(state[0].shape), tuple(state[1].shape)
    ((2, 4, 6), (2, 4, 3, 8), (2, 4, 3, 6))
    """

    attention_type = "full"

    def __init__(self, softmax_temp=None, attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.role = "self"
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                state=None, memory=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """query, key (N, H, E), value (N, H, D), state (or ``memory``, deprecated)
        -> (output (N, H, D), [keys (N, H, S, E), values (N, H, S, D)])."""
        state = check_state(state, memory)
        N, H, E = query.shape
        scale = self.softmax_temp if self.softmax_temp is not None else 1.0 / math.sqrt(E)
        if state is None:
            keys, values = key[:, :, None], value[:, :, None]  # (N, H, 1, E), (N, H, 1, D)
        else:
            check_batch(state[0], N)
            keys = torch.cat([state[0], key[:, :, None]], dim=2)  # (N, H, S, E)
            values = torch.cat([state[1], value[:, :, None]], dim=2)  # (N, H, S, D)
        logits = torch.einsum("nhe,nhse->nhs", query, keys) * scale  # (N, H, S)
        weights = torch.softmax(logits, dim=-1)
        out = torch.einsum("nhs,nhsd->nhd", self.dropout(weights), values)  # (N, H, D)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(softmax_step_event(
                self, query, keys.transpose(1, 2), scale, None, self.role,
                matrix=weights[:, :, None]))  # (N, H, 1, S)
        return out, [keys, values]


RecurrentAttentionRegistry.register("full", RecurrentFullAttention, [
    ("softmax_temp", Optional(Float)),
    ("attention_dropout", Optional(Float, 0.1)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])
