"""Encoder and decoder layers and stacks: events, masks, shapes and errors."""

from __future__ import annotations

import pytest
import torch

from transformer_core.attention import AttentionLayer, FullAttention
from transformer_core.events import AttentionEvent, IntermediateOutput
from transformer_core.masking import LengthMask, TriangularCausalMask
from transformer_core.transformers import TransformerEncoder, TransformerEncoderLayer

from .helpers import Recorder


def test_encoder_dispatches_one_intermediate_output_per_layer(make_encoder, dispatcher):
    net = make_encoder(n_layers=3, final_normalization=False)
    got = Recorder()
    dispatcher.listen(IntermediateOutput, got)
    x = torch.randn(2, 5, 8)
    out = net(x)
    assert [ev.source for ev in got.events] == list(net.layers)
    assert all(ev.x.shape == (2, 5, 8) for ev in got.events)
    torch.testing.assert_close(got.events[-1].x, out)  # no final norm: last layer's output
    assert net.norm is None


def test_encoder_final_norm(make_encoder, dispatcher):
    net = make_encoder()
    got = Recorder()
    dispatcher.listen(IntermediateOutput, got)
    out = net(torch.randn(2, 5, 8))
    torch.testing.assert_close(out, net.norm(got.events[-1].x))


@pytest.mark.parametrize("attention_type", ["full", "local", "linear"])
def test_padding_does_not_change_valid_positions(make_encoder, attention_type):
    """A sequence padded to length 7 gives the same outputs as the sequence alone."""
    net = make_encoder(attention_type=attention_type, local_context=3)
    x = torch.randn(1, 4, 8)
    padded = torch.cat([x, torch.randn(1, 3, 8) * 100], dim=1)
    with torch.no_grad():
        alone = net(x)
        out = net(padded, length_mask=LengthMask(torch.tensor([4]), 7))
    torch.testing.assert_close(out[:, :4], alone, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "explicit"])
def test_local_attention_with_long_padding_stays_finite(make_encoder, use_fused):
    """Padded queries far from any valid key must not poison later layers with NaN."""
    net = make_encoder(attention_type="local", local_context=2, n_layers=3)
    for layer in net.layers:
        layer.attention.inner_attention.use_fused = use_fused
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        out = net(x, length_mask=LengthMask(torch.tensor([2, 10]), 10))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("attention_type", ["full", "local", "causal-linear"])
def test_causal_mask_hides_the_future(make_encoder, attention_type):
    net = make_encoder(attention_type=attention_type, local_context=4)
    x = torch.randn(1, 6, 8)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, 8)
    mask = TriangularCausalMask(6)
    with torch.no_grad():
        a, b = net(x, attn_mask=mask), net(changed, attn_mask=mask)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_encoder_layer_alone(dispatcher):
    layer = TransformerEncoderLayer(
        AttentionLayer(FullAttention(event_dispatcher=dispatcher), 8, 2,
                       event_dispatcher=dispatcher),
        8, event_dispatcher=dispatcher,
    ).eval()
    assert layer.linear1.out_features == 32  # d_ff defaults to 4 * d_model
    got = Recorder()
    dispatcher.listen(IntermediateOutput, got)
    out = layer(torch.randn(2, 3, 8))
    assert out.shape == (2, 3, 8) and got.events[0].x is out
    assert TransformerEncoder([layer]).layers[0] is layer


def test_bad_activation_is_rejected():
    attention = AttentionLayer(FullAttention(), 8, 2)
    with pytest.raises(ValueError, match="activation"):
        TransformerEncoderLayer(attention, 8, activation="swish")


@pytest.mark.parametrize("shape", [(2, 5, 9), (5, 8), (2, 5, 8, 1)])
def test_encoder_input_shape_error_names_expected_shape(make_encoder, shape):
    with pytest.raises(ValueError, match=r"x: expected shape \(N, L, 8\)"):
        make_encoder()(torch.randn(*shape))


# -- decoder ----------------------------------------------------------------------


def test_decoder_self_and_cross_events(make_decoder, dispatcher):
    net = make_decoder(n_layers=2)
    got = Recorder()
    dispatcher.listen(AttentionEvent, got)
    x, memory = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    out = net(x, memory, x_mask=TriangularCausalMask(4))
    assert out.shape == (2, 4, 8)
    assert [ev.role for ev in got.events] == ["self", "cross", "self", "cross"]
    assert [ev.is_cross for ev in got.events] == [False, True, False, True]
    assert [ev.shape for ev in got.events] == [(2, 2, 4, 4), (2, 2, 4, 6)] * 2
    assert got.events[1].source is net.layers[0].cross_attention.inner_attention
    assert got.events[0].source is net.layers[0].self_attention.inner_attention
    self_matrix = got.events[0].attention_matrix
    assert (self_matrix.triu(1) == 0).all()  # causal self-attention
    torch.testing.assert_close(got.events[1].attention_matrix.sum(-1), torch.ones(2, 2, 4))


def test_decoder_memory_length_mask(make_decoder):
    net = make_decoder()
    x, memory = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    padded = torch.cat([memory, torch.randn(1, 2, 8) * 50], dim=1)
    with torch.no_grad():
        alone = net(x, memory)
        masked = net(x, padded, memory_length_mask=LengthMask(torch.tensor([4]), 6))
    torch.testing.assert_close(masked, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("x_shape", "memory_shape", "match"),
    [((2, 4, 8), (2, 6, 7), r"memory: expected shape \(N, L, 8\)"),
     ((2, 4, 8), (6, 8), "memory: expected shape"),
     ((2, 4, 8), (3, 6, 8), "batch size 3"),
     ((2, 4, 5), (2, 6, 8), r"x: expected shape \(N, L, 8\)")],
)
def test_decoder_shape_errors(make_decoder, x_shape, memory_shape, match):
    with pytest.raises(ValueError, match=match):
        make_decoder()(torch.randn(*x_shape), torch.randn(*memory_shape))
