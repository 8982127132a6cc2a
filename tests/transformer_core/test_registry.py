"""Attention registry: typed parameter specs and registration, as fast-transformers' has."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transformer_core.attention import FullAttention, LinearAttention, LocalAttention
from transformer_core.attention_registry import (
    AttentionRegistry,
    Bool,
    Callable,
    Choice,
    EventDispatcherInstance,
    Float,
    Int,
    Optional,
    Registry,
    Spec,
)
from transformer_core.events import EventDispatcher


@pytest.mark.parametrize(("spec", "good", "canonical"), [
    (Int, 3, 3), (Int, np.int64(4), 4), (Int, torch.tensor(5), 5),
    (Float, 2, 2.0), (Float, 0.5, 0.5), (Bool, True, True), (Bool, 0, False),
    (Optional(Int, 7), None, 7), (Optional(Float), None, None),
    (Choice(["a", "b"]), "b", "b"), (EventDispatcherInstance, "key", "key"),
])
def test_specs_return_the_canonical_value(spec, good, canonical):
    value = spec.get(good)
    assert value == canonical and type(value) is type(canonical)
    assert spec.check(good)


@pytest.mark.parametrize(("spec", "bad"), [
    (Int, 2.5), (Int, "3"), (Int, True), (Int, None), (Float, "0.5"), (Float, None),
    (Bool, "yes"), (Callable, "elu"), (Choice(["a"]), "c"), (EventDispatcherInstance, 3),
    (Optional(Int), 1.5),
])
def test_specs_reject_with_value_error(spec, bad):
    with pytest.raises(ValueError):
        spec.get(bad)
    assert not spec.check(bad)


def test_spec_equality_decides_whether_a_parameter_can_be_shared():
    assert Optional(Float, 0.1) == Optional(Float, 0.1) != Optional(Float, 0.2)
    assert Choice([1, 2]) == Choice([1, 2]) and Int != Spec(int, "Int")
    dispatcher = EventDispatcher()
    assert EventDispatcherInstance.get(dispatcher) is dispatcher


def test_register_and_look_up():
    registry = Registry()

    class Mine:
        def __init__(self, width, event_dispatcher=""):
            self.width = width

    registry.register("mine", Mine, [("width", Int),
                                     ("event_dispatcher", Optional(EventDispatcherInstance, ""))])
    assert "mine" in registry and "other" not in registry
    assert registry["mine"] == (Mine, ["width", "event_dispatcher"])
    assert registry.keys == ["mine"] and registry.parameters == ["event_dispatcher", "width"]
    assert registry.validate_parameter("width", 3) == 3
    with pytest.raises(ValueError, match=r"'width' must be Int, got 'wide'"):
        registry.validate_parameter("width", "wide")


def test_register_rejects_a_taken_name_and_a_conflicting_spec():
    registry = Registry()
    registry.register("a", object, [("width", Int)])
    with pytest.raises(ValueError, match="'a' is already registered"):
        registry.register("a", object, [])
    with pytest.raises(ValueError, match="'width' is already registered with spec Int"):
        registry.register("b", object, [("width", Float)])
    assert "b" not in registry  # a failed registration leaves nothing behind
    registry.register("c", object, [("width", Int)])  # the same spec is shared
    with pytest.raises(ValueError, match="expected a Spec"):
        registry.register("d", object, [("width", int)])


def test_seed_attentions_register_with_the_seed_specs():
    """An external attention that declares the seed's specs for shared names must register."""
    assert AttentionRegistry["full"] == (
        FullAttention, ["softmax_temp", "attention_dropout", "event_dispatcher"])
    assert AttentionRegistry["linear"][0] is LinearAttention
    assert AttentionRegistry["local"][0] is LocalAttention
    registry_copy = Registry()
    for name in ("full", "linear", "local"):
        cls, params = AttentionRegistry[name]
        registry_copy.register(name, cls, [(p, AttentionRegistry._parameters[p]) for p in params])
    seed_style = [("softmax_temp", Optional(Float)), ("attention_dropout", Optional(Float, 0.1)),
                  ("feature_map", Optional(Callable)), ("query_dimensions", Int),
                  ("local_context", Int),
                  ("event_dispatcher", Optional(EventDispatcherInstance, ""))]
    registry_copy.register("seed-style", object, seed_style)
