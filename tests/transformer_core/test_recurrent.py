"""Recurrent (step-by-step) models against the batch models with the same weights.

Shape legend: N batch, L queries, S keys, H heads, E query/key dim, D value dim.
"""

from __future__ import annotations

import pytest
import torch

from tests.transformer_core.helpers import Recorder
from transformer_core.attention import (
    AttentionLayer,
    CausalLinearAttention,
    FullAttention,
    LinearAttention,
)
from transformer_core.attention_registry import (
    RecurrentAttentionRegistry,
    RecurrentCrossAttentionRegistry,
)
from transformer_core.builders import RecurrentEncoderBuilder, TransformerEncoderBuilder
from transformer_core.events import AttentionEvent, EventDispatcher, IntermediateOutput, QKVEvent
from transformer_core.feature_maps import Favor
from transformer_core.masking import LengthMask, TriangularCausalMask
from transformer_core.recurrent.attention import (
    RecurrentAttentionLayer,
    RecurrentCrossAttentionLayer,
    RecurrentCrossFullAttention,
    RecurrentCrossLinearAttention,
    RecurrentFullAttention,
    RecurrentLinearAttention,
)
from transformer_core.recurrent.attention.self_attention import RecurrentLinearState
from transformer_core.recurrent.transformers import (
    RecurrentTransformerDecoder,
    RecurrentTransformerDecoderLayer,
    RecurrentTransformerEncoder,
    RecurrentTransformerEncoderLayer,
)
from transformer_core.transformers import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

N, L, S, H, E, D_MODEL = 3, 9, 7, 2, 4, 8

# name -> (batch self-attention, recurrent self-attention, batch cross, recurrent cross)
KINDS = {
    "full": (FullAttention, RecurrentFullAttention, FullAttention, RecurrentCrossFullAttention),
    "linear": (
        lambda **kw: CausalLinearAttention(E, **kw),
        lambda **kw: RecurrentLinearAttention(E, **kw),
        lambda **kw: LinearAttention(E, **kw),
        lambda **kw: RecurrentCrossLinearAttention(E, **kw),
    ),
}


def encoders(kind: str, dispatcher: EventDispatcher, n_layers: int = 2):
    """A batch encoder and its recurrent twin with the same weights (eval mode)."""
    batch_att, rec_att, _, _ = KINDS[kind]
    batch = TransformerEncoder([
        TransformerEncoderLayer(AttentionLayer(batch_att(event_dispatcher=dispatcher), D_MODEL, H),
                                D_MODEL, 16, activation="gelu")
        for _ in range(n_layers)
    ], torch.nn.LayerNorm(D_MODEL)).eval()
    rec = RecurrentTransformerEncoder([
        RecurrentTransformerEncoderLayer(
            RecurrentAttentionLayer(rec_att(event_dispatcher=dispatcher), D_MODEL, H,
                                    event_dispatcher=dispatcher),
            D_MODEL, 16, activation="gelu", event_dispatcher=dispatcher)
        for _ in range(n_layers)
    ], torch.nn.LayerNorm(D_MODEL)).eval()
    rec.load_state_dict(batch.state_dict())
    return batch, rec


def decoders(kind: str, dispatcher: EventDispatcher, n_layers: int = 2):
    """A batch decoder and its recurrent twin with the same weights (eval mode)."""
    batch_self, rec_self, batch_cross, rec_cross = KINDS[kind]
    batch = TransformerDecoder([
        TransformerDecoderLayer(
            AttentionLayer(batch_self(event_dispatcher=dispatcher), D_MODEL, H),
            AttentionLayer(batch_cross(event_dispatcher=dispatcher), D_MODEL, H), D_MODEL, 16)
        for _ in range(n_layers)
    ]).eval()
    rec = RecurrentTransformerDecoder([
        RecurrentTransformerDecoderLayer(
            RecurrentAttentionLayer(rec_self(event_dispatcher=dispatcher), D_MODEL, H),
            RecurrentCrossAttentionLayer(rec_cross(event_dispatcher=dispatcher), D_MODEL, H),
            D_MODEL, 16)
        for _ in range(n_layers)
    ]).eval()
    rec.load_state_dict(batch.state_dict())  # strict: the parameter names are the same
    return batch, rec


def run_encoder(rec, x):
    """x (N, L, d) fed one position per call -> (N, L, d)."""
    state, outs = None, []
    for i in range(x.shape[1]):
        y, state = rec(x[:, i], state=state)
        outs.append(y)
    return torch.stack(outs, dim=1)


def attention_events(recorder: Recorder) -> list[AttentionEvent]:
    return [e for e in recorder.events if isinstance(e, AttentionEvent)]


@pytest.mark.parametrize("kind", ["full", "linear"])
def test_recurrent_encoder_equals_causal_batch_encoder(kind, dispatcher):
    batch, rec = encoders(kind, dispatcher)
    x = torch.randn(N, L, D_MODEL)
    expected = batch(x, attn_mask=TriangularCausalMask(L))
    torch.testing.assert_close(run_encoder(rec, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["full", "linear"])
def test_recurrent_decoder_equals_batch_decoder_with_padded_memory(kind, dispatcher):
    batch, rec = decoders(kind, dispatcher)
    x, memory = torch.randn(N, L, D_MODEL), torch.randn(N, S, D_MODEL)
    lengths = LengthMask(torch.tensor([S, 3, 5]), max_len=S)
    expected = batch(x, memory, x_mask=TriangularCausalMask(L), memory_length_mask=lengths)
    state, outs = None, []
    for i in range(L):
        y, state = rec(x[:, i], memory, memory_length_mask=lengths, state=state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["full", "linear"])
def test_recurrent_attention_rows_equal_batch_causal_matrix_rows(kind, dispatcher):
    batch, rec = encoders(kind, dispatcher, n_layers=1)
    x = torch.randn(N, L, D_MODEL)
    seen = Recorder()
    dispatcher.listen(AttentionEvent, seen)
    batch(x, attn_mask=TriangularCausalMask(L))
    (full_event,) = attention_events(seen)
    matrix = full_event.attention_matrix  # (N, H, L, L)
    seen.events.clear()
    run_encoder(rec, x)
    rows = attention_events(seen)
    assert len(rows) == L
    for i, event in enumerate(rows):
        assert event.shape == (N, H, 1, i + 1)
        assert event.role == "self"
        torch.testing.assert_close(event.attention_matrix, matrix[:, :, i : i + 1, : i + 1],
                                   atol=1e-6, rtol=0)
        # a lazy slice equals the same slice of the whole row
        torch.testing.assert_close(event.attention(sample=1, heads=[1]),
                                   matrix[1, 1:2, i : i + 1, : i + 1], atol=1e-6, rtol=0)
        torch.testing.assert_close(event.sample_copy(2).attention_matrix,
                                   matrix[2:3, :, i : i + 1, : i + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["full", "linear"])
def test_recurrent_cross_rows_equal_batch_cross_rows_padded_keys_at_zero(kind, dispatcher):
    batch, rec = decoders(kind, dispatcher, n_layers=1)
    x, memory = torch.randn(N, L, D_MODEL), torch.randn(N, S, D_MODEL)
    lengths = LengthMask(torch.tensor([S, 3, 5]), max_len=S)
    seen = Recorder()
    dispatcher.listen(lambda e: isinstance(e, AttentionEvent) and e.is_cross, seen)
    batch(x, memory, x_mask=TriangularCausalMask(L), memory_length_mask=lengths)
    matrix = seen.events[0].attention_matrix  # (N, H, L, S)
    seen.events.clear()
    state = None
    for i in range(L):
        _, state = rec(x[:, i], memory, memory_length_mask=lengths, state=state)
    assert len(seen.events) == L
    for i, event in enumerate(seen.events):
        assert event.shape == (N, H, 1, S)
        torch.testing.assert_close(event.attention_matrix, matrix[:, :, i : i + 1],
                                   atol=1e-6, rtol=0)
    assert seen.events[0].attention_matrix[1, :, :, 3:].abs().max() == 0  # padded memory


@pytest.mark.parametrize("attention", [RecurrentFullAttention, lambda: RecurrentLinearAttention(E),
                                       RecurrentCrossFullAttention,
                                       lambda: RecurrentCrossLinearAttention(E)])
def test_no_listener_builds_no_event(attention, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an event was built with no listener")

    monkeypatch.setattr("transformer_core.recurrent.attention._events.AttentionEvent", refuse)
    att = attention().eval()
    q, k, v = torch.rand(N, H, E), torch.rand(N, S, H, E), torch.rand(N, S, H, 5)
    state = None
    for _ in range(3):
        if att.role == "cross":
            out, state = att(q, k, v, None, state=state)
        else:
            out, state = att(q, k[:, 0], v[:, 0], state)
    assert out.shape == (N, H, 5)


def test_linear_state_keeps_no_keys_without_listener_and_records_while_listening(dispatcher):
    att = RecurrentLinearAttention(E, event_dispatcher=dispatcher).eval()
    q, k, v = torch.rand(L, N, H, E), torch.rand(L, N, H, E), torch.rand(L, N, H, 5)
    state = None
    for i in range(4):
        _, state = att(q[i], k[i], v[i], state)
    assert isinstance(state, RecurrentLinearState)
    assert state.steps == 4 and state.recorded == ()
    seen = Recorder()
    dispatcher.listen(AttentionEvent, seen)
    for i in range(4, L):
        _, state = att(q[i], k[i], v[i], state)
    assert len(state.recorded) == L - 4
    # Keys folded in before anyone listened: weight 0; the rest as the batch attention.
    dispatcher2 = EventDispatcher()
    batch = CausalLinearAttention(E, event_dispatcher=dispatcher2).eval()
    whole = Recorder()
    dispatcher2.listen(AttentionEvent, whole)
    batch(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), TriangularCausalMask(L))
    matrix = whole.events[0].attention_matrix  # (N, H, L, L)
    last = seen.events[-1].attention_matrix  # (N, H, 1, L)
    assert last.shape == (N, H, 1, L)
    assert last[..., :4].abs().max() == 0
    torch.testing.assert_close(last[..., 4:], matrix[:, :, L - 1 :, 4:], atol=1e-6, rtol=0)


def test_recurrent_layers_dispatch_step_qkv_and_outputs(dispatcher):
    _, rec = encoders("full", dispatcher, n_layers=2)
    seen = Recorder()
    dispatcher.listen(lambda e: isinstance(e, QKVEvent | IntermediateOutput), seen)
    y, _ = rec(torch.randn(N, D_MODEL))
    qkv = [e for e in seen.events if isinstance(e, QKVEvent)]
    outputs = [e for e in seen.events if isinstance(e, IntermediateOutput)]
    assert [tuple(e.queries.shape) for e in qkv] == [(N, 1, H, D_MODEL // H)] * 2
    assert [tuple(e.x.shape) for e in outputs] == [(N, 1, D_MODEL)] * 2
    # the last layer's output, before the final norm
    torch.testing.assert_close(rec.norm(outputs[-1].x[:, 0]), y)


def test_deprecated_memory_keyword_warns_and_equals_state():
    att = RecurrentAttentionLayer(RecurrentFullAttention(), D_MODEL, H).eval()
    x = torch.randn(N, D_MODEL)
    _, state = att(x, x, x)
    expected, _ = att(x, x, x, state=state)
    with pytest.warns(DeprecationWarning, match="'memory' is deprecated"):
        got, _ = att(x, x, x, memory=state)
    torch.testing.assert_close(got, expected)
    encoder = RecurrentTransformerEncoder([RecurrentTransformerEncoderLayer(att, D_MODEL)]).eval()
    _, enc_state = encoder(x)
    with pytest.warns(DeprecationWarning):
        encoder(x, memory=enc_state)


@pytest.mark.parametrize("attention", [RecurrentFullAttention, lambda: RecurrentLinearAttention(E)])
def test_changing_batch_size_mid_sequence_is_a_value_error(attention):
    att = attention()
    _, state = att(torch.rand(N, H, E), torch.rand(N, H, E), torch.rand(N, H, E))
    with pytest.raises(ValueError, match="batch"):
        att(torch.rand(N + 1, H, E), torch.rand(N + 1, H, E), torch.rand(N + 1, H, E), state)


def test_cross_layer_projects_memory_once_and_needs_it_first():
    layer = RecurrentCrossAttentionLayer(RecurrentCrossFullAttention(), D_MODEL, H).eval()
    x, memory = torch.randn(N, D_MODEL), torch.randn(N, S, D_MODEL)
    with pytest.raises(ValueError, match="keys and values"):
        layer(x, None, None, None)
    y1, state = layer(x, memory, memory, None)
    y2, _ = layer(x, None, None, None, state=state)  # the memory is in the state
    torch.testing.assert_close(y1, y2)


def test_recurrent_encoder_rejects_a_sequence_and_a_wrong_state():
    _, rec = encoders("full", EventDispatcher())
    with pytest.raises(ValueError, match="one position"):
        rec(torch.randn(N, L, D_MODEL))
    with pytest.raises(ValueError, match="one entry per layer"):
        rec(torch.randn(N, D_MODEL), state=[None])


def test_random_feature_map_is_drawn_once_per_sequence_and_matches_batch():
    """Favor draws new features at a sequence's first step only: the same draw gives
    the batch causal-linear attention's outputs."""
    factory = Favor.factory(n_dims=16)
    batch, rec = CausalLinearAttention(E, factory).eval(), RecurrentLinearAttention(E, factory)
    q, k, v = torch.randn(N, L, H, E), torch.randn(N, L, H, E), torch.randn(N, L, H, 5)
    torch.manual_seed(1)
    expected = batch(q, k, v, TriangularCausalMask(L))
    torch.manual_seed(1)
    state, outs = None, []
    for i in range(L):
        out, state = rec(q[:, i], k[:, i], v[:, i], state)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), expected, atol=1e-5, rtol=1e-5)


def test_recurrent_linear_attention_trains():
    att = RecurrentLinearAttention(E).train()
    q = torch.randn(N, L, H, E, requires_grad=True)
    state, total = None, 0
    for i in range(L):
        out, state = att(q[:, i], q[:, i], q[:, i], state)
        total = total + out.square().sum()
    total.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_registries_name_the_recurrent_attentions():
    assert RecurrentAttentionRegistry["full"][0] is RecurrentFullAttention
    assert RecurrentAttentionRegistry["linear"][0] is RecurrentLinearAttention
    assert RecurrentAttentionRegistry["causal-linear"][0] is RecurrentLinearAttention
    assert RecurrentCrossAttentionRegistry["full"][0] is RecurrentCrossFullAttention
    assert RecurrentCrossAttentionRegistry["linear"][0] is RecurrentCrossLinearAttention
    assert RecurrentAttentionRegistry["linear"][1] == [
        "query_dimensions", "feature_map", "eps", "event_dispatcher"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["full", "linear"])
def test_recurrent_decoder_on_cuda_equals_cpu_and_events_stay_on_the_device(kind, dispatcher):
    _, rec = decoders(kind, dispatcher)
    x, memory = torch.randn(N, L, D_MODEL), torch.randn(N, S, D_MODEL)
    lengths = LengthMask(torch.tensor([S, 3, 5]), max_len=S)
    expected, state = [], None
    for i in range(L):
        y, state = rec(x[:, i], memory, memory_length_mask=lengths, state=state)
        expected.append(y)
    rec = rec.cuda()
    seen = Recorder()
    dispatcher.listen(AttentionEvent, seen)
    cuda_lengths = LengthMask(lengths.lengths.cuda(), max_len=S)
    got, state = [], None
    for i in range(L):
        y, state = rec(x[:, i].cuda(), memory.cuda(), memory_length_mask=cuda_lengths,
                       state=state)
        got.append(y.cpu())
    torch.testing.assert_close(torch.stack(got, 1), torch.stack(expected, 1), atol=1e-4,
                               rtol=1e-4)
    assert all(e.attention_matrix.is_cuda for e in seen.events)
    assert seen.events[-2].shape == (N, H, 1, L)  # the last self-attention row


@pytest.mark.gpu
def test_random_feature_map_is_redrawn_on_the_device():
    att = RecurrentLinearAttention(E, Favor.factory(n_dims=16)).cuda()
    out, state = att(*(torch.randn(N, H, E, device="cuda") for _ in range(3)))
    assert att.feature_map.omega.is_cuda and out.is_cuda and state[0].is_cuda


def test_seed_documentation_example_recurrent_encoder_from_builder():
    """The seed's recurrent example (fewer layers): a built recurrent encoder fed its own
    output step after step, and the batch twin from the same weights agrees."""
    kwargs = dict(attention_type="linear", n_layers=2, n_heads=4,
                  feed_forward_dimensions=64, query_dimensions=8, value_dimensions=8)
    model = RecurrentEncoderBuilder.from_kwargs(**kwargs).get().eval()
    state, x = None, torch.rand(10, 4 * 8)
    for _ in range(20):
        x, state = model(x, state=state)
    assert x.shape == (10, 32) and torch.isfinite(x).all()
    batch = TransformerEncoderBuilder.from_kwargs(**{**kwargs, "attention_type": "causal-linear"})
    batch = batch.get().eval()
    batch.load_state_dict(model.state_dict())
    xs = torch.randn(3, 6, 32)
    torch.testing.assert_close(run_encoder(model, xs),
                               batch(xs, attn_mask=TriangularCausalMask(6)), atol=1e-5, rtol=0)
