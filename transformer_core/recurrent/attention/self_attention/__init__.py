"""Recurrent self-attention: one query, key and value per call, attending to every
key seen so far (the causal mask is implied).

>>> import torch
>>> from transformer_core.recurrent.attention import RecurrentAttentionLayer, \\
...     RecurrentFullAttention
>>> att = RecurrentAttentionLayer(RecurrentFullAttention(), 16, 4).eval()
>>> state, x = None, torch.rand(8, 16)
>>> for i in range(10):
...     x, state = att(x, x, x, state=state)
>>> tuple(x.shape)
(8, 16)
"""

from .attention_layer import RecurrentAttentionLayer
from .full_attention import RecurrentFullAttention
from .linear_attention import RecurrentLinearAttention, RecurrentLinearState

__all__ = [
    "RecurrentAttentionLayer",
    "RecurrentFullAttention",
    "RecurrentLinearAttention",
    "RecurrentLinearState",
]
