"""Softmax cross-attention one query at a time over a fixed memory."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ....attention_registry import (
    EventDispatcherInstance,
    Float,
    Optional,
    RecurrentCrossAttentionRegistry,
)
from ....events import EventDispatcher
from ....masking import BaseMask
from .._events import masked_row_softmax, softmax_step_event, softmax_step_logits


class RecurrentCrossFullAttention(nn.Module):
    """Softmax attention of one query per call to keys and values given once.

    The first call takes the projected memory, keys (N, S, H, E) and values
    (N, S, H, D); it becomes the state ``[keys, values]`` and later calls may
    pass None for both. ``key_lengths`` (a mask (N, S), None for none) marks
    padded memory positions; a query whose keys are all padded gets a zero output.

    Arguments
    ---------
    softmax_temp: scale of the dot products (default 1/sqrt(E)).
    attention_dropout: dropout on the weights while training (0.1).
    event_dispatcher: key or instance; a listener gets one :class:`AttentionEvent`
        per step (``role == "cross"``) whose matrix is the row (N, H, 1, S).

    >>> att = RecurrentCrossFullAttention().eval()
    >>> out, state = att(torch.rand(2, 4, 8), torch.rand(2, 5, 4, 8), torch.rand(2, 5, 4, 6), None)
    >>> out, state = att(torch.rand(2, 4, 8), None, None, None, state=state)
    >>> tuple(out.shape), tuple(state[0].shape)
    ((2, 4, 6), (2, 5, 4, 8))
    """

    attention_type = "full"

    def __init__(self, softmax_temp=None, attention_dropout=0.1, event_dispatcher=""):
        super().__init__()
        self.softmax_temp = softmax_temp
        self.dropout = nn.Dropout(attention_dropout)
        self.role = "cross"
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, query: torch.Tensor, keys: torch.Tensor | None,
                values: torch.Tensor | None, key_lengths: BaseMask | None,
                state=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """query (N, H, E), keys (N, S, H, E), values (N, S, H, D) or ``state``
        -> (output (N, H, D), [keys, values])."""
        if state is not None:
            keys, values = state[0], state[1]
        if keys is None or values is None:
            raise ValueError("keys and values are needed at the first step (state is None)")
        N, H, E = query.shape
        scale = self.softmax_temp if self.softmax_temp is not None else 1.0 / math.sqrt(E)
        all_ = slice(None)
        logits = softmax_step_logits(query, keys, scale, key_lengths, all_, all_)  # (N, H, 1, S)
        weights = masked_row_softmax(logits)
        out = torch.einsum("nhs,nshd->nhd", self.dropout(weights[:, :, 0]), values)  # (N, H, D)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(softmax_step_event(
                self, query, keys, scale, key_lengths, self.role, matrix=weights))
        return out, [keys, values]


RecurrentCrossAttentionRegistry.register("full", RecurrentCrossFullAttention, [
    ("softmax_temp", Optional(Float)),
    ("attention_dropout", Optional(Float, 0.1)),
    ("event_dispatcher", Optional(EventDispatcherInstance, "")),
])
