"""Builders that make transformers from keyword arguments, as fast-transformers' do.

>>> from transformer_core.builders import TransformerEncoderBuilder
>>> net = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=2,
...     query_dimensions=8, value_dimensions=8, feed_forward_dimensions=32).get()
>>> len(net.layers), type(net.layers[0].attention.inner_attention).__name__
(2, 'FullAttention')
>>> TransformerEncoderBuilder.from_kwargs(n_layer=2)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: unknown builder argument 'n_layer'; allowed: activation, ..., value_dimensions
"""

from .transformer_builders import (
    BaseBuilder,
    TransformerDecoderBuilder,
    TransformerEncoderBuilder,
)

__all__ = ["BaseBuilder", "TransformerDecoderBuilder", "TransformerEncoderBuilder"]
