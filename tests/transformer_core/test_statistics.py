"""Row statistics without the L x S matrix: equal to the matrix's, for every kind of mask,
and free for the model (outputs and gradients untouched, memory O(L) at L = 8192)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from transformer_core.builders import TransformerEncoderBuilder
from transformer_core.events import AttentionEvent, SoftmaxScores, spread_rows
from transformer_core.events.statistics import (
    StatisticsError,
    scores_statistics,
    weights_at,
)
from transformer_core.instrument.huggingface import _flash_call
from transformer_core.instrument.lazy import SDPACall, sdpa_event
from transformer_core.masking import LengthMask, TriangularCausalMask

from .helpers import Recorder

ATOL = 1e-4  # the target: equal to the matrix's statistics within 1e-4


def matrix_entropy(event: AttentionEvent) -> torch.Tensor:
    """Entropy (N, H, L) in nats from the event's own matrix (the reference)."""
    p = event.attention_matrix.double()  # (N, H, L, S)
    return -torch.xlogy(p, p).sum(-1)


def events_of(model, dispatcher, x, **masks) -> list[AttentionEvent]:
    got = Recorder()
    dispatcher.listen(AttentionEvent, got)
    with torch.no_grad():
        model(x, **masks)
    dispatcher.remove(got)
    return got.events


def encoder(dispatcher, **kwargs):
    options = dict(n_layers=2, n_heads=3, query_dimensions=8, value_dimensions=8,
                   feed_forward_dimensions=32, event_dispatcher=dispatcher)
    options.update(kwargs)
    return TransformerEncoderBuilder.from_kwargs(**options).get().eval()


def check(event: AttentionEvent, method: str = "auto", rows=None) -> None:
    st = event.row_statistics(rows=rows, method=method, max_logit=True)
    want = matrix_entropy(event)
    logits = event.logits().double()
    rows = st.rows
    torch.testing.assert_close(st.entropy.double(), want[:, :, rows], atol=ATOL, rtol=0)
    visible = logits[:, :, rows] > -1e30  # -inf, or a float mask's lowest value
    torch.testing.assert_close(st.keys, visible.sum(-1).float())
    p = event.attention_matrix[:, :, rows]
    has = st.keys > 0
    torch.testing.assert_close(st.max_weight[has].double(), p.amax(-1)[has].double(),
                               atol=ATOL, rtol=0)
    lse = torch.logsumexp(logits[:, :, rows], -1)
    torch.testing.assert_close(st.logsumexp[has].double(), lse[has], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("method", ["fused", "blocks"])
@pytest.mark.parametrize("masks", ["none", "causal", "padded", "causal+padded"])
def test_equal_to_the_matrix_entropy_for_our_full_attention(dispatcher, method, masks):
    model = encoder(dispatcher)
    N, L = 3, 11
    kwargs = {}
    if "causal" in masks:
        kwargs["attn_mask"] = TriangularCausalMask(L)
    if "padded" in masks:
        kwargs["length_mask"] = LengthMask(torch.tensor([11, 7, 4]), L)
    for event in events_of(model, dispatcher, torch.randn(N, L, 24), **kwargs):
        st = event.row_statistics(method=method)
        assert st.method == method and st.entropy.shape == (N, 3, L)
        check(event, method)


def test_a_causal_mask_is_a_band_and_costs_one_kernel_call(dispatcher):
    model = encoder(dispatcher)
    event = events_of(model, dispatcher, torch.randn(1, 9, 24),
                      attn_mask=TriangularCausalMask(9))[0]
    assert event.scores.band == (None, 0) and event.scores.masks == ()
    assert event.row_statistics().keys[0, 0].tolist() == [float(i) for i in range(1, 10)]


def test_sliding_window_local_attention(dispatcher):
    model = encoder(dispatcher, attention_type="local", local_context=4)
    for event in events_of(model, dispatcher, torch.randn(2, 13, 24)):
        check(event, "fused")
        check(event, "blocks")


@pytest.mark.parametrize("method", ["fused", "blocks"])
def test_grouped_query_attention_and_a_bool_mask(method):
    q, k = torch.randn(2, 6, 9, 8), torch.randn(2, 2, 9, 8)  # 6 query heads, 2 key heads
    mask = torch.rand(2, 1, 9, 9) > 0.3
    mask[..., 0] = True
    check(sdpa_event(None, SDPACall.of(q, k, mask)), method)
    check(sdpa_event(None, SDPACall.of(q, k, is_causal=True)), method)


def test_a_bottom_right_sliding_window_with_padding():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 12, 8)  # 5 new queries, 12 keys cached
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, :3] = 0
    call = _flash_call(torch.nn.Module(), q, k, padding, {"sliding_window": 4})
    check(sdpa_event(None, call), "fused")


def test_a_soft_cap_is_computed_in_blocks_and_refused_by_the_fused_path():
    q, k = 3 * torch.randn(1, 2, 10, 8), 3 * torch.randn(1, 2, 10, 8)
    event = sdpa_event(None, SDPACall.of(q, k, is_causal=True, softcap=5.0))
    assert event.row_statistics().method == "blocks"
    check(event, "blocks")
    with pytest.raises(StatisticsError, match="soft cap.*method='blocks'"):
        event.row_statistics(method="fused")


def test_an_additive_bias_is_computed_in_blocks():
    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    i = torch.arange(10.0)
    alibi = -(i[None, :] - i[:, None]).abs() * torch.tensor([0.5, 0.25])[:, None, None]
    event = sdpa_event(None, SDPACall.of(q, k, alibi[None]))  # (1, 2, L, S) float
    assert event.row_statistics().method == "blocks"
    check(event, "blocks")
    with pytest.raises(StatisticsError, match="bias"):
        event.row_statistics(method="fused")


def test_a_float_mask_that_only_masks_takes_the_fused_path():
    q, k = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    low = torch.finfo(torch.float32).min  # Hugging Face eager masks use the dtype's lowest
    mask = torch.zeros(2, 1, 7, 7).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), low)
    mask[1, ..., 5:] = float("-inf")
    event = sdpa_event(None, SDPACall.of(q, k, mask))
    assert event.row_statistics().method == "fused"
    check(event, "fused")


def test_subsampled_rows_are_exact_per_row(dispatcher):
    model = encoder(dispatcher)
    events = events_of(model, dispatcher, torch.randn(2, 40, 24),
                       attn_mask=TriangularCausalMask(40),
                       length_mask=LengthMask(torch.tensor([40, 31]), 40))
    rows = spread_rows(40, 7)
    assert rows.tolist() == [0, 6, 13, 20, 26, 32, 39]
    for event in events:
        check(event, "fused", rows)
        check(event, "blocks", rows)


def test_a_query_with_no_visible_key_has_zero_entropy_and_no_keys():
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2, :] = False
    event = sdpa_event(None, SDPACall.of(q, k, mask))
    for method in ("fused", "blocks"):
        st = event.row_statistics(method=method, max_logit=True)
        assert st.entropy[0, 0, 2] == 0 and st.keys[0, 0, 2] == 0
        assert st.max_weight[0, 0, 2] == 0 and torch.isneginf(st.logsumexp[0, 0, 2])


def test_weights_at_keys_and_expected_key_positions():
    q, k = torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    mask = torch.rand(2, 1, 12, 12) > 0.2
    mask[..., 0] = True
    scores = sdpa_event(None, SDPACall.of(q, k, mask)).scores
    rows = spread_rows(12, 5)
    positions = torch.arange(12.0)[:, None]  # (S, 1)
    p = torch.softmax(scores.logits(slice(None), None, torch.arange(12)), -1)  # (N, H, L, S)
    for method in ("fused", "blocks"):
        st = scores_statistics(scores, rows=rows, method=method, key_features=positions)
        torch.testing.assert_close(st.expected[..., 0], (p @ positions)[:, :, rows, 0],
                                   atol=1e-4, rtol=1e-5)
        for cols in (torch.zeros_like(rows), rows - 1, rows):
            want = p[:, :, rows].gather(-1, cols.clamp(min=0).expand(2, 3, -1)[..., None])[..., 0]
            want = torch.where(cols >= 0, want, torch.zeros_like(want))
            torch.testing.assert_close(weights_at(scores, st, cols), want, atol=1e-6, rtol=1e-5)


def test_heads_and_samples_select_what_they_name():
    q, k = torch.randn(3, 4, 6, 8), torch.randn(3, 2, 6, 8)
    event = sdpa_event(None, SDPACall.of(q, k, is_causal=True))
    st = event.row_statistics(sample=1, heads=[3, 0])
    assert st.entropy.shape == (1, 2, 6)
    torch.testing.assert_close(st.entropy.double(), matrix_entropy(event)[1:2, [3, 0]],
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("attention_type", ["linear", "causal-linear", "clustered",
                                            "exact-topk", "reformer"])
def test_other_attentions_measure_the_matrix_they_apply(dispatcher, attention_type):
    model = encoder(dispatcher, attention_type=attention_type, clusters=2, topk=3,
                    chunk_size=4)
    for event in events_of(model, dispatcher, torch.randn(2, 8, 24)):
        assert event.scores is None
        st = event.row_statistics()
        assert st.method == "matrix"
        torch.testing.assert_close(st.entropy.double(), matrix_entropy(event), atol=ATOL,
                                   rtol=0)
        with pytest.raises(StatisticsError, match="method='matrix'"):
            event.row_statistics(method="fused")


def test_recurrent_softmax_steps_describe_their_logits():
    from transformer_core.recurrent.attention._events import softmax_step_event

    q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 3, 8)  # one query row over 5 keys
    event = softmax_step_event(None, q, k, 0.3, LengthMask(torch.tensor([5, 3]), 5), "self")
    check(event, "fused")


def test_reading_statistics_leaves_outputs_and_gradients_bit_identical(dispatcher):
    torch.manual_seed(1)
    model = encoder(dispatcher, attention_dropout=0.0).train()
    x = torch.randn(2, 10, 24)
    mask = TriangularCausalMask(10)

    def run(listen: bool) -> tuple[torch.Tensor, list[torch.Tensor], list]:
        torch.manual_seed(2)  # the layers' own dropout draws the same masks
        model.zero_grad()
        seen: list = []
        if listen:
            dispatcher.listen(AttentionEvent, lambda ev: seen.append(ev.row_statistics()))
        out = model(x, attn_mask=mask)
        out.square().mean().backward()
        dispatcher.clear()
        return out.detach(), [p.grad.clone() for p in model.parameters()], seen

    out_a, grads_a, _ = run(False)
    out_b, grads_b, seen = run(True)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert len(seen) == 2 and not any(s.entropy.requires_grad for s in seen)


MEMORY_PROBE = """
import gc, sys, torch
from pathlib import Path
from transformer_core.instrument.lazy import SDPACall, sdpa_event

def field(name):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1]) / 1024

L, kind = int(sys.argv[1]), sys.argv[2]
q, k = torch.randn(1, 2, L, 32), torch.randn(1, 2, L, 32)
mask = None
if kind == "padded":
    mask = torch.ones(1, 1, 1, L, dtype=torch.bool)
    mask[..., L - 100:] = False
event = sdpa_event(None, SDPACall.of(q, k, mask, is_causal=kind == "causal"))
event.row_statistics(rows=torch.arange(8))  # warm up the kernel's thread pool
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # the peak becomes the current size
before = field("VmRSS:")
st = event.row_statistics()
print(field("VmHWM:") - before, st.method, tuple(st.entropy.shape))
"""


def peak_growth_mib(L: int, kind: str) -> tuple[float, str]:
    """Peak resident memory added by ``row_statistics`` of 2 heads at L queries, MiB, in a
    child whose allocator returns every large block at once (so the peak is what was live)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(L), kind], env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    growth, method, shape = out.stdout.split(maxsplit=2)
    return float(growth), f"{method} {shape.strip()}"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("kind", ["causal", "padded"])
def test_memory_at_8192_queries_grows_with_L_not_L_times_S(kind):
    growth, what = peak_growth_mib(8192, kind)
    assert what == "fused (1, 2, 8192)"
    matrix_mib = 8192 * 8192 * 4 / 2**20  # one head's (L, S) float32: 256 MiB
    assert growth < matrix_mib / 4, f"peak grew {growth:.0f} MiB (one head's matrix: " \
        f"{matrix_mib:.0f} MiB)"


def test_the_fused_entropy_at_8192_queries_equals_the_exact_rows():
    L = 8192
    q, k = torch.randn(1, 2, L, 32), torch.randn(1, 2, L, 32)
    event = sdpa_event(None, SDPACall.of(q, k, is_causal=True))
    st = event.row_statistics()
    rows = spread_rows(L, 64)
    want = scores_statistics(event.scores, rows=rows, method="blocks").entropy
    torch.testing.assert_close(st.entropy[..., rows], want, atol=ATOL, rtol=0)


def test_unknown_method_and_rows_out_of_range_are_refused():
    event = sdpa_event(None, SDPACall.of(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)))
    with pytest.raises(ValueError, match="method: 'fast' is not one of"):
        event.row_statistics(method="fast")
    with pytest.raises(IndexError, match="rows"):
        event.row_statistics(rows=torch.tensor([5]))
    with pytest.raises(ValueError, match="key heads do not divide"):
        SoftmaxScores(torch.randn(1, 3, 3, 4), torch.randn(1, 3, 2, 4), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("masks", ["causal", "mask", "gqa", "rows"])
def test_the_cuda_fused_path_equals_the_matrix(masks):
    q = torch.randn(2, 4, 300, 64, device="cuda")
    k = torch.randn(2, 4 if masks != "gqa" else 2, 300, 64, device="cuda")
    mask = None
    if masks == "mask":
        mask = torch.rand(2, 1, 300, 300, device="cuda") > 0.3
        mask[..., 0] = True
    event = sdpa_event(None, SDPACall.of(q, k, mask, is_causal=mask is None))
    rows = spread_rows(300, 37) if masks == "rows" else None
    st = event.row_statistics(rows=rows, method="fused")
    assert st.entropy.is_cuda
    want = matrix_entropy(event)[:, :, st.rows.cuda()]
    torch.testing.assert_close(st.entropy.double(), want, atol=ATOL, rtol=0)


def test_statistics_of_a_model_trained_in_reduced_precision_are_float32():
    q, k = torch.randn(1, 2, 9, 8).bfloat16(), torch.randn(1, 2, 9, 8).bfloat16()
    event = sdpa_event(None, SDPACall.of(q, k, is_causal=True))
    st = event.row_statistics()
    assert st.entropy.dtype == torch.float32
    p = torch.softmax(event.scores.logits(slice(None), None, torch.arange(9)), -1)  # float32
    ref = -torch.xlogy(p, p).sum(-1)
    torch.testing.assert_close(st.entropy, ref, atol=1e-4, rtol=0)
    assert math.isfinite(float(st.entropy.sum()))
