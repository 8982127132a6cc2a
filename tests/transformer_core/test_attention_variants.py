"""The seed's other attentions (exact-topk, conditional-full, clustered, improved-clustered,
causal-improved-clustered, reformer, aft-full, aft-simple) against float64 references
written plainly here, and their events: the matrix applied, built only when read.

Shape legend: N batch, L queries, S keys, H heads, E query/key dim, D value dim.
"""

from __future__ import annotations

import math

import pytest
import torch

import transformer_core.attention.clustered_attention as clustered_module
from transformer_core.attention import (
    AFTFullAttention,
    AFTSimpleAttention,
    ClusteredAttention,
    ConditionalFullAttention,
    ExactTopKAttention,
    FullAttention,
    ImprovedClusteredAttention,
    ImprovedClusteredCausalAttention,
    LinearAttention,
    ReformerAttention,
    UnsupportedMaskError,
)
from transformer_core.attention._clustering import blocks, from_blocks, lloyd, to_blocks
from transformer_core.events import AttentionEvent, EventDispatcher
from transformer_core.masking import FullMask, LengthMask, TriangularCausalMask

from .helpers import Recorder, reference_softmax_attention

N, L, H, E = 2, 8, 2, 4
TOL = dict(rtol=1e-5, atol=1e-5)
LENGTHS = LengthMask(torch.tensor([5, 8]), 8)


def qkv(L_=L, S_=L, D=E):
    return torch.randn(N, L_, H, E), torch.randn(N, S_, H, E), torch.randn(N, S_, H, D)


def make(cls, *args, **kwargs):
    return cls(*args, **kwargs, attention_dropout=0.0, event_dispatcher=EventDispatcher()).eval()


def run(attention, q, k, v, attn_mask=None, query_lengths=None, key_lengths=None):
    """(output (N, L, H, D), the one AttentionEvent dispatched)."""
    got = Recorder()
    attention.event_dispatcher.listen(AttentionEvent, got)
    out = attention(q, k, v, attn_mask, query_lengths, key_lengths)
    attention.event_dispatcher.remove(got)
    assert len(got.events) == 1 and out.is_contiguous()
    return out, got.events[0]


def applied(matrix, v):
    """matrix (N, H, L, S) @ values (N, S, H, D) -> (N, L, H, D)."""
    return torch.einsum("nhls,nshd->nlhd", matrix.double(), v.double())


def record(monkeypatch, module, name):
    """Record the return values of ``module.name`` (the random grouping of a forward)."""
    calls, original = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(module, name, wrapper)
    return calls


# -- exact top-k --------------------------------------------------------------------


@pytest.mark.parametrize("masks", ["none", "lengths", "causal"])
def test_exact_topk_matches_reference(masks):
    q, k, v = qkv()
    attn_mask = TriangularCausalMask(L) if masks == "causal" else None
    lengths = LENGTHS if masks == "lengths" else None
    out, event = run(make(ExactTopKAttention, topk=3), q, k, v, attn_mask, None, lengths)
    logits = torch.einsum("nlhe,nshe->nhls", q.double(), k.double()) / math.sqrt(E)
    allowed = torch.ones(N, 1, L, L, dtype=torch.bool)
    if attn_mask is not None:
        allowed = allowed & attn_mask.bool_matrix
    if lengths is not None:
        allowed = allowed & lengths.bool_matrix[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    ref = torch.zeros(N, H, L, L, dtype=torch.float64)
    for n, h, i in torch.cartesian_prod(torch.arange(N), torch.arange(H), torch.arange(L)):
        row = logits[n, h, i]
        top = row.argsort(descending=True)[:3]
        top = top[torch.isfinite(row[top])]
        ref[n, h, i, top] = torch.softmax(row[top], -1)
    torch.testing.assert_close(event.attention_matrix.double(), ref, **TOL)
    torch.testing.assert_close(out.double(), applied(ref, v), **TOL)
    assert ((event.attention_matrix > 0).sum(-1) <= 3).all()
    torch.testing.assert_close(event.attention(1, 0), event.attention_matrix[1, 0])


# -- conditional full ---------------------------------------------------------------


def test_conditional_full_runs_full_attention_when_short_and_the_other_when_long():
    dispatcher = EventDispatcher()
    other = LinearAttention(E, event_dispatcher=dispatcher)
    attention = ConditionalFullAttention(other, length_limit=8, attention_dropout=0.0,
                                         event_dispatcher=dispatcher).eval()
    got = Recorder()
    dispatcher.listen(AttentionEvent, got)
    q, k, v = qkv()
    out = attention(q, k, v)
    ref_out, ref_matrix = reference_softmax_attention(q, k, v)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    assert got.events[-1].source is attention.full_attention
    torch.testing.assert_close(got.events[-1].attention_matrix.double(), ref_matrix, **TOL)
    q, k, v = qkv(9, 9)
    out = attention(q, k, v)
    assert len(got.events) == 2 and got.events[-1].source is other
    torch.testing.assert_close(out, other(q, k, v))
    attention.role = "cross"
    assert other.role == attention.full_attention.role == "cross"


# -- clustering ---------------------------------------------------------------------


def reference_lloyd(codes, valid, clusters, iterations):
    """Plain Lloyd in Hamming space for one (sample, head): codes (L, B) in {0, 1}."""
    L_ = codes.shape[0]
    real = [i for i in range(L_) if valid[i]]
    C = min(clusters, L_)
    centroids = [codes[(c * len(real)) // C].clone() for c in range(C)]

    def assign():
        return [min(range(C), key=lambda c: ((codes[i] - centroids[c]).abs().sum(), c))
                for i in range(L_)]

    for _ in range(iterations):
        groups = assign()
        for c in range(C):
            members = [codes[i] for i in real if groups[i] == c]
            if members:
                centroids[c] = (torch.stack(members).mean(0) > 0.5).to(codes.dtype)
    return assign()


def test_lloyd_matches_plain_reference_and_ignores_padding():
    codes = (torch.rand(N, H, 12, 6) > 0.5).float()
    valid = torch.arange(12)[None, :] < torch.tensor([[9], [12]])
    got = lloyd(codes, valid, clusters=3, iterations=4)
    for n in range(N):
        for h in range(H):
            assert got[n, h].tolist() == reference_lloyd(codes[n, h], valid[n], 3, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lloyd_matches_reference_through_convergence_in_both_rankings(dtype):
    # bfloat16 cannot hold distance * clusters + index exactly: the ranking falls back
    # to min over distances; float64 ranks by the packed key. 30 iterations run well
    # past convergence, where lloyd stops early.
    torch.manual_seed(1)
    codes = (torch.rand(N, H, 40, 6) > 0.5).to(dtype)
    valid = torch.arange(40)[None, :] < torch.tensor([[31], [40]])
    for iterations in (0, 1, 30):
        got = lloyd(codes, valid, clusters=11, iterations=iterations)
        for n in range(N):
            for h in range(H):
                assert got[n, h].tolist() == reference_lloyd(codes[n, h].double(), valid[n],
                                                             11, iterations)


def test_blocks_hold_one_cluster_each_and_round_trip():
    # one cluster takes most queries, two are empty: blocks still hold <= size queries
    # of a single cluster, and every query comes back to its own row
    assign = torch.tensor([[[0] * 9 + [1, 3, 3], [2] * 12]])  # (N=1, H=2, L=12), C=4
    layout = blocks(assign, 4)
    assert layout.size == 3
    rows = torch.randn(1, 12, 2, 5)  # (N, L, H, X)
    packed = to_blocks(rows, layout)  # (P, size, 5)
    torch.testing.assert_close(from_blocks(packed, layout, (1, 12, 2)), rows)
    cluster_of_row = (assign + torch.tensor([[[0], [4]]])).transpose(1, 2).flatten()
    for b, cluster in enumerate(layout.cluster.tolist()):
        position = layout.position[b * 3:(b + 1) * 3]
        real = layout.source[b * 3:(b + 1) * 3][position >= 0]
        assert len(real) and (cluster_of_row[real] == cluster).all()
        assert (position[position >= 0] == real // 2).all()  # row = i H + h
    assert len(layout.cluster) == 3 + 1 + 1 + 4  # ceil(9/3) + 1 + 1 + ceil(12/3)


def test_clustering_separates_far_apart_groups(monkeypatch):
    centres = torch.tensor([[10.0, 0, 0, 0], [0, -10.0, 0, 0], [0, 0, 0, 10.0]])
    q = centres[torch.arange(12) % 3][None, :, None, :] + 0.01 * torch.randn(1, 12, 1, 4)
    attention = make(ClusteredAttention, clusters=3, bits=32)
    calls = record(monkeypatch, clustered_module, "lloyd")
    attention(q, q, q, None, None, None)
    groups = calls[0][0, 0].tolist()
    assert len(set(groups)) == 3
    assert all(groups[i] == groups[i % 3] for i in range(12))


def grouped_reference(q, k, assign, valid, scale, key_allowed):
    """Centroid attention per cluster: (centroid rows (N, H, L, S) of each query,
    centroid logits per query (N, H, L, S)), computed with loops over clusters."""
    q, k = q.double(), k.double()
    S = k.shape[1]
    rows = torch.zeros(N, H, q.shape[1], S, dtype=torch.float64)
    logits_rows = torch.zeros_like(rows)
    for n in range(N):
        for h in range(H):
            for c in assign[n, h].unique().tolist():
                members = (assign[n, h] == c).nonzero().flatten()
                real = [i for i in members.tolist() if valid is None or valid[n, i]]
                centroid = q[n, real, h].mean(0) if real else torch.zeros(E, dtype=q.dtype)
                logits = (k[n, :, h] @ centroid) * scale
                if key_allowed is not None:
                    logits = logits.masked_fill(~key_allowed[n], float("-inf"))
                rows[n, h, members] = torch.softmax(logits, -1)
                logits_rows[n, h, members] = logits
    return rows, logits_rows


@pytest.mark.parametrize("padded", [False, True])
def test_clustered_attention_matches_reference(monkeypatch, padded):
    q, k, v = qkv(L, 6)
    lengths = LENGTHS if padded else None
    key_lengths = LengthMask(torch.tensor([4, 6]), 6) if padded else None
    calls = record(monkeypatch, clustered_module, "lloyd")
    out, event = run(make(ClusteredAttention, clusters=3, bits=8), q, k, v, None, lengths,
                     key_lengths)
    valid = None if lengths is None else lengths.bool_matrix
    key_allowed = None if key_lengths is None else key_lengths.bool_matrix
    ref, _ = grouped_reference(q, k, calls[0], valid, 1 / math.sqrt(E), key_allowed)
    torch.testing.assert_close(event.attention_matrix.double(), ref, **TOL)
    torch.testing.assert_close(out.double(), applied(ref, v), **TOL)
    assert len({tuple(r) for r in event.attention(0, 0).tolist()}) <= 3  # one row per cluster


def improved_reference(q, k, assign, topk, scale, causal):
    """Plain improved clustered rows (N, H, L, S), one query at a time."""
    centroid_rows, centroid_logits = grouped_reference(q, k, assign, None, scale, None)
    rows = torch.zeros_like(centroid_rows)
    qd, kd = q.double(), k.double()
    for n, h, i in torch.cartesian_prod(torch.arange(N), torch.arange(H),
                                        torch.arange(q.shape[1])).tolist():
        top = centroid_logits[n, h, i].argsort(descending=True)[:topk]
        if causal:
            top = top[top <= i]
            if len(top):
                rows[n, h, i, top] = torch.softmax(kd[n, top, h] @ qd[n, i, h] * scale, -1)
            continue
        rows[n, h, i] = centroid_rows[n, h, i]
        mass = centroid_rows[n, h, i, top].sum()
        rows[n, h, i, top] = mass * torch.softmax(kd[n, top, h] @ qd[n, i, h] * scale, -1)
    return rows


@pytest.mark.parametrize("cls", [ImprovedClusteredAttention, ImprovedClusteredCausalAttention])
def test_improved_clustered_attentions_match_reference(monkeypatch, cls):
    causal = cls is ImprovedClusteredCausalAttention
    q, k, v = qkv()
    calls = record(monkeypatch, clustered_module, "lloyd")
    mask = TriangularCausalMask(L) if causal else None
    out, event = run(make(cls, clusters=3, bits=8, topk=3), q, k, v, mask)
    ref = improved_reference(q, k, calls[0], 3, 1 / math.sqrt(E), causal)
    torch.testing.assert_close(event.attention_matrix.double(), ref, **TOL)
    torch.testing.assert_close(out.double(), applied(ref, v), **TOL)
    if causal:
        assert (event.attention_matrix.triu(1) == 0).all()
    else:
        torch.testing.assert_close(event.attention_matrix.sum(-1), torch.ones(N, H, L))


@pytest.mark.parametrize("cls", [ImprovedClusteredAttention, ImprovedClusteredCausalAttention])
def test_improved_clustered_gradients_match_reference(monkeypatch, cls):
    # 24 queries in 4 clusters: clusters span several blocks; causal queries whose top
    # keys are all in the future have zero rows, and must not turn gradients into NaN
    causal = cls is ImprovedClusteredCausalAttention
    q, k, v = (t.double().requires_grad_() for t in qkv(24, 24))
    calls = record(monkeypatch, clustered_module, "lloyd")
    mask = TriangularCausalMask(24) if causal else None
    weight = torch.randn(N, 24, H, E, dtype=torch.float64)
    got = make(cls, clusters=4, bits=8, topk=3)(q, k, v, mask, None, None)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    ref = improved_reference(q, k, calls[0], 3, 1 / math.sqrt(E), causal)
    want = torch.autograd.grad((applied(ref, v) * weight).sum(), (q, k, v))
    for g, w in zip(grads, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **TOL)


def test_clustered_attentions_refuse_masks_they_cannot_apply():
    q, k, v = qkv()
    dense = FullMask(torch.rand(L, L) > 0.5)
    for attention in (make(ClusteredAttention, clusters=2), make(ImprovedClusteredAttention, 2)):
        with pytest.raises(UnsupportedMaskError, match="attn_mask"):
            attention(q, k, v, dense, None, None)
    with pytest.raises(RuntimeError, match="lower-triangular"):  # as the seed raises
        make(ImprovedClusteredCausalAttention, 2)(q, k, v, None, None, None)


# -- reformer -----------------------------------------------------------------------


def reformer_reference(q, v, orders, chunk, scale, masked, allowed_keys):
    """Plain LSH attention (N, H, L, L) averaged over rounds, given each round's sort
    order (N, H, P) and the (N, L) keys that may be attended."""
    qd = q.double()
    kd = qd / qd.norm(dim=-1, keepdim=True)
    L_ = q.shape[1]
    matrix = torch.zeros(N, H, L_, L_, dtype=torch.float64)
    for order in orders:
        for n, h in torch.cartesian_prod(torch.arange(N), torch.arange(H)).tolist():
            sorted_positions = order[n, h].tolist()
            for p, i in enumerate(sorted_positions):
                if i >= L_:
                    continue
                b = p // chunk
                window = sorted_positions[max(b - 1, 0) * chunk:(b + 1) * chunk]
                keys = [j for j in window if j < L_ and allowed_keys[n, j]]
                if masked and len(keys) > 1:
                    keys = [j for j in keys if j != i]
                if keys:
                    logits = kd[n, keys, h] @ qd[n, i, h] * scale
                    matrix[n, h, i, keys] += torch.softmax(logits, -1)
    return matrix / len(orders)


@pytest.mark.parametrize("masked", [False, True])
def test_reformer_matches_reference(monkeypatch, masked):
    q, _, v = qkv(7, 7)  # 7 positions in chunks of 2: one padded position
    calls = record(monkeypatch, ReformerAttention, "_sort")
    attention = make(ReformerAttention, chunk_size=2, bits=2, rounds=3, masked=masked)
    lengths = LengthMask(torch.tensor([5, 7]), 7)
    out, event = run(attention, q, torch.randn(1), v, None, None, lengths)
    ref = reformer_reference(q, v, calls, 2, 1 / math.sqrt(E), masked, lengths.bool_matrix)
    torch.testing.assert_close(event.attention_matrix.double(), ref, **TOL)
    torch.testing.assert_close(out.double(), applied(ref, v), **TOL)
    assert event.shape == (N, H, 7, 7)


def test_reformer_with_one_chunk_is_shared_qk_softmax_attention():
    q, _, v = qkv()
    out, event = run(make(ReformerAttention, chunk_size=L, rounds=2), q, None, v)
    k = q / q.norm(dim=-1, keepdim=True)
    ref_out, ref_matrix = reference_softmax_attention(q, k, v)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    torch.testing.assert_close(event.attention_matrix.double(), ref_matrix, **TOL)


# -- AFT ----------------------------------------------------------------------------


def aft_reference(q, k, v, bias):
    """Per-channel AFT weights (N, H, L, S, D) and output (N, L, H, D) from a position
    bias (L, S) with -inf where masked; keys masked by -inf in ``k`` itself."""
    qd, kd, vd = q.double(), k.double(), v.double()
    logits = kd.permute(0, 2, 1, 3)[:, :, None] + bias.double()[None, None, :, :, None]
    weights = torch.softmax(logits, dim=3).nan_to_num(0.0)  # (N, H, L, S, D)
    out = torch.sigmoid(qd) * torch.einsum("nhlsd,nshd->nlhd", weights, vd)
    return weights, out


@pytest.mark.parametrize("masks", ["none", "lengths+dense"])
def test_aft_full_matches_reference(masks):
    q, k, v = qkv(L, 6)
    attention = AFTFullAttention(max_sequence_length=10, aft_parameterization=3,
                                 event_dispatcher=EventDispatcher())
    with torch.no_grad():
        attention.u.normal_()  # a real position bias, not ~0
    dense = FullMask(torch.rand(L, 6) > 0.3) if masks != "none" else None
    lengths = LengthMask(torch.tensor([4, 6]), 6) if masks != "none" else None
    out, event = run(attention, q, k, v, dense, None, lengths)
    bias = (attention.u[:L] @ attention.v[:6].T).detach()
    if dense is not None:
        bias = bias.masked_fill(~dense.bool_matrix, float("-inf"))
        k = k.masked_fill(~lengths.bool_matrix[:, :, None, None], float("-inf"))
    weights, ref_out = aft_reference(q, k, v, bias)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    torch.testing.assert_close(event.attention_matrix.double(), weights.mean(-1), **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_aft_simple_matches_reference(causal):
    q, k, v = qkv()
    mask = TriangularCausalMask(L) if causal else None
    attention = AFTSimpleAttention(event_dispatcher=EventDispatcher())
    out, event = run(attention, q, k, v, mask)
    bias = torch.zeros(L, L)
    if causal:
        bias = bias.masked_fill(~mask.bool_matrix, float("-inf"))
    weights, ref_out = aft_reference(q, k, v, bias)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    torch.testing.assert_close(event.attention_matrix.double(), weights.mean(-1), **TOL)
    quiet = AFTSimpleAttention(event_dispatcher=EventDispatcher())(q, k, v, mask, None, None)
    assert torch.equal(quiet, out)  # a listener does not change the output


def test_aft_errors():
    q, k, v = qkv()
    with pytest.raises(UnsupportedMaskError, match="aft-full"):
        AFTSimpleAttention()(q, k, v, FullMask(torch.rand(L, L) > 0.5), None, None)
    with pytest.raises(ValueError, match="E == D"):
        AFTSimpleAttention()(q, k, torch.randn(N, L, H, 3), None, None, None)
    with pytest.raises(ValueError, match="max_sequence_length=4"):
        AFTFullAttention(max_sequence_length=4)(q, k, v, None, None, None)


# -- events: lazy, and nothing at all without a listener ------------------------------

ALL = {
    "exact-topk": lambda: make(ExactTopKAttention, topk=3),
    "clustered": lambda: make(ClusteredAttention, clusters=3),
    "improved-clustered": lambda: make(ImprovedClusteredAttention, clusters=3, topk=3),
    "causal-improved-clustered": lambda: make(ImprovedClusteredCausalAttention, clusters=3,
                                              topk=3),
    "reformer": lambda: make(ReformerAttention, chunk_size=2),
    "aft-full": lambda: AFTFullAttention(16, 4, event_dispatcher=EventDispatcher()),
    "aft-simple": lambda: AFTSimpleAttention(event_dispatcher=EventDispatcher()),
    "conditional-full": lambda: ConditionalFullAttention(
        make(ClusteredAttention, clusters=2), length_limit=4, event_dispatcher=EventDispatcher()),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_listener_no_event_and_a_listener_that_reads_nothing_builds_no_matrix(
        monkeypatch, name):
    built = []
    original = AttentionEvent.__init__

    def spy(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(AttentionEvent, "__init__", spy)
    attention = ALL[name]()
    q, k, v = qkv()
    mask = TriangularCausalMask(L) if "causal" in name else None
    dispatchers = {m.event_dispatcher for m in attention.modules()
                   if isinstance(getattr(m, "event_dispatcher", None), EventDispatcher)}
    with torch.no_grad():
        torch.manual_seed(3)
        quiet = attention(q, k, v, mask, None, None)
        assert built == []
        for dispatcher in dispatchers:
            dispatcher.listen(AttentionEvent, lambda event: None)
        torch.manual_seed(3)
        loud = attention(q, k, v, mask, None, None)
    assert len(built) == 1 and built[0].attention_type == (
        "clustered" if name == "conditional-full" else name)
    assert built[0]._matrix is None or name == "exact-topk"  # top-k's is computed anyway
    torch.testing.assert_close(quiet, loud, rtol=0, atol=1e-6)
    matrix = built[0].attention_matrix
    torch.testing.assert_close(built[0].attention(1, [1]), matrix[1, [1]])
    assert matrix.shape == (N, H, L, L) and (matrix >= 0).all()
    torch.testing.assert_close(torch.softmax(built[0].logits(0, 0), -1)[matrix[0, 0].sum(-1) > 0],
                               matrix[0, 0][matrix[0, 0].sum(-1) > 0])


@pytest.mark.parametrize("name", ["clustered", "improved-clustered", "reformer", "aft-full",
                                  "exact-topk"])
def test_gradients_flow_to_queries_keys_and_values(name):
    attention = ALL[name]()
    q, k, v = (t.requires_grad_() for t in qkv())
    attention(q, k, v, None, None, None).square().sum().backward()
    used = [q, v] if name == "reformer" else [q, k, v]  # reformer's keys are its queries
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in used)


def test_full_attention_output_is_contiguous():
    q, k, v = qkv()
    assert FullAttention()(q, k, v, None, None, None).is_contiguous()
