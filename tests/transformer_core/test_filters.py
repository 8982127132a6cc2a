"""Composable event filters, alone and on a real model's events."""

from __future__ import annotations

import pytest
import torch

from transformer_core.events import AttentionEvent, Event, IntermediateOutput, QKVEvent
from transformer_core.events.filters import (
    CallableEventFilter,
    EventFilter,
    event_class,
    from_layer,
    layer_name_contains,
    to_event_filter,
)

from .helpers import Recorder


def test_event_class_accepts_instances_and_subclasses():
    flt = event_class(Event)
    assert flt(QKVEvent(None, 0, 0, 0)) and flt(Event(None))
    assert not event_class(QKVEvent)(Event(None))
    assert not event_class(QKVEvent)("not an event")


def test_operators_compose():
    is_qkv = event_class(QKVEvent)
    from_a = CallableEventFilter(lambda ev: ev.source == "a")
    qa, qb, ia = QKVEvent("a", 0, 0, 0), QKVEvent("b", 0, 0, 0), IntermediateOutput("a", None)
    assert [(is_qkv & from_a)(e) for e in (qa, qb, ia)] == [True, False, False]
    assert [(is_qkv | from_a)(e) for e in (qa, qb, ia)] == [True, True, True]
    assert [(~is_qkv)(e) for e in (qa, qb, ia)] == [False, False, True]
    assert [(~(is_qkv & from_a))(e) for e in (qa, qb, ia)] == [False, True, True]


def test_event_classes_and_callables_are_promoted_on_either_side():
    from_a = CallableEventFilter(lambda ev: ev.source == "a")
    qa, qb = QKVEvent("a", 0, 0, 0), QKVEvent("b", 0, 0, 0)
    starts_with_b = lambda ev: ev.source.startswith("b")  # noqa: E731
    combos = [
        from_a & QKVEvent, QKVEvent & from_a, from_a | AttentionEvent, AttentionEvent | from_a,
        from_a | starts_with_b, starts_with_b | from_a, from_a & starts_with_b,
        starts_with_b & from_a,
    ]
    results = [(flt(qa), flt(qb)) for flt in combos]
    assert all(isinstance(flt, EventFilter) for flt in combos)
    assert results == [
        (True, False), (True, False), (True, False), (True, False),
        (True, True), (True, True), (False, False), (False, False),
    ]


@pytest.mark.parametrize("operand", [3, "x", None, int])
def test_unknown_operand_is_a_type_error(operand):
    flt = event_class(Event)
    assert to_event_filter(operand) is NotImplemented
    with pytest.raises(TypeError):
        _ = flt & operand
    with pytest.raises(TypeError):
        _ = operand | flt


def test_filters_return_bools():
    flt = CallableEventFilter(lambda ev: ev.source)  # truthy, not a bool
    assert flt(Event("yes")) is True and flt(Event("")) is False


def test_from_layer_on_a_real_model(make_encoder, dispatcher):
    net = make_encoder(n_layers=3)
    got = Recorder()
    dispatcher.listen(from_layer(net.layers[1]), got)
    net(torch.randn(2, 5, 8))
    kinds = [type(ev) for ev in got.events]
    assert kinds == [QKVEvent, AttentionEvent, IntermediateOutput]
    assert got.events[0].source is net.layers[1].attention
    assert got.events[1].source is net.layers[1].attention.inner_attention
    assert got.events[2].source is net.layers[1]


def test_layer_name_contains_on_a_real_model(make_encoder, dispatcher):
    net = make_encoder(n_layers=3)
    got = Recorder()
    dispatcher.listen(layer_name_contains(net, "layers.2.attention"), got)
    net(torch.randn(2, 5, 8))
    assert [type(ev) for ev in got.events] == [QKVEvent, AttentionEvent]
    assert got.events[1].source is net.layers[2].attention.inner_attention
    assert not layer_name_contains(net, "layers.2")(Event(object()))  # unknown source


def test_events_from_other_models_are_not_matched(make_encoder):
    net, other = make_encoder(), make_encoder()
    flt = from_layer(net) & AttentionEvent
    inner = other.layers[0].attention.inner_attention
    assert not flt(AttentionEvent(inner, (1, 1, 1, 1), lambda n, h: None))
    assert flt(AttentionEvent(net.layers[0].attention.inner_attention, (1, 1, 1, 1),
                              lambda n, h: None))
