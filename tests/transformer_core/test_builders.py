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
