"""instrument() on recurrent models: their attention sites, and the rows their events carry.

Shape legend: N batch, L positions, S keys, H heads.
"""

from __future__ import annotations

import pytest
import torch

from transformer_core.builders import (
    RecurrentDecoderBuilder,
    RecurrentEncoderBuilder,
    TransformerDecoderBuilder,
    TransformerEncoderBuilder,
)
from transformer_core.events import AttentionEvent, QKVEvent
from transformer_core.instrument import instrument
from transformer_core.masking import LengthMask, TriangularCausalMask

N, L, S_MEMORY, H, E = 2, 6, 5, 3, 4
SIZES = dict(n_layers=2, n_heads=H, query_dimensions=E, value_dimensions=E,
             feed_forward_dimensions=16, dropout=0.0, attention_dropout=0.0)
# recurrent type -> the batch type its rows equal (self-attention under a causal mask)
BATCH_SELF = {"full": "full", "linear": "causal-linear"}


def encoders(kind: str):
    """A recurrent encoder and the causal batch encoder with the same weights."""
    torch.manual_seed(0)
    rec = RecurrentEncoderBuilder.from_kwargs(attention_type=kind, **SIZES).get().eval()
    batch = TransformerEncoderBuilder.from_kwargs(attention_type=BATCH_SELF[kind],
                                                  **SIZES).get().eval()
    batch.load_state_dict(rec.state_dict())
    return rec, batch


def decoders(self_kind: str, cross_kind: str):
    """A recurrent decoder and the batch decoder with the same weights."""
    torch.manual_seed(0)
    rec = RecurrentDecoderBuilder.from_kwargs(
        self_attention_type=self_kind, cross_attention_type=cross_kind, **SIZES).get().eval()
    batch = TransformerDecoderBuilder.from_kwargs(
        self_attention_type=BATCH_SELF[self_kind], cross_attention_type=cross_kind,
        **SIZES).get().eval()
    batch.load_state_dict(rec.state_dict())
    return rec, batch


def listen(sites) -> dict[int, list[AttentionEvent]]:
    """Every AttentionEvent of each site, by site index, heard on the site's dispatcher."""
    heard: dict[int, list[AttentionEvent]] = {s.index: [] for s in sites}
    for site in sites:
        site.dispatcher.listen(
            lambda e, m=site.module: isinstance(e, AttentionEvent) and e.source is m,
            heard[site.index].append)
    return heard


@pytest.mark.parametrize("kind", ["full", "linear"])
def test_recurrent_encoder_sites_are_found_with_their_heads(kind):
    rec, _ = encoders(kind)
    sites = instrument(rec)
    assert [(s.name, s.heads, s.d_model, s.role, s.attention_type, s.recurrent)
            for s in sites] == [
        (f"layers.{i}.attention.inner_attention", H, H * E, "self", kind, True)
        for i in range(2)]
    assert all(s.qkv_dispatcher is not None for s in sites)


def test_recurrent_decoder_sites_are_self_and_cross_and_cross_has_no_qkv():
    rec, _ = decoders("full", "linear")
    sites = instrument(rec)
    assert [(s.name, s.role, s.attention_type, s.heads, s.recurrent) for s in sites] == [
        ("layers.0.self_attention.inner_attention", "self", "full", H, True),
        ("layers.0.cross_attention.inner_attention", "cross", "linear", H, True),
        ("layers.1.self_attention.inner_attention", "self", "full", H, True),
        ("layers.1.cross_attention.inner_attention", "cross", "linear", H, True),
    ]
    # the memory is projected once: the cross layer dispatches no QKVEvent per step
    assert [s.qkv_dispatcher is not None for s in sites] == [True, False, True, False]


def test_batch_sites_are_not_recurrent():
    _, batch = encoders("full")
    assert [s.recurrent for s in instrument(batch)] == [False, False]


@pytest.mark.parametrize("kind", ["full", "linear"])
def test_encoder_site_rows_equal_the_causal_batch_matrix_rows(kind):
    rec, batch = encoders(kind)
    x = torch.randn(N, L, H * E)
    batch_heard = listen(instrument(batch))
    batch(x, attn_mask=TriangularCausalMask(L))
    rec_sites = instrument(rec)
    heard = listen(rec_sites)
    state = None
    for t in range(L):
        _, state = rec(x[:, t], state=state)
    for site in rec_sites:
        (whole,) = batch_heard[site.index]
        matrix = whole.attention_matrix  # (N, H, L, L)
        rows = heard[site.index]
        assert [e.shape for e in rows] == [(N, H, 1, t + 1) for t in range(L)]
        for t, event in enumerate(rows):
            torch.testing.assert_close(event.attention_matrix, matrix[:, :, t:t + 1, :t + 1],
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("self_kind,cross_kind", [("full", "full"), ("linear", "linear")])
def test_decoder_site_rows_equal_the_batch_matrix_rows(self_kind, cross_kind):
    rec, batch = decoders(self_kind, cross_kind)
    x, memory = torch.randn(N, L, H * E), torch.randn(N, S_MEMORY, H * E)
    lengths = LengthMask(torch.tensor([S_MEMORY, 3]), max_len=S_MEMORY)
    batch_heard = listen(instrument(batch))
    batch(x, memory, x_mask=TriangularCausalMask(L), memory_length_mask=lengths)
    rec_sites = instrument(rec)
    heard = listen(rec_sites)
    state = None
    for t in range(L):
        _, state = rec(x[:, t], memory, memory_length_mask=lengths, state=state)
    for site in rec_sites:
        matrix = batch_heard[site.index][0].attention_matrix  # (N, H, L, S)
        rows = heard[site.index]
        assert len(rows) == L
        for t, event in enumerate(rows):
            S = t + 1 if site.role == "self" else S_MEMORY
            assert event.shape == (N, H, 1, S) and event.role == site.role
            torch.testing.assert_close(event.attention_matrix, matrix[:, :, t:t + 1, :S],
                                       atol=1e-5, rtol=0)
    # sample 1's padded memory keys get no weight
    assert heard[1][-1].attention_matrix[1, :, :, 3:].abs().max() == 0


def test_encoder_site_qkv_events_are_one_position_each():
    rec, _ = encoders("full")
    site = instrument(rec)[0]
    heard: list[QKVEvent] = []
    site.qkv_dispatcher.listen(lambda e: isinstance(e, QKVEvent) and e.source is site.qkv_source,
                               heard.append)
    state = None
    for _ in range(3):
        _, state = rec(torch.randn(N, H * E), state=state)
    assert [tuple(e.queries.shape) for e in heard] == [(N, 1, H, E)] * 3
