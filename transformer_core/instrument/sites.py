"""AttentionSite: one attention module of a model, and how to listen to it."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..attention import ATTENTION_TYPES, AttentionLayer
from ..events import EventDispatcher

_INNER_TYPES = tuple(ATTENTION_TYPES.values())


@dataclass(frozen=True)
class AttentionSite:
    """One "layer" as the dashboard counts them: a module that emits AttentionEvents.

    ``module`` dispatches AttentionEvents (N, H, L, S) on ``dispatcher``;
    ``qkv_dispatcher`` (None when the module has none) receives QKVEvents, whose
    ``source`` is ``qkv_source`` (for our own modules, the AttentionLayer around ``module``).
    ``kind`` says which adapter found it (``"transformer_core"`` for our own modules).
    """

    index: int
    name: str
    module: nn.Module
    dispatcher: EventDispatcher
    qkv_dispatcher: EventDispatcher | None
    heads: int | None
    d_model: int | None
    role: str
    attention_type: str
    kind: str = "transformer_core"
    qkv_source: nn.Module | None = None


def find_native_sites(model: nn.Module) -> list[AttentionSite]:
    """The transformer_core inner-attention modules of ``model`` in ``named_modules()`` order."""
    outers = {
        id(m.inner_attention): m for m in model.modules() if isinstance(m, AttentionLayer)
    }
    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, _INNER_TYPES):
            continue
        outer = outers.get(id(module))
        sites.append(AttentionSite(
            index=len(sites), name=name, module=module,
            dispatcher=module.event_dispatcher,
            qkv_dispatcher=None if outer is None else outer.event_dispatcher,
            heads=getattr(outer, "n_heads", None), d_model=getattr(outer, "d_model", None),
            role=module.role, attention_type=module.attention_type, qkv_source=outer,
        ))
    return sites


def instrument(model: nn.Module) -> list[AttentionSite]:
    """Every attention site of ``model``; raise ``ValueError`` naming its class if none.

    >>> from transformer_core.builders import TransformerEncoderBuilder
    >>> net = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=2,
    ...     query_dimensions=4, value_dimensions=4, feed_forward_dimensions=8).get()
    >>> [(s.index, s.name, s.heads) for s in instrument(net)]
    [(0, 'layers.0.attention.inner_attention', 2), (1, 'layers.1.attention.inner_attention', 2)]
    """
    sites = find_native_sites(model)
    if not sites:
        raise ValueError(
            f"model: no attention module found in {type(model).__name__}"
        )
    return sites
