"""Composable event filters.

A filter is a callable ``filter(event) -> bool``. :class:`EventFilter` objects
compose with ``&``, ``|`` and ``~``; on either side of an operator an ``Event``
subclass or any plain callable is promoted to a filter, so
``from_layer(net.layers[1]) & AttentionEvent`` and
``AttentionEvent & from_layer(net.layers[1])`` mean the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn


class EventFilter:
    """Base class of composable filters; subclasses implement ``__call__``."""

    def __call__(self, event: Any) -> bool:
        raise NotImplementedError

    def __and__(self, other: Any) -> EventFilter:
        other = to_event_filter(other)
        if other is NotImplemented:
            return NotImplemented
        return CallableEventFilter(lambda ev: self(ev) and other(ev))

    def __rand__(self, other: Any) -> EventFilter:
        other = to_event_filter(other)
        if other is NotImplemented:
            return NotImplemented
        return CallableEventFilter(lambda ev: other(ev) and self(ev))

    def __or__(self, other: Any) -> EventFilter:
        other = to_event_filter(other)
        if other is NotImplemented:
            return NotImplemented
        return CallableEventFilter(lambda ev: self(ev) or other(ev))

    def __ror__(self, other: Any) -> EventFilter:
        other = to_event_filter(other)
        if other is NotImplemented:
            return NotImplemented
        return CallableEventFilter(lambda ev: other(ev) or self(ev))

    def __invert__(self) -> EventFilter:
        return CallableEventFilter(lambda ev: not self(ev))


class CallableEventFilter(EventFilter):
    """Wraps any ``callable(event) -> bool`` as a composable filter."""

    def __init__(self, predicate: Callable[[Any], bool]) -> None:
        self._predicate = predicate

    def __call__(self, event: Any) -> bool:
        return bool(self._predicate(event))


class LayerNameEventFilter(EventFilter):
    """Accepts events whose source module's name under ``root`` passes ``name_filter``.

    Names are those of ``root.named_modules()`` (``"layers.2.attention"``),
    taken when the filter is made.
    """

    def __init__(self, root: nn.Module, name_filter: Callable[[str], bool]) -> None:
        self._names = {id(module): name for name, module in root.named_modules()}
        self._name_filter = name_filter

    def __call__(self, event: Any) -> bool:
        name = self._names.get(id(getattr(event, "source", None)))
        return name is not None and bool(self._name_filter(name))


def to_event_filter(obj: Any) -> EventFilter:
    """Promote ``obj`` to an :class:`EventFilter`, or return ``NotImplemented``."""
    from .event import Event

    if isinstance(obj, EventFilter):
        return obj
    if isinstance(obj, type):
        # A class that is not an Event (``int``, ``torch.Tensor``) is callable but
        # is never a predicate: reject it now rather than fail inside dispatch.
        return event_class(obj) if issubclass(obj, Event) else NotImplemented
    if callable(obj):
        return CallableEventFilter(obj)
    return NotImplemented


def event_class(klass: type) -> EventFilter:
    """Accept events that are instances of ``klass``.

    >>> from transformer_core.events import AttentionEvent, QKVEvent
    >>> event_class(QKVEvent)(QKVEvent(None, None, None, None))
    True
    """
    return CallableEventFilter(lambda ev: isinstance(ev, klass))


def from_layer(layer: nn.Module) -> EventFilter:
    """Accept events emitted by ``layer`` or by any module inside it.

    ``from_layer(net.layers[3])`` therefore matches that layer's
    ``IntermediateOutput``, its ``AttentionLayer``'s ``QKVEvent`` and its inner
    attention's ``AttentionEvent``. The module tree is read when the filter is made.
    """
    members = {id(m) for m in layer.modules()} if isinstance(layer, nn.Module) else {id(layer)}
    return CallableEventFilter(lambda ev: id(getattr(ev, "source", None)) in members)


def layer_name_contains(root: nn.Module, name: str) -> EventFilter:
    """Accept events whose source's name under ``root`` contains ``name``.

    ``layer_name_contains(transformer, "layers.2.attention")`` selects layer 2's
    ``QKVEvent`` (source ``layers.2.attention``) and ``AttentionEvent``
    (source ``layers.2.attention.inner_attention``).
    """
    return LayerNameEventFilter(root, lambda module_name: name in module_name)


__all__ = [
    "CallableEventFilter",
    "EventFilter",
    "LayerNameEventFilter",
    "event_class",
    "from_layer",
    "layer_name_contains",
    "to_event_filter",
]
