"""Recurrent self- and cross-attentions, and the layers that project around them."""

from .cross_attention import (
    RecurrentCrossAttentionLayer,
    RecurrentCrossFullAttention,
    RecurrentCrossLinearAttention,
)
from .self_attention import (
    RecurrentAttentionLayer,
    RecurrentFullAttention,
    RecurrentLinearAttention,
)

__all__ = [
    "RecurrentAttentionLayer",
    "RecurrentCrossAttentionLayer",
    "RecurrentCrossFullAttention",
    "RecurrentCrossLinearAttention",
    "RecurrentFullAttention",
    "RecurrentLinearAttention",
]
