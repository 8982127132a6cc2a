"""Events as data (transformer_core.events.portable): a sample copy sent to another process
and built again there reads the same attention and logits, for every attention type, the
foreign-model adapters and recurrent steps; through the shared-memory channel too.

Shape legend: N batch, L queries, S keys, H heads, E query/key dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import transformer_core.attention  # noqa: F401  (registers every attention type)
from transformer_core.attention_registry import AttentionRegistry
from transformer_core.builders import (
    RecurrentEncoderBuilder,
    TransformerEncoderBuilder,
)
from transformer_core.events import AttentionEvent, EventDispatcher
from transformer_core.events.portable import (
    Portable,
    from_portable,
    portable_sample,
    to_portable,
)
from transformer_core.instrument import instrument
from transformer_core.masking import LengthMask, TriangularCausalMask

from .helpers import Recorder

N, L, H, E = 2, 8, 2, 4


def _encoder(attention_type: str, **extra):
    dispatcher = EventDispatcher()
    kwargs = dict(n_layers=1, n_heads=H, query_dimensions=E, value_dimensions=E,
                  feed_forward_dimensions=8, attention_type=attention_type, dropout=0.0,
                  attention_dropout=0.0, event_dispatcher=dispatcher, **extra)
    return TransformerEncoderBuilder.from_kwargs(**kwargs).get().eval(), dispatcher


def _events(model, dispatcher, *args, **kwargs):
    got = Recorder()
    dispatcher.listen(AttentionEvent, got)
    with torch.no_grad():
        model(*args, **kwargs)
    dispatcher.remove(got)
    return got.events


def _travelled(event: AttentionEvent) -> AttentionEvent:
    """``event`` through the channel's encoding and back, as the server process sees it."""
    from attnscope.contract.channel import decode, encode_header

    portable = to_portable(event)
    tensors = portable.all_tensors()
    head, sizes = encode_header("event", portable.header(),
                                [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
    body = bytearray(head)
    for t, size in zip(tensors.values(), sizes, strict=True):
        body += t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        body += b"\0" * ((-size) % 8)
    message = decode(memoryview(bytes(body)))
    return from_portable(Portable.from_parts(message.header, message.tensors))


def _same(a: AttentionEvent, b: AttentionEvent) -> None:
    assert a.shape == b.shape and a.role == b.role and a.attention_type == b.attention_type
    torch.testing.assert_close(a.attention(0), b.attention(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.attention(0, [1]), b.attention(0, [1]), rtol=1e-5, atol=1e-6)
    fa, fb = a.logits(0), b.logits(0)
    assert torch.equal(torch.isneginf(fa), torch.isneginf(fb))
    finite = torch.isfinite(fa)
    torch.testing.assert_close(fa[finite], fb[finite], rtol=1e-4, atol=1e-5)


TYPES = [t for t in AttentionRegistry.keys if t not in ("conditional-full",)]


@pytest.mark.parametrize("attention_type", TYPES)
@pytest.mark.parametrize("masks", ["none", "lengths"])
def test_every_attention_type_travels(attention_type, masks):
    torch.manual_seed(0)
    extra = {"clusters": 3} if "clustered" in attention_type else \
        {"local_context": 3} if attention_type == "local" else {}
    try:
        model, dispatcher = _encoder(attention_type, **extra)
    except (ValueError, TypeError) as exc:  # a type needing more parameters
        pytest.skip(f"{attention_type}: {exc}")
    x = torch.randn(N, L, H * E)
    kwargs = {}
    if masks == "lengths":
        kwargs["length_mask"] = LengthMask(torch.tensor([5, 8]), L)
    try:
        events = _events(model, dispatcher, x, **kwargs)
    except (ValueError, RuntimeError) as exc:
        pytest.skip(f"{attention_type} with {masks}: {exc}")
    copy = events[0].sample_copy(0)
    _same(copy, _travelled(copy))
    # straight from the batch (what a training process sends): the same sample
    _same(copy, from_portable(portable_sample(events[0], 0)))
    if events[0].shape[0] > 1:
        _same(events[0].sample_copy(1), from_portable(portable_sample(events[0], 1)))


def test_causal_softmax_travels_without_its_matrix():
    model, dispatcher = _encoder("full")
    x = torch.randn(N, L, H * E)
    copy = _events(model, dispatcher, x, attn_mask=TriangularCausalMask(L))[0].sample_copy(1)
    portable = to_portable(copy)
    assert portable.recipe == "softmax" and portable.masks["attn_mask"]["kind"] == "causal"
    assert set(portable.tensors) == {"queries", "keys"}  # (1, L, H, E) each: no L x S matrix
    _same(copy, _travelled(copy))


def test_linear_attention_travels_as_its_features():
    model, dispatcher = _encoder("causal-linear")
    x = torch.randn(N, L, H * E)
    copy = _events(model, dispatcher, x, attn_mask=TriangularCausalMask(L))[0].sample_copy(0)
    assert to_portable(copy).recipe == "kernel"
    _same(copy, _travelled(copy))


class _SDPABlock(nn.Module):
    """nanoGPT-style: one fused call, grouped-query, with a float padding bias."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 8 + 2 * 4)

    def forward(self, x, bias=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([8, 4, 4], dim=2)
        q = q.view(B, T, 4, 2).transpose(1, 2)  # (B, 4, T, 2)
        k = k.view(B, T, 2, 2).transpose(1, 2)  # (B, 2, T, 2): grouped-query
        v = v.view(B, T, 2, 2).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, is_causal=bias is None, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, 8)


@pytest.mark.parametrize("biased", [False, True])
def test_sdpa_events_travel(biased):
    block = _SDPABlock().eval()
    instrument(block, include=lambda name, m: m is block)
    dispatcher = block.event_dispatcher
    x = torch.randn(N, L, 8)
    bias = torch.zeros(N, 1, L, L).masked_fill(torch.rand(N, 1, L, L) < 0.3, -1e4) \
        if biased else None
    events = _events(block, dispatcher, x, bias)
    copy = events[0].sample_copy(1)
    portable = to_portable(copy)
    assert portable.recipe == "sdpa" and portable.params["is_causal"] is (not biased)
    _same(copy, _travelled(copy))
    _same(copy, from_portable(portable_sample(events[0], 1)))


def test_multihead_attention_travels():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    sites = instrument(mha)
    x = torch.randn(N, L, 8)
    events = _events(lambda: mha(x, x, x, key_padding_mask=torch.tensor(
        [[False] * 6 + [True] * 2, [False] * L])), sites[0].dispatcher)
    copy = events[0].sample_copy(0)
    _same(copy, _travelled(copy))


def test_recurrent_steps_travel():
    dispatcher = EventDispatcher()
    model = RecurrentEncoderBuilder.from_kwargs(
        n_layers=1, n_heads=H, query_dimensions=E, value_dimensions=E,
        feed_forward_dimensions=8, attention_type="causal-linear",
        event_dispatcher=dispatcher).get().eval()
    got = Recorder()
    dispatcher.listen(AttentionEvent, got)
    state = None
    with torch.no_grad():
        for _ in range(3):
            _, state = model(torch.randn(N, H * E), state=state)
    copy = got.events[-1].sample_copy(1)
    assert copy.shape == (1, H, 1, 3)
    _same(copy, _travelled(copy))
    _same(copy, from_portable(portable_sample(got.events[-1], 1)))


def test_an_event_without_a_recipe_travels_as_its_matrix():
    matrix = torch.softmax(torch.randn(1, H, 3, 3), -1)
    event = AttentionEvent(None, (1, H, 3, 3), lambda n, h: matrix[n][:, h].log(),
                           lambda n, h: matrix[n][:, h])
    assert to_portable(event).recipe == "matrix"
    _same(event, _travelled(event))


def test_unknown_recipes_are_refused_by_name():
    with pytest.raises(ValueError, match="recipe: unknown 'pickle'"):
        Portable.from_parts({"recipe": "pickle", "shape": [1, 1, 1, 1]}, {})
