"""Attention modules: the AttentionLayer and the inner attentions, by name.

Each inner attention registers itself in
:data:`~transformer_core.attention_registry.AttentionRegistry` under its
``attention_type``. ``ATTENTION_TYPES`` maps those names to the classes of the
inner attentions this package provides (the modules that dispatch AttentionEvents;
``conditional-full`` is not one: the attention it delegates to dispatches).
"""

from ._masks import UnsupportedMaskError
from .aft_attention import AFTFullAttention, AFTSimpleAttention
from .attention_layer import AttentionLayer
from .clustered_attention import ClusteredAttention
from .conditional_full_attention import ConditionalFullAttention
from .exact_topk_attention import ExactTopKAttention
from .full_attention import HAS_SDPA, FullAttention
from .improved_clustered_attention import (
    ImprovedClusteredAttention,
    ImprovedClusteredCausalAttention,
)
from .linear_attention import CausalLinearAttention, LinearAttention
from .local_attention import LocalAttention
from .reformer_attention import ReformerAttention

ATTENTION_TYPES = {
    cls.attention_type: cls
    for cls in (FullAttention, LinearAttention, CausalLinearAttention, LocalAttention,
                ExactTopKAttention, ClusteredAttention, ImprovedClusteredAttention,
                ImprovedClusteredCausalAttention, ReformerAttention, AFTFullAttention,
                AFTSimpleAttention)
}

__all__ = [
    "ATTENTION_TYPES",
    "AFTFullAttention",
    "AFTSimpleAttention",
    "AttentionLayer",
    "CausalLinearAttention",
    "ClusteredAttention",
    "ConditionalFullAttention",
    "ExactTopKAttention",
    "FullAttention",
    "HAS_SDPA",
    "ImprovedClusteredAttention",
    "ImprovedClusteredCausalAttention",
    "LinearAttention",
    "LocalAttention",
    "ReformerAttention",
    "UnsupportedMaskError",
]
