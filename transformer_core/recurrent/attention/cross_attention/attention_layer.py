"""RecurrentCrossAttentionLayer: projections around a recurrent cross-attention."""

from __future__ import annotations

import torch
import torch.nn as nn

from ....events import EventDispatcher
from ....masking import BaseMask


class RecurrentCrossAttentionLayer(nn.Module):
    """Project one query (N, d_model) per call, and the memory only at the first call.

    Arguments as :class:`~transformer_core.recurrent.attention.RecurrentAttentionLayer`;
    ``attention`` is called as ``attention(query, keys, values, key_lengths,
    state=state)`` with the query (N, H, E) and, when ``state`` is None, the
    projected memory keys (N, S, H, E) and values (N, S, H, D) (else None: the
    state holds what the attention needs), and returns ``(output (N, H, D), state)``.
    ``event_dispatcher`` is kept for the seed's signature; the inner attention
    dispatches the events.

    >>> from transformer_core.recurrent.attention import RecurrentCrossFullAttention
    >>> layer = RecurrentCrossAttentionLayer(RecurrentCrossFullAttention(), 16, 4).eval()
    >>> x, memory, state = torch.rand(2, 16), torch.rand(2, 7, 16), None
    >>> for _ in range(3):
    ...     x, state = layer(x, memory, memory, None, state=state)
    >>> tuple(x.shape), tuple(state[0].shape)
    ((2, 16), (2, 7, 4, 4))
    """

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
        self.event_dispatcher = EventDispatcher.get(event_dispatcher)

    def forward(self, query: torch.Tensor, keys: torch.Tensor | None,
                values: torch.Tensor | None, key_lengths: BaseMask | None, state=None):
        """query (N, d_model), keys and values (N, S, d_model_keys) (ignored when
        ``state`` is given) -> (output (N, d_model), new state)."""
        N, H = query.shape[0], self.n_heads
        q = self.query_projection(query).view(N, H, -1)  # (N, H, E)
        k = v = None
        if state is None:
            if keys is None or values is None:
                raise ValueError("keys and values are needed at the first step (state is None)")
            S = keys.shape[1]
            k = self.key_projection(keys).view(N, S, H, -1)  # (N, S, H, E)
            v = self.value_projection(values).view(N, S, H, -1)  # (N, S, H, D)
        out, state = self.inner_attention(q, k, v, key_lengths, state=state)  # (N, H, D)
        return self.out_projection(out.reshape(N, -1)), state
