"""Attention modules: the AttentionLayer and the inner attentions, by name.

``ATTENTION_TYPES`` maps the ``attention_type`` names the builders accept to
the classes implementing them.
"""

from .attention_layer import AttentionLayer
from .full_attention import HAS_SDPA, FullAttention
from .linear_attention import CausalLinearAttention, LinearAttention
from .local_attention import LocalAttention

ATTENTION_TYPES = {
    "full": FullAttention,
    "linear": LinearAttention,
    "causal-linear": CausalLinearAttention,
    "local": LocalAttention,
}

__all__ = [
    "ATTENTION_TYPES",
    "AttentionLayer",
    "CausalLinearAttention",
    "FullAttention",
    "HAS_SDPA",
    "LinearAttention",
    "LocalAttention",
]
