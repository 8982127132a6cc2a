"""Builders: fast-transformers' parameter names, validation and what gets built."""

from __future__ import annotations

import pytest
import torch

from transformer_core.attention import (
    CausalLinearAttention,
    FullAttention,
    LinearAttention,
    LocalAttention,
)
from transformer_core.builders import TransformerDecoderBuilder, TransformerEncoderBuilder
from transformer_core.events import EventDispatcher
from transformer_core.feature_maps import ActivationFunctionFeatureMap
from transformer_core.masking import TriangularCausalMask
from transformer_core.transformers import TransformerDecoder, TransformerEncoder

SEED_PARAMETERS = dict(
    n_layers=2, n_heads=3, query_dimensions=5, value_dimensions=6, feed_forward_dimensions=20,
    attention_type="full", activation="gelu", dropout=0.2, attention_dropout=0.3,
    softmax_temp=0.5, final_normalization=False, event_dispatcher="builders-test",
    feature_map=None, local_context=7,
)


def test_every_seed_parameter_is_accepted_and_used():
    net = TransformerEncoderBuilder.from_kwargs(**SEED_PARAMETERS).get()
    assert isinstance(net, TransformerEncoder) and len(net.layers) == 2 and net.norm is None
    layer = net.layers[1]
    inner = layer.attention.inner_attention
    assert isinstance(inner, FullAttention)
    assert (inner.softmax_temp, inner.dropout_p) == (0.5, 0.3)
    assert layer.attention.n_heads == 3 and layer.attention.query_projection.out_features == 15
    assert layer.attention.value_projection.out_features == 18
    assert layer.linear1.out_features == 20 and layer.dropout.p == 0.2
    assert layer.activation is torch.nn.functional.gelu
    assert inner.event_dispatcher is EventDispatcher.get("builders-test")
    assert net(torch.randn(2, 4, 18)).shape == (2, 4, 18)  # d_model = n_heads * value_dims


def test_from_dictionary_and_attributes_agree():
    by_dict = TransformerEncoderBuilder.from_dictionary(SEED_PARAMETERS)
    by_attr = TransformerEncoderBuilder()
    for key, value in SEED_PARAMETERS.items():
        setattr(by_attr, key, value)
    for key, value in SEED_PARAMETERS.items():
        assert getattr(by_dict, key) == value == getattr(by_attr, key)
    assert TransformerEncoderBuilder().n_layers == 4  # the documented default
    with pytest.raises(AttributeError, match="no parameter 'nope'"):
        _ = TransformerEncoderBuilder().nope


@pytest.mark.parametrize("make", [
    lambda: TransformerEncoderBuilder.from_kwargs(n_layer=2),
    lambda: TransformerEncoderBuilder.from_dictionary({"n_layer": 2}),
    lambda: setattr(TransformerEncoderBuilder(), "n_layer", 2),
])
def test_unknown_key_names_it_and_lists_allowed(make):
    with pytest.raises(ValueError, match="'n_layer'") as info:
        make()
    message = str(info.value)
    for name in SEED_PARAMETERS:
        assert name in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("n_layers", 0, "positive int"), ("n_layers", 2.0, "positive int"),
     ("n_heads", True, "positive int"), ("dropout", 1.0, r"\[0, 1\)"),
     ("attention_dropout", -0.1, r"\[0, 1\)"), ("attention_type", "flash", "one of"),
     ("activation", "tanh", "one of"), ("softmax_temp", 0, "positive float"),
     ("final_normalization", 1, "a bool"), ("event_dispatcher", None, "EventDispatcher"),
     ("feature_map", "elu", "Callable"), ("local_context", -3, "positive int"),
     ("clusters", 2.5, "Int"), ("bits", 64, r"\[1, 63\]"), ("hash_bias", "yes", "Bool")],
)
def test_ill_typed_value_names_the_argument(key, value, expected):
    with pytest.raises(ValueError, match=rf"'{key}' must be .*{expected}.*got {value!r}"):
        TransformerEncoderBuilder.from_kwargs(**{key: value})


def test_strict_false_ignores_unknown_keys_but_checks_known_ones():
    builder = TransformerEncoderBuilder.from_kwargs(strict=False, n_layers=1, colour="blue")
    assert builder.n_layers == 1
    assert len(TransformerEncoderBuilder.from_dictionary({"x": 1}, strict=False).get().layers) == 4
    with pytest.raises(ValueError, match="n_layers"):
        TransformerEncoderBuilder.from_kwargs(strict=False, n_layers=-1)


@pytest.mark.parametrize(
    ("attention_type", "cls"),
    [("full", FullAttention), ("linear", LinearAttention),
     ("causal-linear", CausalLinearAttention), ("local", LocalAttention)],
)
def test_each_attention_type_builds_and_runs(attention_type, cls):
    feature_map = ActivationFunctionFeatureMap.factory(torch.nn.functional.softplus)
    net = TransformerEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=8, attention_type=attention_type, local_context=3,
        feature_map=feature_map, event_dispatcher=EventDispatcher(),
    ).get().eval()
    inner = net.layers[0].attention.inner_attention
    assert type(inner) is cls and inner.attention_type == attention_type
    if attention_type == "local":
        assert inner.local_context == 3
    if "linear" in attention_type:
        assert inner.feature_map.activation_function is torch.nn.functional.softplus
    mask = TriangularCausalMask(5) if attention_type == "causal-linear" else None
    out = net(torch.randn(2, 5, 8), attn_mask=mask)
    assert out.shape == (2, 5, 8) and torch.isfinite(out).all()


def test_d_model_mismatch_names_the_expected_shape():
    net = TransformerEncoderBuilder.from_kwargs(n_heads=4, value_dimensions=16).get()
    with pytest.raises(ValueError, match=r"expected shape \(N, L, 64\).*got \(2, 3, 63\)"):
        net(torch.randn(2, 3, 63))


def test_decoder_builder_prefixed_attention_parameters():
    net = TransformerDecoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
        feed_forward_dimensions=8, self_attention_type="causal-linear",
        cross_attention_type="local", cross_local_context=2, self_attention_dropout=0.0,
        event_dispatcher=EventDispatcher(),
    ).get().eval()
    assert isinstance(net, TransformerDecoder)
    layer = net.layers[0]
    assert isinstance(layer.self_attention.inner_attention, CausalLinearAttention)
    cross = layer.cross_attention.inner_attention
    assert isinstance(cross, LocalAttention) and cross.local_context == 2 and cross.role == "cross"
    out = net(torch.randn(2, 5, 8), torch.randn(2, 3, 8), x_mask=TriangularCausalMask(5))
    assert out.shape == (2, 5, 8)


def test_decoder_builder_errors():
    with pytest.raises(ValueError, match="'attention_type'.*allowed:.*cross_attention_type"):
        TransformerDecoderBuilder.from_kwargs(attention_type="full")
    with pytest.raises(ValueError, match="'cross_attention_type' cannot be 'causal-linear'"):
        TransformerDecoderBuilder.from_kwargs(cross_attention_type="causal-linear").get()


# -- the registry reaches the builders ---------------------------------------------------


class ScaledFull(FullAttention):
    """A user's attention: full attention with a temperature given as ``heat``."""

    attention_type = "scaled-full"

    def __init__(self, heat, sharp=False, event_dispatcher=""):
        super().__init__(softmax_temp=heat, attention_dropout=0.0,
                         event_dispatcher=event_dispatcher)
        self.sharp = sharp


@pytest.fixture
def scaled_full():
    """``scaled-full`` registered for one test, with typed parameters."""
    from transformer_core.attention_registry import (
        AttentionRegistry,
        Bool,
        EventDispatcherInstance,
        Float,
        Optional,
    )

    AttentionRegistry.register("scaled-full", ScaledFull, [
        ("heat", Float), ("sharp", Optional(Bool, False)),
        ("event_dispatcher", Optional(EventDispatcherInstance, ""))])
    yield
    for table in (AttentionRegistry._classes, AttentionRegistry._class_params):
        del table["scaled-full"]
    for name in ("heat", "sharp"):
        del AttentionRegistry._parameters[name]


def test_a_registered_attention_is_built_with_its_typed_parameters(scaled_full):
    dispatcher = EventDispatcher()
    net = TransformerEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
        attention_type="scaled-full", heat=2, sharp=True, event_dispatcher=dispatcher).get()
    inner = net.layers[0].attention.inner_attention
    assert type(inner) is ScaledFull and inner.softmax_temp == 2.0 and inner.sharp is True
    assert inner.event_dispatcher is dispatcher
    with pytest.raises(ValueError, match="'heat' must be Float, got 'hot'"):
        TransformerEncoderBuilder.from_kwargs(heat="hot")
    with pytest.raises(ValueError, match="'scaled-full' needs the parameter 'heat'"):
        TransformerEncoderBuilder.from_kwargs(attention_type="scaled-full").get()
    with pytest.raises(ValueError, match="'hea'.*allowed:.*heat"):
        TransformerEncoderBuilder.from_kwargs(hea=1.0)


def test_unknown_parameter_is_also_an_attribute_error():
    """fast-transformers' callers catch AttributeError when setting a parameter."""
    with pytest.raises(AttributeError, match="'dropout_rate'"):
        TransformerEncoderBuilder().dropout_rate = 0.1


def test_nested_attention_types():
    from transformer_core.attention import ConditionalFullAttention, ExactTopKAttention
    from transformer_core.builders import AttentionBuilder

    builder = AttentionBuilder.from_kwargs(length_limit=16, topk=5, softmax_temp=0.5)
    attention = builder.get("conditional-full:exact-topk")
    assert isinstance(attention, ConditionalFullAttention) and attention.length_limit == 16
    assert isinstance(attention.other_attention, ExactTopKAttention)
    assert attention.other_attention.topk == 5 and attention.full_attention.softmax_temp == 0.5
    with pytest.raises(TypeError):  # conditional-full needs the attention it decorates
        builder.get("conditional-full")
    with pytest.raises(ValueError, match="must build one attention"):
        builder.get("full,exact-topk")
    with pytest.raises(ValueError, match="'conditional-full:nope'"):
        builder.get("conditional-full:nope")
    assert builder.validate_attention_type("conditional-full:improved-clustered")
    assert not builder.validate_attention_type("conditional-full:")


def test_every_registered_attention_builds_into_an_encoder_that_runs():
    from transformer_core.builders import AttentionBuilder

    for attention_type in AttentionBuilder().available_attentions:
        if attention_type == "conditional-full":
            attention_type = "conditional-full:clustered"
        net = TransformerEncoderBuilder.from_kwargs(
            n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
            attention_type=attention_type, clusters=2, topk=3, chunk_size=2, local_context=3,
            length_limit=4, event_dispatcher=EventDispatcher()).get().eval()
        mask = TriangularCausalMask(6) if "causal" in attention_type else None
        out = net(torch.randn(2, 6, 8), attn_mask=mask)
        assert out.shape == (2, 6, 8) and torch.isfinite(out).all(), attention_type


def test_from_namespace_keeps_unset_options_and_get_names_them():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--n_layers", type=int)
    parser.add_argument("--n_heads", type=int)
    parser.add_argument("--clusters", type=int)
    parser.add_argument("--colour")
    builder = TransformerEncoderBuilder.from_namespace(parser.parse_args(["--n_heads", "3"]))
    assert builder.n_heads == 3 and builder.n_layers is None and builder.clusters is None
    with pytest.raises(ValueError, match="'n_layers' is None"):
        builder.get()
    with pytest.raises(ValueError, match="'colour'"):
        TransformerEncoderBuilder.from_namespace(parser.parse_args([]), strict=True)


def test_decoder_cross_attention_reads_a_memory_of_its_own_width():
    net = TransformerDecoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4, cross_n_heads=3,
        cross_value_dimensions=5, cross_query_dimensions=6, event_dispatcher=EventDispatcher(),
    ).get().eval()
    cross = net.layers[0].cross_attention
    assert cross.n_heads == 3 and cross.key_projection.in_features == 15
    assert cross.query_projection.out_features == 18 and cross.out_projection.out_features == 8
    assert net(torch.randn(2, 4, 8), torch.randn(2, 7, 15)).shape == (2, 4, 8)
    with pytest.raises(ValueError, match=r"memory: expected shape \(N, L, 15\)"):
        net(torch.randn(2, 4, 8), torch.randn(2, 7, 8))


def test_recurrent_builders_build_the_recurrent_classes():
    from transformer_core.builders import RecurrentDecoderBuilder, RecurrentEncoderBuilder
    from transformer_core.recurrent.transformers import (
        RecurrentTransformerDecoder,
        RecurrentTransformerEncoder,
    )

    options = dict(n_layers=1, n_heads=2, query_dimensions=4, value_dimensions=4,
                   event_dispatcher=EventDispatcher())
    encoder = RecurrentEncoderBuilder.from_kwargs(attention_type="linear", **options).get()
    assert isinstance(encoder, RecurrentTransformerEncoder)
    decoder = RecurrentDecoderBuilder.from_kwargs(self_attention_type="causal-linear",
                                                  **options).get()
    assert isinstance(decoder, RecurrentTransformerDecoder)
    with pytest.raises(ValueError, match="'attention_type' must be one of"):
        RecurrentEncoderBuilder.from_kwargs(attention_type="clustered")
