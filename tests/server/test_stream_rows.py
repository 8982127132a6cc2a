"""Recurrent inference on the stream: rows of a recurrent site grow into the sequence's matrix.

Shape legend: N batch, L positions, S keys, H heads, R rows shown.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from attnscope.backend.frames import encode_binary, encode_stats
from attnscope.contract.plan import Capture, Plan, SampleNeed
from attnscope.contract.protocol import decode_frame
from attnscope.core.stats import valid_key_counts
from attnscope.settings import PROTOCOL_MAX_SIDE
from attnscope.training.rows import MAX_ROWS, RowStore
from attnscope.training.run import Run
from attnscope.training.stream import StreamTap
from transformer_core.builders import (
    RecurrentDecoderBuilder,
    RecurrentEncoderBuilder,
    TransformerEncoderBuilder,
)
from transformer_core.events import AttentionEvent, EventDispatcher
from transformer_core.masking import TriangularCausalMask

N, L, H, E = 2, 7, 2, 4
SIZES = dict(n_layers=2, n_heads=H, query_dimensions=E, value_dimensions=E,
             feed_forward_dimensions=16, dropout=0.0, attention_dropout=0.0)
TOKENS = list("abcdefghijklmnop")


def row(S: int, kind: str = "attention", role: str = "self", heads=(0,), value=None) -> Capture:
    """One query row (h, 1, S): weight 1 on key ``value`` (default: the last)."""
    data = torch.zeros(len(heads), 1, S)
    data[:, 0, S - 1 if value is None else value] = 1.0
    return Capture(kind, 0, 0, tuple(heads), data, role, time.time())


def grow(store: RowStore, sizes, step0: int = 0, sequence: int = 0, **kw) -> Capture:
    cap = None
    for i, S in enumerate(sizes):
        store.begin(step0 + i, sequence)
        new = {("attention", 0, 0): row(S, **kw)}
        if store.new_sequence_in(new):
            store.reset()
        cap = store.add(("attention", 0, 0), new[("attention", 0, 0)], TOKENS[i])
    return cap


# -- the row store ---------------------------------------------------------------------


def test_rows_grow_with_keys_and_carry_token_labels():
    cap = grow(RowStore(), [1, 2, 3, 4])
    assert tuple(cap.data.shape) == (1, 4, 4)
    torch.testing.assert_close(cap.data[0], torch.eye(4))  # zeros past each row's keys
    assert cap.labels == (list("abcd"), list("abcd"))


def test_a_view_handed_out_is_not_changed_by_later_rows():
    store = RowStore()
    first = grow(store, range(1, 15)).data.clone()
    held = store._slots[("attention", 0, 0)].grid.view()
    for S in range(15, 60):  # several regrowths of the buffer on both axes
        store.begin(S, 0)
        store.add(("attention", 0, 0), row(S), "x")
    torch.testing.assert_close(held, first)


def test_the_buffer_is_at_most_a_quarter_bigger_than_the_matrix_on_each_side():
    store = RowStore()
    for S in range(1, 301):
        store.begin(S, 0)
        store.add(("attention", 0, 0), row(S), None)
        grid = store._slots[("attention", 0, 0)].grid
        rows, keys = grid.buf.shape[1:]
        assert rows <= 1.25 * S + 17 and keys <= 1.25 * S + 17


@pytest.mark.parametrize("why", ["step goes back", "sequence called", "keys shrink"])
def test_a_new_sequence_starts_the_rows_over(why):
    store = RowStore()
    grow(store, [1, 2, 3], step0=10)
    step, sequence, S = 13, 0, 4
    if why == "step goes back":
        step = 0
    elif why == "sequence called":
        sequence = 1
    else:
        S = 1
    store.begin(step, sequence)
    new = {("attention", 0, 0): row(S)}
    if store.new_sequence_in(new):
        store.reset()
    cap = store.add(("attention", 0, 0), new[("attention", 0, 0)], "z")
    assert cap.data.shape[1] == 1
    assert cap.labels[0] == ["z"]


def test_cross_rows_keep_the_memory_axis_and_start_over_when_it_changes():
    store = RowStore()
    cap = grow(store, [5, 5, 5], role="cross", value=2)
    assert tuple(cap.data.shape) == (1, 3, 5)
    assert cap.labels == (list("abc"), None)  # the memory's keys are not the tokens
    assert store.new_sequence_in({("attention", 0, 0): row(6, role="cross")})
    assert not store.new_sequence_in({("attention", 0, 0): row(5, role="cross")})


def test_rows_missed_start_the_slot_over_at_the_right_position():
    store = RowStore()
    grow(store, [1, 2, 3])
    store.begin(3, 0)
    cap = store.add(("attention", 0, 0), row(6), "f")  # keys 4 and 5 were never seen
    assert tuple(cap.data.shape) == (1, 1, 6)
    assert cap.labels == (["f"], None)


def test_rows_past_max_rows_drop_the_oldest_and_labels_follow():
    store = RowStore(max_rows=4)
    cap = grow(store, range(1, 11))  # ten tokens, four shown
    assert tuple(cap.data.shape) == (1, 4, 10)
    torch.testing.assert_close(cap.data[0], torch.eye(10)[6:])
    assert cap.labels == (list("ghij"), list("abcdefghij"))  # every key is still there
    assert store._slots[("attention", 0, 0)].grid.buf.shape[1] <= 5  # 4 rows + 1/4


def test_rows_without_tokens_are_labelled_by_position_once_they_do_not_start_at_zero():
    store = RowStore(max_rows=2)
    for S in (1, 2, 3):
        store.begin(S, 0)
        cap = store.add(("attention", 0, 0), row(S), None)
    assert cap.labels == (["1", "2"], None)


def test_max_rows_is_the_protocols_largest_view():
    assert MAX_ROWS == PROTOCOL_MAX_SIDE
    with pytest.raises(ValueError, match="max_rows"):
        RowStore(max_rows=0)


def test_head_stats_rows_count_each_rows_own_keys():
    store = RowStore()
    caps = []
    for S in (1, 2, 3):
        store.begin(S, 0)
        caps.append(store.add(("head_stats", 0, 0), row(S, kind="head_stats"), "t"))
    # a first token's row (one key) is not shown as statistics: it would read as collapsed
    assert caps[0] is None
    cap = caps[-1]
    R, S = cap.data.shape[-2:]
    assert valid_key_counts(cap.masks, 0, R, S).tolist() == [1, 2, 3]


def test_qkv_norm_rows_grow_along_positions():
    store = RowStore(max_rows=3)
    for i in range(5):
        store.begin(i, 0)
        cap = Capture("qkv_norms", 0, 0, (0, 1), torch.full((3, 2, 1), float(i)), "self", 0.0)
        cap = store.add(("qkv_norms", 0, 0), cap, TOKENS[i])
    assert tuple(cap.data.shape) == (3, 2, 3)
    assert cap.data[0, 0].tolist() == [2.0, 3.0, 4.0]
    assert cap.labels[0] == list("cde")


# -- the publisher on a recurrent model ------------------------------------------------


def twins():
    """A recurrent encoder and the causal batch encoder with the same weights."""
    torch.manual_seed(0)
    rec = RecurrentEncoderBuilder.from_kwargs(attention_type="full", **SIZES,
                                              event_dispatcher=EventDispatcher()).get().eval()
    batch = TransformerEncoderBuilder.from_kwargs(attention_type="full", **SIZES,
                                                  event_dispatcher=EventDispatcher()).get().eval()
    batch.load_state_dict(rec.state_dict())
    return rec, batch


def batch_matrices(batch, x) -> list[torch.Tensor]:
    """Each layer's causal attention (N, H, L, L) of the batch model on ``x``."""
    seen: list[AttentionEvent] = []
    batch.layers[0].attention.inner_attention.event_dispatcher.listen(AttentionEvent, seen.append)
    batch(x, attn_mask=TriangularCausalMask(x.shape[1]))
    assert [e.source for e in seen] == [layer.attention.inner_attention for layer in batch.layers]
    return [e.attention_matrix.detach() for e in seen]


# A plan slower than any test: rows of a recurrent site are kept anyway.
SLOW = Plan(interval=3600.0, sources=frozenset({("attn", 0), ("attn", 1), ("qkv", 0)}),
            needs={0: (SampleNeed(1, attention=True, stats=True, logits=True, qkv=True),),
                   1: (SampleNeed(1, attention=True, attention_heads=(1,)),)})


def publisher_on(model) -> tuple[Run, StreamTap]:
    run = Run(model, run_id="gen")
    publisher = StreamTap(run, lambda run_id: None)
    publisher.set_plan(SLOW)
    return run, publisher


def test_slots_fill_row_by_row_with_the_batch_models_matrix():
    rec, batch = twins()
    x = torch.randn(N, L, H * E)
    expected = batch_matrices(batch, x)
    run, publisher = publisher_on(rec)
    state = None
    for t in range(L):
        _, state = rec(x[:, t], state=state)
        run.step(t, tokens=[[TOKENS[t]], [TOKENS[t].upper()]])
        cap = publisher.slots[("attention", 0, 1)]
        assert tuple(cap.data.shape) == (H, t + 1, t + 1)
        torch.testing.assert_close(cap.data.float(), expected[0][1, :, : t + 1, : t + 1],
                                   atol=2e-3, rtol=0)  # float16
    assert cap.labels == (list("ABCDEFG"), list("ABCDEFG"))
    assert cap.step == L - 1
    one_head = publisher.slots[("attention", 1, 1)]
    torch.testing.assert_close(one_head.data.float(), expected[1][1, 1:2], atol=2e-3, rtol=0)
    logits = publisher.slots[("qk_logits", 0, 1)].data
    assert tuple(logits.shape) == (H, L, L) and torch.isneginf(logits[:, 0, 1:]).all()
    assert tuple(publisher.slots[("qkv_norms", 0, 1)].data.shape) == (3, H, L)

    header, array = decode_frame(encode_binary("gen", cap, None, 128, "float16"))
    assert header["shape"] == [H, L, L] and header["labels"]["queries"] == list("ABCDEFG")
    stats = json.loads(encode_stats("gen", publisher.slots[("head_stats", 0, 1)]))
    # positional roles are known (the rows start at position 0); entropy per row's own keys
    assert all(v is not None for v in stats["previous_token"] + stats["diagonal"])
    assert all(0.0 <= v <= 1.0 for v in stats["entropy"])


def test_a_new_sequence_on_the_run_starts_the_rows_over():
    rec, _ = twins()
    run, publisher = publisher_on(rec)
    state = None
    for t in range(3):
        _, state = rec(torch.randn(N, H * E), state=state)
        run.step(t)
    assert publisher.slots[("attention", 0, 1)].data.shape[1] == 3
    run.new_sequence()
    _, state = rec(torch.randn(N, H * E), state=state)  # the model's state goes on
    run.step(3)
    assert tuple(publisher.slots[("attention", 0, 1)].data.shape) == (H, 1, 4)
    _, _ = rec(torch.randn(N, H * E), state=None)  # a fresh state: keys shrink to 1
    run.step(4)
    assert tuple(publisher.slots[("attention", 0, 1)].data.shape) == (H, 1, 1)


def test_decoder_cross_rows_span_the_memory():
    torch.manual_seed(0)
    model = RecurrentDecoderBuilder.from_kwargs(
        self_attention_type="full", cross_attention_type="linear", **SIZES,
        event_dispatcher=EventDispatcher()).get().eval()
    run = Run(model, run_id="dec")
    publisher = StreamTap(run, lambda run_id: None)
    publisher.set_plan(Plan(interval=3600.0, sources=frozenset({("attn", 1)}),
                            needs={1: (SampleNeed(0, attention=True),)}))
    memory, state = torch.randn(N, 5, H * E), None
    for t in range(4):
        _, state = model(torch.randn(N, H * E), memory, state=state)
        run.step(t)
    cap = publisher.slots[("attention", 1, 0)]
    assert cap.role == "cross" and tuple(cap.data.shape) == (H, 4, 5)
    torch.testing.assert_close(cap.data.float().sum(-1), torch.ones(H, 4), atol=1e-2, rtol=0)


def test_the_rows_are_forgotten_when_nobody_watches():
    rec, _ = twins()
    run, publisher = publisher_on(rec)
    _, state = rec(torch.randn(N, H * E), state=None)
    run.step(0)
    assert publisher._rows._slots
    publisher.set_plan(Plan())
    assert not publisher._rows._slots


def test_rows_grow_without_step_calls():
    """A generation loop that never calls step(): each forward publishes the one before."""
    rec, _ = twins()
    run, publisher = publisher_on(rec)
    state = None
    for _ in range(4):
        _, state = rec(torch.randn(N, H * E), state=state)
    assert tuple(publisher.slots[("attention", 0, 1)].data.shape) == (H, 3, 3)
    publisher.flush_stale(max_age=0.0)
    assert tuple(publisher.slots[("attention", 0, 1)].data.shape) == (H, 4, 4)


@pytest.mark.gpu
def test_rows_of_a_model_on_cuda_equal_the_batch_models_and_are_kept_on_the_cpu():
    rec, batch = twins()
    rec, batch = rec.cuda(), batch.cuda()
    x = torch.randn(N, L, H * E, device="cuda")
    expected = [m.cpu() for m in batch_matrices(batch, x)]
    run, publisher = publisher_on(rec)
    state = None
    with torch.no_grad():
        for t in range(L):
            _, state = rec(x[:, t], state=state)
            run.step(t)
    cap = publisher.slots[("attention", 0, 1)]
    assert cap.data.device.type == "cpu" and tuple(cap.data.shape) == (H, L, L)
    torch.testing.assert_close(cap.data.float(), expected[0][1], atol=2e-3, rtol=0)
    stats = json.loads(encode_stats("gen", publisher.slots[("head_stats", 0, 1)]))
    assert all(v is not None for v in stats["entropy"] + stats["previous_token"])
    assert state[0][0].is_cuda  # the model's own state stays on the device
