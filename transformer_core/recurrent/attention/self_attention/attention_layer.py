"""RecurrentAttentionLayer: projections around a recurrent self-attention, one step per call."""

from __future__ import annotations

import torch

from ....attention.attention_layer import ProjectedAttention
from ....events import QKVEvent
from ..._utils import check_state


class RecurrentAttentionLayer(ProjectedAttention):
    """Project one position's inputs (N, d_model) to H heads, run the recurrent
    ``attention`` with the state, project back: the step-by-step dual of ``AttentionLayer``.

    Arguments
    ---------
    attention: the inner recurrent attention, called as
        ``attention(query, key, value, state)`` with (N, H, E), (N, H, E), (N, H, D)
        and returning ``(output (N, H, D), state)``; kept as ``self.inner_attention``,
        so parameter names (and state dicts) match ``AttentionLayer``'s.
    d_model: input and output feature size.
    n_heads: H.
    d_keys: E per head (default d_model // n_heads).
    d_values: D per head (default d_model // n_heads).
    d_model_keys: feature size of keys and values before projection (default d_model).
    event_dispatcher: key or instance; a :class:`QKVEvent` with the step's projected
        queries and keys (N, 1, H, E) and values (N, 1, H, D) is dispatched when
        someone listens.

    >>> from transformer_core.recurrent.attention import RecurrentFullAttention
    >>> layer = RecurrentAttentionLayer(RecurrentFullAttention(), 16, 4).eval()
    >>> x, state = torch.rand(2, 16), None
    >>> for _ in range(3):
    ...     x, state = layer(x, x, x, state=state)
    >>> tuple(x.shape), tuple(state[0].shape)
    ((2, 16), (2, 4, 3, 4))
    """


    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                state=None, memory=None):
        """query (N, d_model), key and value (N, d_model_keys), state (or ``memory``,
        deprecated) -> (output (N, d_model), new state)."""
        state = check_state(state, memory)
        N, H = query.shape[0], self.n_heads
        q = self.query_projection(query).view(N, H, -1)  # (N, H, E)
        k = self.key_projection(key).view(N, H, -1)  # (N, H, E)
        v = self.value_projection(value).view(N, H, -1)  # (N, H, D)
        if self.event_dispatcher.has_listeners:
            self.event_dispatcher.dispatch(QKVEvent(self, q[:, None], k[:, None], v[:, None]))
        out, state = self.inner_attention(q, k, v, state)  # (N, H, D)
        return self.out_projection(out.reshape(N, -1)), state
