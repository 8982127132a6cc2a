"""Find the attention modules of a model and make them emit events.

:func:`instrument` returns one :class:`AttentionSite` per attention module of a
model, in ``named_modules()`` order. ``transformer_core`` modules emit events on
their own; adapters make other models' modules emit the same lazy
:class:`~transformer_core.events.AttentionEvent`: Hugging Face attention
(``huggingface``), ``nn.MultiheadAttention`` (``multihead``) and modules calling
``F.scaled_dot_product_attention`` (``sdpa``).
"""

from .lazy import SDPACall, StaleEventError, sdpa_event
from .sites import AttentionSite, find_native_sites, instrument

__all__ = ["AttentionSite", "SDPACall", "StaleEventError", "find_native_sites", "instrument",
           "sdpa_event"]
