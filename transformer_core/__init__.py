"""transformer_core: a PyTorch transformer library whose layers announce their
internals as events.

The API mirrors fast-transformers' (``fast_transformers`` -> ``transformer_core``):
builders make encoders and decoders, and an :class:`~transformer_core.events.EventDispatcher`
delivers :class:`~transformer_core.events.QKVEvent`,
:class:`~transformer_core.events.AttentionEvent` and
:class:`~transformer_core.events.IntermediateOutput` to whoever listens.

Shape legend used in every docstring: N batch, L queries, S keys, H heads,
E query/key dimension per head, D value dimension per head.
"""

__version__ = "0.1.0"
