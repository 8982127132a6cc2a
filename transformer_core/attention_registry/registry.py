"""Registries of attention implementations and the typed parameters each needs.

Builders read a registry to know which ``attention_type`` names exist and which
parameters they may be given; each attention module registers itself when
imported, so an external one only has to be imported before building.

A recurrent attention (one step at a time, carrying a state) registers itself
the same way, in the module that defines it:

>>> import torch.nn as nn
>>> from transformer_core.attention_registry import (
...     EventDispatcherInstance, Float, Optional, RecurrentAttentionRegistry)
>>> class MyRecurrentAttention(nn.Module):
...     def __init__(self, softmax_temp=None, attention_dropout=0.1, event_dispatcher=""):
...         super().__init__()
>>> registry = Registry()  # in a real module: RecurrentAttentionRegistry
>>> registry.register("my-recurrent", MyRecurrentAttention, [
...     ("softmax_temp", Optional(Float)),
...     ("attention_dropout", Optional(Float, 0.1)),
...     ("event_dispatcher", Optional(EventDispatcherInstance, "")),
... ])
>>> "my-recurrent" in registry, registry["my-recurrent"][1]
(True, ['softmax_temp', 'attention_dropout', 'event_dispatcher'])
>>> registry.validate_parameter("softmax_temp", "hot")
Traceback (most recent call last):
...
ValueError: attention parameter 'softmax_temp' must be Optional[Float, None], got 'hot'

A name may be registered with several classes' parameters only under one spec:
registering ``("softmax_temp", Int)`` now would raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .spec import Spec


class Registry:
    """Attention classes by name, and the spec of every parameter any of them takes."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}
        self._class_params: dict[str, list[str]] = {}
        self._parameters: dict[str, Spec] = {}

    def register(self, key: str, class_object: type,
                 parameter_tuples: Sequence[tuple[str, Spec]]) -> None:
        """Make ``class_object`` buildable as ``key``; the builder will call it with the
        keyword arguments named in ``parameter_tuples``, each validated by its spec.

        Raises ValueError when ``key`` is taken or a parameter name is already
        registered with a different spec.
        """
        if key in self._classes:
            raise ValueError(f"attention type {key!r} is already registered "
                             f"(by {self._classes[key].__name__})")
        for name, spec in parameter_tuples:
            if not isinstance(spec, Spec):
                raise ValueError(f"parameter {name!r} of {key!r}: expected a Spec, got {spec!r}")
            known = self._parameters.get(name)
            if known is not None and known != spec:
                raise ValueError(f"parameter {name!r} is already registered with spec "
                                 f"{known!r}, not {spec!r}")
        self._classes[key] = class_object
        for name, spec in parameter_tuples:
            self._parameters.setdefault(name, spec)
        self._class_params[key] = [name for name, _ in parameter_tuples]

    def __contains__(self, key: object) -> bool:
        return key in self._classes

    def __getitem__(self, key: str) -> tuple[type, list[str]]:
        """(class, names of the parameters it is built with)."""
        return self._classes[key], self._class_params[key]

    @property
    def keys(self) -> list[str]:
        """The registered attention types, in registration order."""
        return list(self._classes)

    @property
    def parameters(self) -> list[str]:
        """Every registered parameter name, sorted."""
        return sorted(self._parameters)

    def contains_parameter(self, key: str) -> bool:
        return key in self._parameters

    def accepts_none(self, key: str) -> bool:
        """Whether parameter ``key`` may be left unset (None: its spec has a default)."""
        return self._parameters[key].check(None)

    def validate_parameter(self, key: str, value: Any) -> Any:
        """The canonical value of parameter ``key``; ValueError naming ``key`` if invalid."""
        spec = self._parameters[key]
        try:
            return spec.get(value)
        except ValueError as e:
            raise ValueError(
                f"attention parameter {key!r} must be {spec!r}, got {value!r}") from e


# Batch attentions (``AttentionLayer``), recurrent self-attentions and recurrent
# cross-attentions (``RecurrentAttentionLayer``, ``RecurrentCrossAttentionLayer``).
AttentionRegistry = Registry()
RecurrentAttentionRegistry = Registry()
RecurrentCrossAttentionRegistry = Registry()
