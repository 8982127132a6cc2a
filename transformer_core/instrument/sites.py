"""AttentionSite: one attention module of a model, and how to listen to it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch.nn as nn

from ..attention import ATTENTION_TYPES
from ..attention.attention_layer import ProjectedAttention
from ..events import EventDispatcher
from ..recurrent.attention import RECURRENT_ATTENTIONS

_INNER_TYPES = (*ATTENTION_TYPES.values(), *RECURRENT_ATTENTIONS)


@dataclass(frozen=True)
class AttentionSite:
    """One "layer" as the dashboard counts them: a module that emits AttentionEvents.

    ``module`` dispatches AttentionEvents (N, H, L, S) on ``dispatcher``;
    ``qkv_dispatcher`` (None when the module has none) receives QKVEvents, whose
    ``source`` is ``qkv_source`` (for our own modules, the AttentionLayer around ``module``).
    ``kind`` says which adapter found it (``"transformer_core"`` for our own modules).
    ``recurrent``: the module runs one position per call (``transformer_core.recurrent``),
    so each event is one query row (N, H, 1, S) of the sequence generated so far.
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
    recurrent: bool = False


def find_native_sites(model: nn.Module) -> list[AttentionSite]:
    """The transformer_core inner-attention modules of ``model`` in ``named_modules()`` order:
    batch and recurrent (self and cross), with the heads of the layer around each."""
    outers = {
        id(m.inner_attention): m for m in model.modules() if isinstance(m, ProjectedAttention)
    }
    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, _INNER_TYPES):
            continue
        outer = outers.get(id(module))
        qkv = outer if outer is not None and outer.dispatches_qkv else None
        sites.append(AttentionSite(
            index=len(sites), name=name, module=module,
            dispatcher=module.event_dispatcher,
            qkv_dispatcher=None if qkv is None else qkv.event_dispatcher,
            heads=getattr(outer, "n_heads", None), d_model=getattr(outer, "d_model", None),
            role=module.role, attention_type=module.attention_type, qkv_source=qkv,
            recurrent=isinstance(module, RECURRENT_ATTENTIONS),
        ))
    return sites


Include = Callable[[str, nn.Module], bool] | Iterable[str]


def _selected(model: nn.Module, include: Include) -> list[tuple[str, nn.Module]]:
    """The modules ``include`` names (a list of module names, or a predicate on
    ``(name, module)``), in ``named_modules()`` order."""
    modules = list(model.named_modules())
    if callable(include):
        return [(name, m) for name, m in modules if include(name, m)]
    names = [include] if isinstance(include, str) else list(include)
    known = {name for name, _ in modules}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"include: no module named {missing} in {type(model).__name__}")
    wanted = set(names)
    return [(name, m) for name, m in modules if name in wanted]


def _found(module: nn.Module) -> bool:
    """Whether an adapter recognises ``module`` as an attention site on its own."""
    from .huggingface import is_hf_attention
    from .sdpa import calls_sdpa

    return (isinstance(module, (*_INNER_TYPES, nn.MultiheadAttention))
            or is_hf_attention(module) or calls_sdpa(module))


# What hand-written attention modules call their head count and width (nanoGPT, timm, HF 4.x).
_HEAD_NAMES = ("n_head", "n_heads", "num_heads", "num_attention_heads", "nhead", "heads")
_WIDTH_NAMES = ("n_embd", "d_model", "embed_dim", "dim", "hidden_size", "all_head_size")


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first of ``names`` that ``module`` has as an int (a hand-written module's
    head count or width, whatever it calls it)."""
    for name in names:
        value = vars(module).get(name)
        if isinstance(value, int):
            return value
    return None


def _site(model: nn.Module, name: str, module: nn.Module, index: int,
          native: dict[int, AttentionSite], cross: set[int]) -> AttentionSite:
    """The site of ``module``, made to emit by the adapter of its kind."""
    from .huggingface import instrument_hf, is_hf_attention
    from .multihead import instrument_multihead
    from .sdpa import instrument_sdpa

    if id(module) in native:
        return replace(native[id(module)], index=index)
    if isinstance(module, nn.MultiheadAttention):
        role = "cross" if id(module) in cross else "self"
        return instrument_multihead(model, name, module, role, index)
    if is_hf_attention(module):
        return instrument_hf(name, module, index)
    return instrument_sdpa(
        name, module, index,
        heads=_int_attr(module, _HEAD_NAMES), d_model=_int_attr(module, _WIDTH_NAMES))


def instrument(model: nn.Module, include: Include | None = None) -> list[AttentionSite]:
    """Every attention site of ``model`` in ``named_modules()`` order, each emitting
    AttentionEvents on its own dispatcher; raise ``ValueError`` naming its class if none.

    Found on their own: transformer_core attention, Hugging Face attention modules,
    ``nn.MultiheadAttention`` (also inside ``nn.Transformer*Layer``) and modules whose
    forward calls ``F.scaled_dot_product_attention``. ``include`` (a list of module
    names or a predicate on ``(name, module)``) picks the modules instead; one of no
    known kind is watched for the SDPA calls made inside it. The model's outputs and
    kernels do not change; instrumenting twice wraps nothing twice.

    >>> from transformer_core.builders import TransformerEncoderBuilder
    >>> net = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=2,
    ...     query_dimensions=4, value_dimensions=4, feed_forward_dimensions=8).get()
    >>> [(s.index, s.name, s.heads) for s in instrument(net)]
    [(0, 'layers.0.attention.inner_attention', 2), (1, 'layers.1.attention.inner_attention', 2)]
    """
    if include is None:
        chosen = [(name, m) for name, m in model.named_modules() if _found(m)]
    else:
        chosen = _selected(model, include)
    native = {id(s.module): s for s in find_native_sites(model)}
    cross = {id(m.multihead_attn) for m in model.modules()
             if isinstance(m, nn.TransformerDecoderLayer)}
    sites = [_site(model, name, m, i, native, cross) for i, (name, m) in enumerate(chosen)]
    if not sites:
        raise ValueError(
            f"model: no attention module found in {type(model).__name__} (looked for "
            "transformer_core, Hugging Face and nn.MultiheadAttention attention and modules "
            "calling F.scaled_dot_product_attention); name yours with include=['blocks.0.attn', "
            "...] or include=lambda name, module: ...")
    return sites
