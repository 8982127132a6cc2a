"""Attention builders: make an attention from a registry name and typed parameters.

``attention_type`` is a registry name, or a composition where an attention
decorates others: ``"outer:inner"`` builds ``inner`` and passes it as the first
argument of ``outer``; ``"outer:a,b"`` passes both ``a`` and ``b``.

>>> from transformer_core.builders import AttentionBuilder
>>> builder = AttentionBuilder.from_kwargs(length_limit=128, clusters=16, softmax_temp=0.25)
>>> attention = builder.get("conditional-full:clustered")
>>> type(attention).__name__, type(attention.other_attention).__name__
('ConditionalFullAttention', 'ClusteredAttention')
>>> builder.clusters = "many"
Traceback (most recent call last):
...
ValueError: attention parameter 'clusters' must be Int, got 'many'
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..attention_registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
    RecurrentCrossAttentionRegistry,
    Registry,
)
from .base import BaseBuilder, unknown
from .params import optional_positive_float, positive_int, probability

logger = logging.getLogger(__name__)

# Value ranges the specs (types only, as in fast-transformers) do not say.
_POSITIVE = (lambda v: v is None or positive_int(v), "a positive int")
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "attention_dropout": (lambda v: v is None or probability(v), "a float in [0, 1)"),
    "softmax_temp": (optional_positive_float, "None or a positive float"),
    "bits": (lambda v: v is None or positive_int(v) and v <= 63, "an int in [1, 63]"),
    **{name: _POSITIVE for name in (
        "query_dimensions", "local_context", "clusters", "iterations", "topk", "length_limit",
        "chunk_size", "rounds", "max_sequence_length", "aft_parameterization")},
}


def import_recurrent() -> None:
    """Import the recurrent attentions so that they register themselves."""
    try:
        importlib.import_module("transformer_core.recurrent.attention")
    except ModuleNotFoundError as e:  # only while transformer_core.recurrent does not exist
        if not (e.name or "").startswith("transformer_core.recurrent"):
            raise
        logger.debug("transformer_core.recurrent is not available: %s", e)


class BaseAttentionBuilder(BaseBuilder):
    """Holds attention parameters (any name the registry knows) and builds attentions.

    A parameter left unset is None: the attention then gets its spec's default,
    or the builder raises ``ValueError`` naming it when it has none.
    """

    def __init__(self, registry: Registry) -> None:
        object.__setattr__(self, "_registry", registry)
        object.__setattr__(self, "_parameters", {})

    @property
    def available_attentions(self) -> list[str]:
        """The attention types this builder can build."""
        return self._registry.keys

    def validate_attention_type(self, attention_type: str) -> bool:
        """Whether every name in ``attention_type`` (``"a"``, ``"a:b"``, ``"a:b,c"``) is known."""
        return isinstance(attention_type, str) and all(
            name in self._registry for level in attention_type.split(":")
            for name in level.split(","))

    def accepts(self, key: str) -> bool:
        """Whether ``key`` is an attention parameter of this builder's registry."""
        return self._registry.contains_parameter(key)

    def __setattr__(self, key: str, value: Any) -> None:
        if not self._registry.contains_parameter(key):
            raise unknown(key, self._registry.parameters)
        if value is not None:  # None unsets: checked at get(), where defaults apply
            self._registry.validate_parameter(key, value)
            check, expected = RANGES.get(key, (None, ""))
            if check is not None and not check(value):
                raise ValueError(f"builder argument {key!r} must be {expected}, got {value!r}")
        self._parameters[key] = value

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        if self._registry.contains_parameter(key):
            return self._parameters.get(key)
        raise AttributeError(f"{type(self).__name__} has no parameter {key!r}")

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self._parameters.items())
        return f"{type(self).__name__}.from_kwargs({items})"

    def get(self, attention_type: str, overrides: Mapping[str, Any] | None = None):
        """Build ``attention_type`` (a name or a composition, see the module docstring).

        ``overrides`` replace this builder's parameters for this call (the
        transformer builders pass the layer's ``query_dimensions`` and their
        ``event_dispatcher`` this way).
        """
        if not self.validate_attention_type(attention_type):
            raise ValueError(
                f"attention_type {attention_type!r} names an attention that is not registered; "
                f"available: {', '.join(self.available_attentions)}")
        built: list[Any] = []
        for level in reversed(attention_type.split(":")):
            built = [self._construct(name, built, overrides or {}) for name in level.split(",")]
        if len(built) != 1:
            raise ValueError(f"attention_type {attention_type!r} must build one attention, "
                             f"not {len(built)}: put the decorating attention first ('a:b,c')")
        return built[0]

    def _construct(self, name: str, decorated: list[Any], overrides: Mapping[str, Any]):
        """``cls(*decorated, **registered parameters)`` for the registry entry ``name``."""
        cls, names = self._registry[name]
        kwargs = {}
        for key in names:
            value = overrides[key] if key in overrides else self._parameters.get(key)
            if value is None and not self._registry.accepts_none(key):
                raise ValueError(f"attention type {name!r} needs the parameter {key!r}; "
                                 f"give it to the builder (e.g. {key}=...)")
            kwargs[key] = self._registry.validate_parameter(key, value)
        return cls(*decorated, **kwargs)


class AttentionBuilder(BaseAttentionBuilder):
    """Builds attentions for whole sequences (inside an ``AttentionLayer``)."""

    def __init__(self) -> None:
        super().__init__(AttentionRegistry)


class RecurrentAttentionBuilder(BaseAttentionBuilder):
    """Builds recurrent self-attentions (one step at a time, with a state)."""

    def __init__(self) -> None:
        import_recurrent()
        super().__init__(RecurrentAttentionRegistry)


class RecurrentCrossAttentionBuilder(BaseAttentionBuilder):
    """Builds recurrent cross-attentions (one query step against a fixed memory)."""

    def __init__(self) -> None:
        import_recurrent()
        super().__init__(RecurrentCrossAttentionRegistry)
