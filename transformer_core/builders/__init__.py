"""Builders that make attentions and transformers from keyword arguments, as
fast-transformers' do; every attention's parameters come through the registry.

>>> from transformer_core.builders import TransformerEncoderBuilder
>>> net = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=2,
...     query_dimensions=8, value_dimensions=8, feed_forward_dimensions=32).get()
>>> len(net.layers), type(net.layers[0].attention.inner_attention).__name__
(2, 'FullAttention')
>>> try:
...     TransformerEncoderBuilder.from_kwargs(n_layer=2)
... except ValueError as e:
...     print(str(e)[:58], "...")
unknown builder argument 'n_layer'; allowed: activation, a ...
"""

# The attentions register themselves when imported; builders then accept their names.
from .. import attention as _attention  # noqa: F401
from .attention_builders import (
    AttentionBuilder,
    BaseAttentionBuilder,
    RecurrentAttentionBuilder,
    RecurrentCrossAttentionBuilder,
)
from .base import BaseBuilder, UnknownParameterError
from .transformer_builders import (
    RecurrentDecoderBuilder,
    RecurrentEncoderBuilder,
    TransformerDecoderBuilder,
    TransformerEncoderBuilder,
)

__all__ = [
    "AttentionBuilder",
    "BaseAttentionBuilder",
    "BaseBuilder",
    "RecurrentAttentionBuilder",
    "RecurrentCrossAttentionBuilder",
    "RecurrentDecoderBuilder",
    "RecurrentEncoderBuilder",
    "TransformerDecoderBuilder",
    "TransformerEncoderBuilder",
    "UnknownParameterError",
]
