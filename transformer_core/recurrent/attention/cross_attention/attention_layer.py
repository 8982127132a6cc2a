"""RecurrentCrossAttentionLayer: projections around a recurrent cross-attention."""

from __future__ import annotations

import torch

from ....attention.attention_layer import ProjectedAttention
from ....masking import BaseMask


class RecurrentCrossAttentionLayer(ProjectedAttention):
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

    # The memory is projected once, at the first step: no per-step queries, keys and values.
    dispatches_qkv = False

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
