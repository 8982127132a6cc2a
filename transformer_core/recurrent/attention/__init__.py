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

# The recurrent modules that dispatch AttentionEvents: one query row (N, H, 1, S) per call.
RECURRENT_ATTENTIONS = (RecurrentFullAttention, RecurrentLinearAttention,
                        RecurrentCrossFullAttention, RecurrentCrossLinearAttention)

__all__ = [
    "RECURRENT_ATTENTIONS",
    "RecurrentAttentionLayer",
    "RecurrentCrossAttentionLayer",
    "RecurrentCrossFullAttention",
    "RecurrentCrossLinearAttention",
    "RecurrentFullAttention",
    "RecurrentLinearAttention",
]
