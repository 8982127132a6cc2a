"""CUDA: fused vs explicit paths and reduced precision. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from transformer_core.attention import ATTENTION_TYPES
from transformer_core.builders import TransformerEncoderBuilder
from transformer_core.events import AttentionEvent, EventDispatcher
from transformer_core.masking import LengthMask, TriangularCausalMask

from .helpers import Recorder, reference_softmax_attention

pytestmark = pytest.mark.gpu


def build(dispatcher, **kwargs):
    options = dict(n_layers=2, n_heads=4, query_dimensions=16, value_dimensions=16,
                   feed_forward_dimensions=128, event_dispatcher=dispatcher, local_context=8,
                   clusters=4, topk=8, chunk_size=8)
    options.update(kwargs)
    return TransformerEncoderBuilder.from_kwargs(**options).get().cuda().eval()


def capture(net, dispatcher, x, **masks):
    got = Recorder()
    dispatcher.listen(AttentionEvent, got)
    with torch.no_grad():
        out = net(x, **masks)
    dispatcher.remove(got)
    return out, [ev.attention_matrix for ev in got.events]


@pytest.mark.parametrize("causal", [False, True])
def test_fused_equals_explicit_on_cuda(causal):
    dispatcher = EventDispatcher()
    net = build(dispatcher)
    x = torch.randn(3, 64, 64, device="cuda")
    masks = dict(length_mask=LengthMask(torch.tensor([64, 40, 7], device="cuda"), 64))
    if causal:
        masks["attn_mask"] = TriangularCausalMask(64, device="cuda")
    fused, fused_matrices = capture(net, dispatcher, x, **masks)
    for layer in net.layers:
        layer.attention.inner_attention.use_fused = False
    explicit, explicit_matrices = capture(net, dispatcher, x, **masks)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-4)
    for a, b in zip(fused_matrices, explicit_matrices, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# Deterministic attentions: the hashing ones draw other planes in another dtype.
EXACT_TYPES = ["full", "linear", "causal-linear", "local", "exact-topk", "aft-full",
               "aft-simple"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attention_type", EXACT_TYPES)
def test_reduced_precision_on_cuda(dtype, attention_type):
    dispatcher = EventDispatcher()
    net = build(dispatcher, attention_type=attention_type)
    x = torch.randn(2, 32, 64, device="cuda")
    reference, _ = capture(net, dispatcher, x)
    net = net.to(dtype)
    out, matrices = capture(net, dispatcher, x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 0.03 if dtype == torch.float16 else 0.15  # bfloat16 keeps 8 mantissa bits
    if attention_type == "exact-topk":
        # Rounding may swap two near-equal keys at the top-k boundary: a few rows differ.
        close = torch.isclose(out.float(), reference, rtol=tol, atol=tol)
        assert close.float().mean() > 0.98, close.float().mean()
    else:
        torch.testing.assert_close(out.float(), reference, rtol=tol, atol=tol)
    for matrix in matrices:
        assert matrix.dtype == dtype and matrix.device.type == "cuda"
        torch.testing.assert_close(matrix.float().sum(-1), torch.ones(2, 4, 32, device="cuda"),
                                   rtol=0.02, atol=0.02)


def test_full_attention_matches_float64_reference_on_cuda():
    dispatcher = EventDispatcher()
    net = build(dispatcher, n_layers=1)
    qkv = Recorder()
    dispatcher.listen(lambda ev: hasattr(ev, "values"), qkv)
    _, (matrix,) = capture(net, dispatcher, torch.randn(2, 48, 64, device="cuda"))
    event = qkv.events[0]
    _, ref = reference_softmax_attention(event.queries, event.keys, event.values)
    torch.testing.assert_close(matrix.double(), ref, rtol=1e-4, atol=1e-5)


def test_slices_stay_on_the_device():
    dispatcher = EventDispatcher()
    net = build(dispatcher)
    got = Recorder()
    dispatcher.listen(AttentionEvent, got)
    with torch.no_grad():
        net(torch.randn(2, 16, 64, device="cuda"))
    part = got.events[0].attention(sample=1, heads=[0, 3])
    assert part.device.type == "cuda" and part.shape == (2, 16, 16)
    torch.testing.assert_close(part, got.events[0].attention_matrix[1][[0, 3]])


@pytest.mark.parametrize("attention_type", ["full", "linear", "local"])
def test_sample_copies_and_their_concat_on_cuda(attention_type):
    """What the history recorder keeps per step stays on the GPU (no sync in the
    training thread) and reads, joined, as the events themselves do."""
    dispatcher = EventDispatcher()
    net = build(dispatcher, attention_type=attention_type)
    got = Recorder()
    dispatcher.listen(AttentionEvent, got)
    lengths = LengthMask(torch.tensor([32, 20], device="cuda"), 32)
    with torch.no_grad():
        net(torch.randn(2, 32, 64, device="cuda"), length_mask=lengths)
    events = [ev for ev in got.events if ev.source is got.events[0].source]
    copies = [ev.sample_copy(n) for ev in events for n in (1, 0)]
    assert all(c.attention(0).device.type == "cuda" for c in copies)
    want = torch.cat([ev.attention(n)[None] for ev in events for n in (1, 0)])
    torch.testing.assert_close(AttentionEvent.concat(copies).attention(), want,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention_type", sorted(ATTENTION_TYPES))
def test_every_attention_runs_on_cuda_and_its_matrix_is_applied(attention_type):
    """Every registered attention runs on the GPU; its matrix stays there, rows sum to 1
    (at most 1 for causal-improved-clustered), and output @ layer == matrix @ values."""
    dispatcher = EventDispatcher()
    net = build(dispatcher, attention_type=attention_type, n_layers=1)
    mask = TriangularCausalMask(32, device="cuda") if "causal" in attention_type else None
    qkv, got = Recorder(), Recorder()
    dispatcher.listen(lambda ev: hasattr(ev, "values"), qkv)
    dispatcher.listen(AttentionEvent, got)
    inner = net.layers[0].attention.inner_attention
    outputs = []
    inner.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        out = net(torch.randn(2, 32, 64, device="cuda"), attn_mask=mask)
    matrix = got.events[0].attention_matrix  # (N, H, L, S)
    assert torch.isfinite(out).all() and matrix.device.type == "cuda"
    sums = matrix.sum(-1)
    assert (sums <= 1 + 1e-4).all() and (attention_type.startswith("causal-improved")
                                         or torch.allclose(sums, torch.ones_like(sums)))
    if not attention_type.startswith("aft"):  # AFT weighs every channel on its own
        applied = torch.einsum("nhls,nshd->nlhd", matrix, qkv.events[0].values)
        torch.testing.assert_close(outputs[0], applied, rtol=1e-4, atol=1e-4)
