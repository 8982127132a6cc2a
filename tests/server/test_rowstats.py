"""The history's per-step head statistics without the L x S matrix equal the matrix's
(every statistic, every kind of attention the fused path covers), at any length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.core.history_items import StepItem, stats_of
from attnscope.core.reduce import layer_statistics, local_window
from attnscope.core.rowstats import STATS_ROWS, event_statistics
from attnscope.core.stats import HEAD_STATISTICS, STAT_NAMES, MaskInfo, valid_key_counts
from transformer_core.builders import TransformerDecoderBuilder, TransformerEncoderBuilder
from transformer_core.events import AttentionEvent, EventDispatcher, spread_rows
from transformer_core.instrument.lazy import SDPACall, sdpa_event
from transformer_core.masking import LengthMask, TriangularCausalMask

NAMES = HEAD_STATISTICS[:11]


def matrix_rows(event: AttentionEvent, n: int) -> torch.Tensor:
    """The matrix path's (11, H) for sample ``n``: what the history stored before."""
    L, S = event.shape[2:]
    valid = valid_key_counts(MaskInfo.of(event), n, L, S)
    return layer_statistics(event.attention(n), valid)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """(11, H) equal within 1e-4; ``distance`` (in positions) within 1e-4 relative."""
    for r, name in enumerate(NAMES):
        rtol = 1e-4 if name == "distance" else 0
        torch.testing.assert_close(got[r], want[r], atol=1e-4, rtol=rtol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def recorded(model, *inputs, **masks) -> list[AttentionEvent]:
    seen: list[AttentionEvent] = []
    dispatcher = EventDispatcher()
    for module in model.modules():
        if hasattr(module, "event_dispatcher"):
            module.event_dispatcher = dispatcher
    dispatcher.listen(AttentionEvent, seen.append)
    with torch.no_grad():
        model(*inputs, **masks)
    return seen


def encoder(**kwargs):
    options = dict(n_layers=2, n_heads=3, query_dimensions=8, value_dimensions=8,
                   feed_forward_dimensions=32)
    options.update(kwargs)
    return TransformerEncoderBuilder.from_kwargs(**options).get().eval()


@pytest.mark.parametrize("masks", ["none", "causal", "padded", "causal+padded"])
def test_every_statistic_equals_the_matrix_path(masks):
    N, L = 3, 23
    kwargs = {}
    if "causal" in masks:
        kwargs["attn_mask"] = TriangularCausalMask(L)
    if "padded" in masks:
        kwargs["length_mask"] = LengthMask(torch.tensor([23, 15, 6]), L)
    for event in recorded(encoder(), torch.randn(N, L, 24), **kwargs):
        got = event_statistics(event, max_rows=None, method="rows")
        assert got.shape == (N, 11, 3)
        for n in range(N):
            assert_same(got[n], matrix_rows(event, n))


@pytest.mark.parametrize("case", ["gqa-causal", "bool-mask", "softcap", "local", "bias"])
def test_other_kinds_of_softmax_attention(case):
    torch.manual_seed(3)
    if case == "local":
        events = recorded(encoder(attention_type="local", local_context=5),
                          torch.randn(2, 19, 24))
    else:
        q, k = torch.randn(2, 4, 19, 8), torch.randn(2, 2, 19, 8)
        mask, causal, cap = None, False, None
        if case == "gqa-causal":
            causal = True
        elif case == "bool-mask":
            mask = torch.rand(2, 1, 19, 19) > 0.4
            mask[..., 0] = True
        elif case == "softcap":
            q, cap, causal = 4 * q, 3.0, True
        else:
            i = torch.arange(19.0)
            mask = -(i[None, :] - i[:, None]).abs()[None, None] * 0.3
        events = [sdpa_event(None, SDPACall.of(q, k, mask, causal, softcap=cap))]
    for event in events:
        got = event_statistics(event, max_rows=None, method="rows")
        for n in range(event.shape[0]):
            want = matrix_rows(event, n)
            if case == "bool-mask":  # counts per row differ: the reference's own counts
                valid = event.scores.masks[0][n, 0].sum(-1)
                want = layer_statistics(event.attention(n), valid)
            assert_same(got[n], want)


def test_cross_attention_and_a_single_query_row():
    model = TransformerDecoderBuilder.from_kwargs(
        n_layers=1, n_heads=2, query_dimensions=8, value_dimensions=8,
        feed_forward_dimensions=16).get().eval()
    for event in recorded(model, torch.randn(2, 5, 16), torch.randn(2, 9, 16)):
        got = event_statistics(event, max_rows=None, method="rows")
        for n in range(2):
            assert_same(got[n], matrix_rows(event, n))
    one = sdpa_event(None, SDPACall.of(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 6, 4)))
    assert_same(event_statistics(one, method="rows")[0], matrix_rows(one, 0))


def test_spread_rows_are_the_mean_over_those_rows():
    torch.manual_seed(4)
    L = 300
    q, k = torch.randn(1, 2, L, 8), torch.randn(1, 2, L, 8)
    event = sdpa_event(None, SDPACall.of(q, k, is_causal=True))
    got = event_statistics(event, max_rows=40, method="rows")[0]
    rows = spread_rows(L, 40)
    p = event.attention(0)[:, rows]  # (H, R, S): the reference, those rows only
    i = rows.float()
    keys = rows + 1.0
    entropy = torch.where(keys > 1, -torch.xlogy(p, p).sum(-1) / keys.clamp_min(2).log(), 0)
    later = rows >= 1
    j = torch.arange(L).float()
    band = ((j[None] - i[:, None]).abs() <= local_window(L)).float()  # (R, S)
    want = {
        "entropy": entropy.mean(-1), "max_weight": p.amax(-1).mean(-1),
        "first_token": p[..., 0].mean(-1),
        "distance": (p * (i[:, None] - j[None]).abs()).sum(-1)[:, later].mean(-1),
        "previous_token": torch.stack([p[h, later].gather(-1, (rows[later] - 1)[:, None])
                                       [:, 0].mean() for h in range(2)]),
        "diagonal": torch.stack([p[h, later].gather(-1, rows[later][:, None])[:, 0].mean()
                                 for h in range(2)]),
        "local": (p * band).sum(-1)[:, later].mean(-1),
        "sink": p[:, later, 0].mean(-1),
        "uniform": entropy[:, keys > 1].mean(-1),
    }
    for name, value in want.items():
        r = NAMES.index(name)
        torch.testing.assert_close(got[r], value, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("method, count", [("matrix", 6.0), ("rows", 1.0)])
def test_nan_in_the_queries_is_counted(method, count):
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    q[0, 1, 3] = float("nan")
    event = sdpa_event(None, SDPACall.of(q, k, is_causal=True))
    got = event_statistics(event, method=method)[0]
    nan = got[STAT_NAMES.index("nan")]  # the matrix: NaN weights; rows: rows
    assert nan.tolist() == [0.0, count] and torch.isnan(got[0, 1]) and not torch.isnan(got[0, 0])


def test_the_history_writer_computes_every_head_at_8192_queries():
    L, H = 8192, 2
    q, k = torch.randn(1, H, L, 16), torch.randn(1, H, L, 16)
    copy = sdpa_event(None, SDPACall.of(q, k, is_causal=True)).sample_copy(0)
    items = [StepItem("s", step, 0.0, {}, {0: copy}, 1) for step in range(2)]
    rows = stats_of(items)  # today's matrix path would need 2 x 2 x 256 MiB here
    assert all(r.shape == (1, len(HEAD_STATISTICS), H) for r in rows)
    entropy = rows[0][0, 0]
    assert np.isfinite(entropy).all() and (entropy > 0.5).all()
    st = copy.row_statistics(rows=spread_rows(L, STATS_ROWS), method="blocks")
    np.testing.assert_allclose(entropy, st.normalised_entropy()[0].mean(-1).numpy(), atol=1e-4)


def test_stats_of_joins_steps_and_keeps_the_matrix_path_for_other_attentions():
    events = recorded(encoder(attention_type="linear"), torch.randn(1, 7, 24))
    fused = recorded(encoder(), torch.randn(1, 7, 24))
    items = [StepItem("s", 0, 0.0, {}, {0: events[0].sample_copy(0),
                                        1: fused[1].sample_copy(0)}, 2)]
    row = stats_of(items)[0]
    np.testing.assert_allclose(row[0, :11], matrix_rows(events[0], 0).numpy(), atol=1e-5)
    np.testing.assert_allclose(row[1, :11], matrix_rows(fused[1], 0).numpy(), atol=1e-4)
    assert np.isnan(row[:, 11:]).all()  # induction rows: filled from the probe later
