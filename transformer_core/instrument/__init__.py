"""Find the attention modules of a model and make them emit events.

:func:`instrument` returns one :class:`AttentionSite` per attention module of a
model, in ``named_modules()`` order. ``transformer_core`` modules emit events on
their own; adapters (added per kind of foreign attention) make other models'
modules emit the same :class:`~transformer_core.events.AttentionEvent`.
"""

from .sites import AttentionSite, find_native_sites, instrument

__all__ = ["AttentionSite", "find_native_sites", "instrument"]
