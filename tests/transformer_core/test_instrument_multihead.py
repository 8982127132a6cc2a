"""nn.MultiheadAttention, alone and in nn.Transformer*Layer: events equal the module's
own need_weights=True matrices, outputs and the fused fast path are untouched."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn
from torch.profiler import profile

from transformer_core.instrument import instrument

FAST_PATH = "aten::_transformer_encoder_layer_fwd"


def _record(sites) -> list:
    seen = []
    for site in sites:
        site.dispatcher.listen(lambda ev: True, seen.append)
    return seen


def _ops(fn) -> set[str]:
    with torch.no_grad(), profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _padding(N: int, L: int, lengths: list[int]) -> torch.Tensor:
    """(N, L) key_padding_mask in MHA's convention: True = padding."""
    return torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]


def _close_on_valid_rows(matrix, reference, padding) -> None:
    """Rows of padded queries are NaN-or-anything in the reference; compare the rest."""
    rows = ~padding[:, None, :, None].expand_as(matrix)  # (N, H, L, S)
    torch.testing.assert_close(matrix[rows], reference[rows], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("extra", [{}, {"add_bias_kv": True}, {"add_zero_attn": True},
                                   {"kdim": 6, "vdim": 5}])
def test_mha_events_equal_need_weights(batch_first, extra):
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **extra).eval()
    N, L, S = 3, 5, 4
    q = torch.randn(N, L, 8)
    kv_dim = extra.get("kdim", 8)
    k = torch.randn(N, S, kv_dim)
    v = torch.randn(N, S, extra.get("vdim", 8))
    padding = torch.zeros(N, S).masked_fill(_padding(N, S, [4, 2, 3]), float("-inf"))
    attn_mask = torch.randn(L, S)  # float masks, added to the logits
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    seen = _record(instrument(mha))
    with torch.no_grad():
        out = mha(q, k, v, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False)[0]
        ref_out, ref = mha(q, k, v, key_padding_mask=padding, attn_mask=attn_mask,
                           need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    assert len(seen) == 2
    event = seen[0]
    assert event.shape == tuple(ref.shape) and event.role == "self"
    torch.testing.assert_close(event.attention_matrix, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(event.attention(sample=1, heads=[1]), ref[1, [1]], atol=1e-5,
                               rtol=0)


def test_mha_unbatched_and_bool_causal_mask():
    mha = nn.MultiheadAttention(8, 4).eval()
    x = torch.randn(5, 8)  # (L, D), no batch
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = masked
    seen = _record(instrument(mha))
    with torch.no_grad():
        _, ref = mha(x, x, x, attn_mask=causal, average_attn_weights=False)
    torch.testing.assert_close(seen[0].attention_matrix[0], ref, atol=1e-5, rtol=0)
    assert bool(seen[0].attention_matrix.triu(1).eq(0).all())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_fast_path_kept_and_events_match(norm_first):
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first).eval()
    x = torch.randn(3, 6, 16)
    padding = _padding(3, 6, [6, 4, 5])
    with torch.no_grad():
        plain = encoder(x, src_key_padding_mask=padding)
    sites = instrument(encoder)
    assert [(s.name, s.kind, s.heads) for s in sites] == [
        ("layers.0.self_attn", "multihead", 4), ("layers.1.self_attn", "multihead", 4)]

    def run():
        return encoder(x, src_key_padding_mask=padding)

    assert FAST_PATH in _ops(run)  # nobody listening
    with torch.no_grad():
        assert torch.equal(run(), plain)
    seen = _record(sites)
    assert FAST_PATH in _ops(run)  # listening: q, k re-projected, the layer still fused
    with torch.no_grad():
        assert torch.equal(run(), plain)
        first = encoder.layers[0]
        h = first.norm1(x) if norm_first else x
        _, ref = first.self_attn(h, h, h, key_padding_mask=padding, need_weights=True,
                                 average_attn_weights=False)
    assert len(seen) == 4 and seen[0].source is first.self_attn
    _close_on_valid_rows(seen[2].attention_matrix, ref, padding)


def test_encoder_in_training_mode_emits_once_per_layer():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).train()
    seen = _record(instrument(encoder))
    encoder(torch.randn(2, 4, 8)).sum().backward()  # slow path: the layer calls self_attn
    assert [ev.source for ev in seen] == [m.self_attn for m in encoder.layers]


def test_decoder_layer_self_and_cross():
    layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    sites = instrument(layer)
    assert [(s.name, s.role) for s in sites] == [("self_attn", "self"),
                                                 ("multihead_attn", "cross")]
    seen = _record(sites)
    tgt, memory = torch.randn(2, 3, 8), torch.randn(2, 7, 8)
    with torch.no_grad():
        layer(tgt, memory, tgt_is_causal=True,
              tgt_mask=nn.Transformer.generate_square_subsequent_mask(3))
    seen = list(seen)  # the reference below is watched too
    with torch.no_grad():
        _, ref = layer.multihead_attn(layer.norm1(tgt + layer._sa_block(
            tgt, nn.Transformer.generate_square_subsequent_mask(3), None, True)),
            memory, memory, average_attn_weights=False)
    assert [ev.role for ev in seen] == ["self", "cross"]
    assert seen[1].shape == (2, 2, 3, 7)
    torch.testing.assert_close(seen[1].attention_matrix, ref, atol=1e-5, rtol=0)
    assert bool(seen[0].attention_matrix.triu(1).eq(0).all())


def test_instrument_twice_wraps_once_and_model_pickles():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    first, second = instrument(mha), instrument(mha)
    assert first[0].dispatcher is second[0].dispatcher
    seen = _record(first)
    x = torch.randn(1, 3, 8)
    mha(x, x, x)
    assert len(seen) == 1
    copy = pickle.loads(pickle.dumps(mha))
    torch.testing.assert_close(copy(x, x, x)[0], mha(x, x, x)[0])


def test_sample_copy_and_concat_read_as_the_event():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    seen = _record(instrument(mha))
    x = torch.randn(3, 4, 8)
    padding = _padding(3, 4, [4, 3, 2])
    with torch.no_grad():
        mha(x, x, x, key_padding_mask=padding)
    event = seen[0]
    copies = [event.sample_copy(n) for n in range(3)]
    joined = type(event).concat(copies)
    torch.testing.assert_close(joined.attention_matrix, event.attention_matrix)
    torch.testing.assert_close(copies[2].attention_matrix[0], event.attention(sample=2))


@pytest.mark.slow  # compiling takes seconds
# torch.compile imports code that uses torch.jit (deprecated) on its first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_encoder_graph_breaks_only_while_listening():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    sites = instrument(encoder)
    x = torch.randn(2, 5, 16)
    assert torch._dynamo.explain(encoder)(x).graph_break_count == 0
    seen = _record(sites)
    compiled = torch.compile(encoder)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), encoder(x))
    assert len(seen) == 4 and seen[0].shape == (2, 4, 5, 5)  # two calls, two layers
