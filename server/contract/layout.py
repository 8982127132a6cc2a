"""A model's attention sites, described once: :class:`ModelLayout` (and, for a model in
this process, :class:`LocalModel`: the same layout plus the modules to listen to).

The layout is what every part of attnscope knows of a model: the run registry's
summaries, the stream's subscriptions and plans, captures' checks, the history's
session metadata, and what a remote publisher announces (:meth:`ModelLayout.to_message`,
read back on the server with :meth:`ModelLayout.from_message`). It is built from
:func:`transformer_core.instrument.instrument`, which finds the sites of any kind of
model (``transformer_core`` modules, and the adapters for foreign attention); nothing
here assumes one kind: ``heads``, ``d_model`` and a site's QKV events may be unknown.

>>> from transformer_core.builders import TransformerEncoderBuilder
>>> net = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=2,
...     query_dimensions=4, value_dimensions=4, feed_forward_dimensions=8).get()
>>> layout = LocalModel(net).layout
>>> [(s.index, s.name, s.heads, s.qkv) for s in layout.sites][1]
(1, 'layers.1.attention.inner_attention', 2, True)
>>> layout.n_layers, layout.d_model, layout.vocab_size
(2, 8, None)
>>> ModelLayout.from_message(layout.to_message()) == layout
True
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from transformer_core.events import EventDispatcher
from transformer_core.instrument import AttentionSite, instrument

# What a plan listens to at a site: its AttentionEvents ("attn") or QKVEvents ("qkv").
Source = tuple[str, int]  # (what, layer)


@dataclass(frozen=True)
class SiteLayout:
    """One attention site (a "layer" of the page), as it travels: JSON, no modules.

    ``heads`` and ``d_model`` are None when the site does not tell them; ``qkv`` says
    whether it emits QKVEvents; ``kind`` names the adapter that found it.
    """

    index: int
    name: str
    role: str = "self"
    attention_type: str = "full"
    heads: int | None = None
    d_model: int | None = None
    qkv: bool = False
    kind: str = "transformer_core"

    def to_message(self) -> dict[str, Any]:
        """The ``layer_details`` entry of a run summary (docs/protocol.md), plus what
        a publisher's announce adds (``qkv``, ``d_model``, ``kind``)."""
        return {"index": self.index, "name": self.name, "role": self.role,
                "attention_type": self.attention_type, "heads": self.heads,
                "qkv": self.qkv, "d_model": self.d_model, "kind": self.kind}

    @classmethod
    def from_message(cls, index: int, layer: dict[str, Any]) -> SiteLayout:
        """The inverse of :meth:`to_message`, with the defaults older publishers imply."""
        heads, d_model = layer.get("heads"), layer.get("d_model")
        return cls(index=index, name=str(layer.get("name", f"layer{index}")),
                   role=str(layer.get("role", "self")),
                   attention_type=str(layer.get("attention_type", "full")),
                   heads=None if heads is None else int(heads),
                   d_model=None if d_model is None else int(d_model),
                   qkv=bool(layer.get("qkv", True)),
                   kind=str(layer.get("kind", "transformer_core")))


@dataclass(frozen=True)
class ModelLayout:
    """A model's attention sites in ``named_modules()`` order, and what its input is.

    ``vocab_size``: the first ``nn.Embedding``'s size when the model reads token ids
    (None: it reads features (N, L, d_model)); ``max_len``: the longest sequence it
    accepts, when it says so (a ``seq_len`` attribute); ``d_model``: the first site's
    that is known (the width of feature inputs).
    """

    sites: tuple[SiteLayout, ...]
    vocab_size: int | None = None
    max_len: int | None = None
    d_model: int | None = None

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("sites: a model layout needs at least one attention site")

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    @property
    def n_heads(self) -> int:
        """The most heads of any site (0 when no site tells)."""
        return max((s.heads or 0 for s in self.sites), default=0)

    def summary(self, seq_len: int | None) -> dict[str, Any]:
        """The ``model`` of a RunSummary (docs/protocol.md): layers, heads,
        attention_type, d_model, seq_len and per-layer details."""
        heads = [s.heads for s in self.sites if s.heads is not None]
        types = sorted({s.attention_type for s in self.sites})
        return {
            "layers": len(self.sites),
            "heads": max(heads) if heads else None,
            "attention_type": types[0] if len(types) == 1 else "mixed",
            "d_model": self.d_model,
            "seq_len": seq_len,
            "layer_details": [
                {"index": s.index, "name": s.name, "role": s.role,
                 "attention_type": s.attention_type, "heads": s.heads}
                for s in self.sites
            ],
        }

    def to_message(self) -> dict[str, Any]:
        """The layout as JSON (what a publisher announces; :meth:`from_message` reads it)."""
        return {"layers": [s.to_message() for s in self.sites], "vocab_size": self.vocab_size,
                "max_len": self.max_len, "d_model": self.d_model}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ModelLayout:
        """The inverse of :meth:`to_message`; raises ``ValueError`` naming a bad field."""
        layers = message.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ValueError("layers: a model layout needs at least one attention site")
        return cls(sites=tuple(SiteLayout.from_message(i, layer)
                               for i, layer in enumerate(layers)),
                   vocab_size=_optional_int(message.get("vocab_size")),
                   max_len=_optional_int(message.get("max_len")),
                   d_model=_optional_int(message.get("d_model")))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _max_len(model: nn.Module, embeddings: list[nn.Embedding]) -> int | None:
    """The longest input ``model`` takes: its ``seq_len``, else the rows of a learned position
    embedding (a Hugging Face config's ``max_position_embeddings`` rows: GPT-2, BERT), past
    which its forward fails; None when unknown (rotary and relative positions go further)."""
    seq_len = getattr(model, "seq_len", None)
    if isinstance(seq_len, int) and not isinstance(seq_len, bool):
        return seq_len
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and any(e.num_embeddings == positions for e in embeddings[1:]):
        return positions
    return None


class LocalModel:
    """A model in this process: its :class:`ModelLayout` and the modules behind it.

    Built once per run from :func:`~transformer_core.instrument.instrument` (raises
    ``ValueError`` naming the model's class when it has no attention site).
    ``sites[i]`` is the instrumented site of layer ``i``; ``blocks[i]`` the module
    above it that dispatches its layer's IntermediateOutput (None when none does).
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.sites: tuple[AttentionSite, ...] = tuple(instrument(model))
        modules = dict(model.named_modules())
        self.blocks: tuple[nn.Module | None, ...] = tuple(
            _block_of(site, modules) for site in self.sites)
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        embedding = embeddings[0] if embeddings else None
        self.layout = ModelLayout(
            sites=tuple(SiteLayout(
                index=s.index, name=s.name, role=s.role, attention_type=s.attention_type,
                heads=s.heads, d_model=s.d_model, qkv=s.qkv_dispatcher is not None,
                kind=s.kind) for s in self.sites),
            vocab_size=None if embedding is None else int(embedding.num_embeddings),
            max_len=_max_len(model, embeddings),
            d_model=next((s.d_model for s in self.sites if s.d_model is not None), None))
        # id(the module an event comes from) -> (what, layer): how a listener tells sites apart.
        self.sources: dict[int, Source] = {}
        for site in self.sites:
            self.sources.setdefault(id(site.module), ("attn", site.index))
            if site.qkv_source is not None:
                self.sources.setdefault(id(site.qkv_source), ("qkv", site.index))

    def dispatchers(self) -> list[EventDispatcher]:
        """The distinct dispatchers the sites' AttentionEvents and QKVEvents go to."""
        seen: dict[int, EventDispatcher] = {}
        for site in self.sites:
            for d in (site.dispatcher, site.qkv_dispatcher):
                if d is not None:
                    seen.setdefault(id(d), d)
        return list(seen.values())

    def parameters_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the model's parameters are now, and their float dtype (inputs follow)."""
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() \
            else torch.float32
        return device, dtype


def _ancestors(name: str) -> Iterator[str]:
    """Names of the modules above ``name``, nearest first: "a.b.c" -> "a.b", "a", ""."""
    while name:
        name = name.rsplit(".", 1)[0] if "." in name else ""
        yield name


def _block_of(site: AttentionSite, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The nearest module above ``site`` (not its QKV source) that dispatches events and
    has a ``d_model``: the transformer layer whose IntermediateOutput is the site's."""
    for name in _ancestors(site.name):
        module = modules[name]
        if module is not site.qkv_source and hasattr(module, "event_dispatcher") \
                and hasattr(module, "d_model"):
            return module
    return None
