"""Recurrent cross-attention: one query per call, attending to a memory given once.

>>> import torch
>>> from transformer_core.recurrent.attention import RecurrentCrossAttentionLayer, \\
...     RecurrentCrossFullAttention
>>> att = RecurrentCrossAttentionLayer(RecurrentCrossFullAttention(), 16, 4).eval()
>>> state, x, memory = None, torch.rand(8, 16), torch.rand(8, 64, 16)
>>> for i in range(10):
...     x, state = att(x, memory, memory, None, state=state)
>>> tuple(x.shape)
(8, 16)
"""

from .attention_layer import RecurrentCrossAttentionLayer
from .full_attention import RecurrentCrossFullAttention
from .linear_attention import RecurrentCrossLinearAttention, RecurrentCrossLinearState

__all__ = [
    "RecurrentCrossAttentionLayer",
    "RecurrentCrossFullAttention",
    "RecurrentCrossLinearAttention",
    "RecurrentCrossLinearState",
]
