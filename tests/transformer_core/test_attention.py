"""Inner attentions and the AttentionLayer against plain float64 references.

Shape legend: N batch, L queries, S keys, H heads, E query/key dim, D value dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transformer_core.attention.full_attention as full_attention_module
from transformer_core.attention import (
    ATTENTION_TYPES,
    AttentionLayer,
    CausalLinearAttention,
    FullAttention,
    LinearAttention,
    LocalAttention,
)
from transformer_core.attention.local_attention import band_mask
from transformer_core.events import AttentionEvent, EventDispatcher, QKVEvent
from transformer_core.masking import FullMask, LengthMask, TriangularCausalMask

from .helpers import Recorder, reference_linear_attention, reference_softmax_attention

N, L, S, H, E, D = 2, 5, 7, 3, 4, 6
TOL = dict(rtol=1e-5, atol=1e-5)


def qkv(L_=L, S_=S, dtype=torch.float32, requires_grad=False):
    make = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return make(N, L_, H, E), make(N, S_, H, E), make(N, S_, H, D)


def run(attention, q, k, v, attn_mask=None, key_lengths=None):
    """Run ``attention`` with one listener; returns (output (N, L, H, D), its AttentionEvent)."""
    got = Recorder()
    attention.event_dispatcher.listen(AttentionEvent, got)
    out = attention(q, k, v, attn_mask, None, key_lengths)
    attention.event_dispatcher.remove(got)
    assert len(got.events) == 1
    return out, got.events[0]


def make(cls, *args, **kwargs):
    return cls(*args, **kwargs, event_dispatcher=EventDispatcher()).eval()


def random_dense_mask(L_, S_):
    mask = torch.rand(L_, S_) > 0.5
    mask[torch.arange(L_), torch.randint(3, (L_,))] = True  # every query sees an unpadded key
    return mask


# -- full attention -------------------------------------------------------------

LENGTHS = torch.tensor([3, S])

# name -> (L, S, attn_mask factory, key lengths or None, allowed (N, H, L, S) for the reference)
FULL_CASES = {
    "no-mask": (L, S, lambda: None, None, lambda m: None),
    "all-ones": (L, S, lambda: FullMask(L, S), LengthMask.full(N, S), lambda m: None),
    "dense": (L, S, lambda: FullMask(random_dense_mask(L, S)), None,
              lambda m: m.bool_matrix[None, None]),
    "lengths": (L, S, lambda: None, LengthMask(LENGTHS, S),
                lambda m: LengthMask(LENGTHS, S).bool_matrix[:, None, None]),
    "dense+lengths": (L, S, lambda: FullMask(random_dense_mask(L, S)), LengthMask(LENGTHS, S),
                      lambda m: m.bool_matrix[None, None]
                      & LengthMask(LENGTHS, S).bool_matrix[:, None, None]),
    "causal": (S, S, lambda: TriangularCausalMask(S), None,
               lambda m: m.bool_matrix[None, None]),
    "causal+lengths": (S, S, lambda: TriangularCausalMask(S), LengthMask(LENGTHS, S),
                       lambda m: m.bool_matrix[None, None]
                       & LengthMask(LENGTHS, S).bool_matrix[:, None, None]),
}


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("case", FULL_CASES)
def test_full_attention_matches_reference(case, use_fused):
    L_, S_, mask_factory, lengths, allowed = FULL_CASES[case]
    q, k, v = qkv(L_, S_)
    attn_mask = mask_factory()
    attention = make(FullAttention)
    attention.use_fused = use_fused
    out, event = run(attention, q, k, v, attn_mask, lengths)
    ref_out, ref_matrix = reference_softmax_attention(q, k, v, allowed(attn_mask))
    assert out.shape == (N, L_, H, D)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    assert event.shape == (N, H, L_, S_)
    torch.testing.assert_close(event.attention_matrix.double(), ref_matrix, **TOL)
    torch.testing.assert_close(event.attention_matrix.sum(-1), torch.ones(N, H, L_))


def test_softmax_temp_is_the_scale():
    q, k, v = qkv()
    attention = make(FullAttention, softmax_temp=0.3)
    out, event = run(attention, q, k, v)
    ref_out, ref_matrix = reference_softmax_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    torch.testing.assert_close(event.attention_matrix.double(), ref_matrix, **TOL)
    assert event.softmax_temp == 0.3


def test_fused_and_explicit_paths_agree():
    q, k, v = qkv(S, S)
    lengths = LengthMask(LENGTHS, S)
    fused, explicit = make(FullAttention), make(FullAttention)
    explicit.use_fused = False
    for mask in (None, TriangularCausalMask(S), FullMask(random_dense_mask(S, S))):
        out_f, ev_f = run(fused, q, k, v, mask, lengths)
        out_e, ev_e = run(explicit, q, k, v, mask, lengths)
        torch.testing.assert_close(out_f, out_e, **TOL)
        torch.testing.assert_close(ev_f.attention_matrix, ev_e.attention_matrix, **TOL)
        assert ev_f._matrix is not None and ev_e._matrix is not None


def test_logits_softmax_equals_matrix_with_masks():
    q, k, v = qkv(S, S)
    _, event = run(make(FullAttention), q, k, v, TriangularCausalMask(S), LengthMask(LENGTHS, S))
    logits = event.logits()
    assert torch.isneginf(logits[0, :, -1, 3:]).all()  # padded keys of sample 0
    assert torch.isneginf(logits[1, :, 0, 1:]).all()  # the future of query 0
    torch.testing.assert_close(torch.softmax(logits, -1), event.attention_matrix)
    torch.testing.assert_close(torch.softmax(event.logits(1, [0, 2]), -1),
                               event.attention(1, [0, 2]))


# -- lazy and slice paths -----------------------------------------------------------


@pytest.fixture
def count_logits(monkeypatch):
    """Record the (n, h, L, S) shape of every matrix slice full attention computes."""
    shapes: list[tuple[int, ...]] = []
    original = full_attention_module.softmax_logits

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(full_attention_module, "softmax_logits", counting)
    return shapes


def test_matrix_is_not_computed_unless_read(count_logits):
    q, k, v = qkv()
    _, event = run(make(FullAttention), q, k, v)
    assert count_logits == [] and event._matrix is None
    matrix = event.attention_matrix
    assert count_logits == [(N, H, L, S)]
    assert event.attention_matrix is matrix and len(count_logits) == 1  # cached


def test_slice_computes_only_the_slice(count_logits):
    q, k, v = qkv()
    lengths = LengthMask(LENGTHS, S)
    _, event = run(make(FullAttention), q, k, v, None, lengths)
    ref = reference_softmax_attention(q, k, v, lengths.bool_matrix[:, None, None])[1]
    got = event.attention(sample=0, heads=[0, 2])
    assert count_logits == [(1, 2, L, S)] and event._matrix is None
    torch.testing.assert_close(got.double(), ref[0][[0, 2]], **TOL)
    torch.testing.assert_close(event.attention(sample=1, heads=slice(None)).double(), ref[1],
                               **TOL)
    torch.testing.assert_close(event.attention(sample=1, heads=2).double(), ref[1][2], **TOL)
    torch.testing.assert_close(event.attention(heads=1).double(), ref[:, 1], **TOL)
    torch.testing.assert_close(event.attention().double(), ref, **TOL)
    assert event._matrix is None
    for bad in (dict(sample=2), dict(sample=0, heads=[H]), dict(heads=-H - 1)):
        with pytest.raises(IndexError):
            event.attention(**bad)


@pytest.mark.parametrize("sample", [0, 1, [1, 0], slice(None), None])
@pytest.mark.parametrize("heads", [1, [2, 0], slice(1, None), None])
def test_slice_equals_indexing_matrix_for_every_attention(sample, heads):
    q, k, v = qkv(S, S)
    lengths = LengthMask(LENGTHS, S)
    for attention in (make(FullAttention), make(LocalAttention, 3), make(LinearAttention, E),
                      make(CausalLinearAttention, E, chunk_size=3)):
        _, event = run(attention, q, k, v, None, lengths)
        got = event.attention(sample=sample, heads=heads)
        matrix = event.attention_matrix
        s = slice(None) if sample is None else sample
        h = slice(None) if heads is None else heads
        expected = matrix[s][h] if isinstance(sample, int) else matrix[s][:, h]
        torch.testing.assert_close(got, expected, **TOL)


def test_listener_that_reads_nothing_costs_no_matrix(count_logits):
    dispatcher = EventDispatcher()
    dispatcher.listen(AttentionEvent, lambda ev: None)
    attention = FullAttention(event_dispatcher=dispatcher).eval()
    attention(*qkv())
    assert count_logits == []


# -- zero cost when nobody listens --------------------------------------------------


def test_no_listener_builds_no_event_and_uses_the_fused_kernel(monkeypatch, count_logits,
                                                             make_encoder):
    built = []
    original_init = AttentionEvent.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(AttentionEvent, "__init__", counting_init)
    sdpa_calls = []
    original_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        sdpa_calls.append(args[0].shape)
        return original_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    net = make_encoder(n_layers=3)
    with torch.no_grad():
        net(torch.randn(2, 6, 8))
    assert built == [] and count_logits == []
    assert sdpa_calls == [(2, 2, 6, 4)] * 3  # (N, H, L, E), one per layer
    net.layers[0].attention.event_dispatcher.listen(QKVEvent, lambda ev: None)
    with torch.no_grad():
        net(torch.randn(2, 6, 8))
    # a listener on the dispatcher makes events, but nobody reads a matrix: none is built
    assert len(built) == 3 and count_logits == []
    assert len(sdpa_calls) == 6


def test_output_is_the_same_with_and_without_a_listener(make_encoder, dispatcher):
    x = torch.randn(2, 6, 8)
    for attention_type in ATTENTION_TYPES:
        net = make_encoder(attention_type=attention_type, local_context=3, clusters=2, topk=3,
                           chunk_size=2)
        mask = TriangularCausalMask(6) if "causal" in attention_type else None
        with torch.no_grad():
            torch.manual_seed(1)  # the same hashes for the clustered and reformer attentions
            quiet = net(x, attn_mask=mask)
            dispatcher.listen(AttentionEvent, lambda ev: ev.attention_matrix)
            torch.manual_seed(1)
            loud = net(x, attn_mask=mask)
            dispatcher.clear()
        torch.testing.assert_close(quiet, loud, rtol=0, atol=1e-6, msg=attention_type)


# -- gradients and dropout --------------------------------------------------------


@pytest.mark.parametrize("cls", [FullAttention, LocalAttention, LinearAttention,
                                 CausalLinearAttention])
def test_gradcheck_through_the_matrix(cls):
    args = {FullAttention: (), LocalAttention: (2,), LinearAttention: (2,),
            CausalLinearAttention: (2,)}[cls]
    attention = make(cls, *args)
    lengths = LengthMask(torch.tensor([3, 2]), 3)

    def matrix_of(q, k):
        v = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
        return run(attention, q, k, v.expand(2, -1, -1, -1), None, lengths)[1].attention_matrix

    q = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(matrix_of, (q, k), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda q, k: run(attention, q, k, k, None, lengths)[1].attention(1, [0]), (q, k),
        fast_mode=True)


def test_gradients_reach_model_parameters_through_the_matrix(make_encoder, dispatcher):
    net = make_encoder()
    got = Recorder()
    dispatcher.listen(AttentionEvent, got)
    net(torch.randn(2, 4, 8))
    loss = sum((ev.attention_matrix ** 2).sum() for ev in got.events)
    loss.backward()
    weight = net.layers[0].attention.query_projection.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert net.layers[1].attention.key_projection.weight.grad.abs().sum() > 0
    assert net.layers[1].linear1.weight.grad is None  # only the matrix was differentiated


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "explicit"])
def test_matrix_is_taken_before_dropout(use_fused):
    q, k, v = qkv()
    attention = make(FullAttention, attention_dropout=0.5)
    attention.use_fused = use_fused
    eval_out, eval_event = run(attention, q, k, v)
    attention.train()
    train_out, train_event = run(attention, q, k, v)
    matrix = train_event.attention_matrix
    torch.testing.assert_close(matrix.sum(-1), torch.ones(N, H, L))
    torch.testing.assert_close(matrix, eval_event.attention_matrix)
    assert not torch.allclose(train_out, eval_out)  # dropout did act on the output


# -- linear attentions --------------------------------------------------------------


@pytest.mark.parametrize("lengths", [None, LengthMask(LENGTHS, S)], ids=["full", "lengths"])
def test_linear_attention_matches_reference(lengths):
    q, k, v = qkv()
    out, event = run(make(LinearAttention, E), q, k, v, FullMask(L, S), lengths)
    allowed = None if lengths is None else lengths.bool_matrix
    ref_out, ref_matrix = reference_linear_attention(q, k, v, allowed)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    assert event.attention_type == "linear" and event.shape == (N, H, L, S)
    torch.testing.assert_close(event.attention_matrix.double(), ref_matrix, **TOL)
    torch.testing.assert_close(event.attention_matrix.sum(-1), torch.ones(N, H, L))
    torch.testing.assert_close(torch.softmax(event.logits(), -1), event.attention_matrix, **TOL)
    if lengths is not None:
        assert (event.attention_matrix[0, :, :, 3:] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 2, 64])
@pytest.mark.parametrize("mask", [None, TriangularCausalMask(S)], ids=["none", "causal"])
@pytest.mark.parametrize("lengths", [None, LengthMask(LENGTHS, S)], ids=["full", "lengths"])
def test_causal_linear_attention_matches_reference(chunk_size, mask, lengths):
    q, k, v = qkv(S, S)
    attention = make(CausalLinearAttention, E, chunk_size=chunk_size)
    out, event = run(attention, q, k, v, mask, lengths)
    allowed = None if lengths is None else lengths.bool_matrix
    ref_out, ref_matrix = reference_linear_attention(q, k, v, allowed, causal=True)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    matrix = event.attention_matrix
    torch.testing.assert_close(matrix.double(), ref_matrix, **TOL)
    assert (matrix.triu(1) == 0).all()  # lower-triangular
    torch.testing.assert_close(matrix.sum(-1), torch.ones(N, H, S))
    torch.testing.assert_close(torch.softmax(event.logits(), -1), matrix, **TOL)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_causal_linear_gradients_match_reference(chunk_size):
    # S = 7 positions in chunks of 3: a padded last chunk; 64: one chunk
    q, k, v = (t.double().requires_grad_() for t in qkv(S, S))
    weight = torch.randn(N, S, H, D, dtype=torch.float64)
    allowed = LengthMask(LENGTHS, S)
    out = make(CausalLinearAttention, E, chunk_size=chunk_size)(q, k, v, None, None, allowed)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_out, _ = reference_linear_attention(q, k, v, allowed.bool_matrix, causal=True)
    want = torch.autograd.grad((ref_out * weight).sum(), (q, k, v))
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, **TOL)


def test_linear_attentions_are_lazy(monkeypatch):
    import transformer_core.attention.linear_attention as linear_module

    calls = []
    original = linear_module.kernel_matrix
    monkeypatch.setattr(linear_module, "kernel_matrix",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v = qkv(S, S)
    for attention in (make(LinearAttention, E), make(CausalLinearAttention, E)):
        _, event = run(attention, q, k, v)
        assert calls == [] and event._matrix is None
        event.attention(0, 1)
        assert len(calls) == 1 and event._matrix is None
        calls.clear()


def test_linear_attention_mask_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask"):
        make(LinearAttention, E)(q, k, v, FullMask(torch.ones(L, S, dtype=torch.bool).tril()))
    q, k, v = qkv(S, S)
    with pytest.raises(RuntimeError, match="attn_mask"):  # the seed's callers catch this
        make(CausalLinearAttention, E)(q, k, v, FullMask(torch.eye(S, dtype=torch.bool)))


@pytest.mark.parametrize(("L_", "S_"), [(5, 7), (7, 5)], ids=["S>L", "S<L"])
def test_causal_linear_attention_with_as_many_or_more_keys(L_, S_):
    """Query i sees keys j <= i, whatever S is (as in fast-transformers)."""
    q, k, v = qkv(L_, S_)
    out, event = run(make(CausalLinearAttention, E, chunk_size=2), q, k, v)
    ref_out, ref_matrix = reference_linear_attention(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    assert out.is_contiguous() and event.shape == (N, H, L_, S_)
    torch.testing.assert_close(event.attention_matrix.double(), ref_matrix, **TOL)


# -- local attention ----------------------------------------------------------------


def test_band_mask():
    assert band_mask(4, 4, 3).int().tolist() == [
        [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert band_mask(3, 3, 1).equal(torch.eye(3, dtype=torch.bool))


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_local_attention_matches_reference(use_fused, causal):
    q, k, v = qkv(S, S)
    lengths = LengthMask(LENGTHS, S)
    attention = make(LocalAttention, 3)
    attention.use_fused = use_fused
    mask = TriangularCausalMask(S) if causal else None
    out, event = run(attention, q, k, v, mask, lengths)
    allowed = band_mask(S, S, 3)
    if causal:
        allowed = allowed & TriangularCausalMask(S).bool_matrix
    allowed = allowed[None, None] & lengths.bool_matrix[:, None, None]
    ref_out, ref_matrix = reference_softmax_attention(q, k, v, allowed)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    torch.testing.assert_close(event.attention_matrix.double(), ref_matrix, **TOL)
    assert (event.attention_matrix[:, :, ~band_mask(S, S, 3)] == 0).all()
    assert event.attention_type == "local"


def test_local_context_must_be_positive():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="local_context"):
            LocalAttention(bad)


# -- AttentionLayer -----------------------------------------------------------------


def test_attention_layer_projections_and_qkv_event():
    dispatcher = EventDispatcher()
    layer = AttentionLayer(FullAttention(event_dispatcher=dispatcher), 12, 3, d_keys=2,
                           d_values=5, event_dispatcher=dispatcher).eval()
    got = Recorder()
    dispatcher.listen(QKVEvent, got)
    x, memory = torch.randn(2, 4, 12), torch.randn(2, 6, 12)
    out = layer(x, memory, memory)
    assert out.shape == (2, 4, 12)
    (event,) = got.events
    assert event.source is layer
    assert event.queries.shape == (2, 4, 3, 2)
    assert event.keys.shape == (2, 6, 3, 2)
    assert event.values.shape == (2, 6, 3, 5)
    torch.testing.assert_close(event.queries.reshape(2, 4, 6), layer.query_projection(x))
    torch.testing.assert_close(event.values.reshape(2, 6, 15), layer.value_projection(memory))
    # the reference: per-head softmax attention then the output projection
    ref, _ = reference_softmax_attention(event.queries, event.keys, event.values)
    expected = layer.out_projection(ref.float().reshape(2, 4, 15))
    torch.testing.assert_close(out, expected, **TOL)


def test_fused_self_attention_projection_equals_separate_ones():
    layer = AttentionLayer(FullAttention(event_dispatcher=EventDispatcher()), 8, 2).eval()
    x = torch.randn(2, 5, 8)
    fused = layer(x, x, x)  # one matmul for q, k and v
    separate = layer(x, x.clone(), x.clone())  # three
    torch.testing.assert_close(fused, separate, **TOL)


def test_attention_layer_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_heads"):
        AttentionLayer(FullAttention(), 8, 0)
