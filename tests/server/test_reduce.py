"""Head statistics reduced in one batched call where the tensors are, against a per-head
reference written out row by row; host copies; helper threads' torch thread counts."""

from __future__ import annotations

import math
import threading
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from stream_support import small_encoder

from attnscope.backend.frames import encode_binary
from attnscope.backend.history.store import HistoryStore
from attnscope.backend.history.writer import HistoryWriter
from attnscope.contract.plan import Capture, Plan, SampleNeed
from attnscope.contract.protocol import decode_frame
from attnscope.core.captured import pooled_view
from attnscope.core.history_config import HistoryConfig
from attnscope.core.history_items import StepItem, stats_of
from attnscope.core.reduce import layer_statistics, limit_threads, pool_matrix, to_host
from attnscope.core.stats import HEAD_STATISTICS, MaskInfo, valid_key_counts
from attnscope.training.run import Run
from attnscope.training.stream import StreamTap, _axis_labels
from transformer_core.attention.full_attention import FullAttention
from transformer_core.events import EventDispatcher
from transformer_core.masking import FullMask, LengthMask

cuda = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


def reference(p: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """(11,) statistics of ONE head's attention p (L, S), row by row in float64."""
    L, S = p.shape
    counts = np.full(L, S) if valid is None else valid
    ent = []
    for i in range(L):
        row = p[i]
        h = -sum(x * math.log(x) for x in row if x > 0)
        ent.append(h / math.log(max(counts[i], 2)) if counts[i] > 1 else 0.0)
    many = [i for i in range(L) if counts[i] > 1]
    rows = range(1, L)
    w = max(2, S // 16)
    out = [np.mean(ent), p.max(-1).mean(), p[:, 0].mean(), 0.0, 0.0]
    if L == S:
        out += [np.mean([sum(p[i, j] * abs(i - j) for j in range(S)) for i in rows]),
                np.mean([p[i, i - 1] for i in rows]), np.mean([p[i, i] for i in rows]),
                np.mean([sum(p[i, j] for j in range(S) if abs(i - j) <= w) for i in rows]),
                np.mean([p[i, 0] for i in rows])]
    else:
        out += [math.nan] * 4 + [np.mean([p[i, 0] for i in rows])]
    out.append(np.mean([ent[i] for i in many]) if many else math.nan)
    return np.array(out)


def _attention(H: int, L: int, S: int, causal: bool = False, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(H, L, S, generator=g) * 3
    if causal:
        logits = logits.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(logits, -1)  # (H, L, S)


@pytest.mark.parametrize("L,S,causal", [(24, 24, False), (40, 40, True), (8, 12, False)])
def test_batched_statistics_equal_the_per_head_reference(L: int, S: int, causal: bool) -> None:
    p = _attention(5, L, S, causal)
    valid = torch.arange(1, L + 1) if causal else None
    got = layer_statistics(p, valid)  # (11, H)
    assert got.shape == (11, 5) and got.dtype == torch.float32
    for h in range(5):
        want = reference(p[h].double().numpy(), None if valid is None else valid.numpy())
        np.testing.assert_allclose(got[:, h].numpy(), want, rtol=1e-5, atol=1e-6)


def test_float16_attention_is_reduced_in_float32() -> None:
    """A float16 copy (what the stream used to reduce) gives the same values to within its
    rounding; the reduction itself runs in float32."""
    p = _attention(4, 64, 64, causal=True)
    exact = layer_statistics(p, torch.arange(1, 65))
    half = layer_statistics(p.half(), torch.arange(1, 65))
    assert half.dtype == torch.float32
    np.testing.assert_allclose(half.numpy(), exact.numpy(), atol=2e-3)


def test_nan_and_inf_are_counted_per_head() -> None:
    p = _attention(3, 6, 6)
    p[1, 2, 3] = math.nan
    p[2, 0, :2] = math.inf
    got = layer_statistics(p)
    assert got[3].tolist() == [0.0, 1.0, 0.0] and got[4].tolist() == [0.0, 0.0, 2.0]
    assert math.isfinite(got[0, 0]) and math.isnan(got[0, 1])  # NaN row -> NaN entropy


def test_history_statistics_of_steps_equal_one_call_per_step() -> None:
    """stats_of joins steps and layers; each value equals that step's layer alone, with and
    without padding masks."""
    torch.manual_seed(0)
    att = FullAttention(attention_dropout=0.0)
    steps = []
    for k, lengths in enumerate([None, None, LengthMask(torch.tensor([5, 7]), max_len=7)]):
        q, kk = torch.randn(2, 7, 3, 4), torch.randn(2, 7, 3, 4)
        event = att._event(q, kk, 0.5, FullMask(7), lengths)
        steps.append(StepItem("s", k, 0.0, {}, {0: event.sample_copy(0)}, 2))
    rows = stats_of(steps)
    for k, item in enumerate(steps):
        event = item.attention[0]
        valid = valid_key_counts(MaskInfo.of(event), 0, 7, 7)
        want = layer_statistics(event.attention(sample=0), valid).numpy()
        assert rows[k].shape == (2, len(HEAD_STATISTICS), 3)
        np.testing.assert_allclose(rows[k][0, :11], want, rtol=1e-6, atol=1e-7)
        assert np.isnan(rows[k][1]).all() and np.isnan(rows[k][0, 11:]).all()
    assert rows[2][0, 0].tolist() != rows[1][0, 0].tolist()


def test_to_host_from_the_cpu_is_a_copy_ready_at_once() -> None:
    t = torch.ones(3)
    copy = to_host(t, torch.float16)
    t += 1
    assert copy.ready() and copy.wait().tolist() == [1.0, 1.0, 1.0]
    assert copy.tensor.dtype == torch.float16


def test_limit_threads_changes_the_calling_thread_only() -> None:
    """The writer's count is its own: threads that start computing later (the training
    thread among them) keep the process-wide count."""
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: dict[str, int] = {}

    def helper() -> None:
        limit_threads(1)
        seen["helper"] = torch.get_num_threads()

    def later() -> None:
        seen["later"] = torch.get_num_threads()

    try:
        for name, target in (("helper", helper), ("later", later)):
            t = threading.Thread(target=target, name=name)
            t.start()
            t.join()
        assert seen == {"helper": 1, "later": 2}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)
    with pytest.raises(ValueError, match="n: need at least 1"):
        limit_threads(0)


@cuda
def test_cuda_statistics_equal_the_cpu_ones_and_arrive_through_an_event() -> None:
    p = _attention(6, 48, 48, causal=True)
    valid = torch.arange(1, 49)
    copy = to_host(layer_statistics(p.cuda(), valid.cuda()))
    assert copy.tensor.is_pinned() and copy.done is not None
    np.testing.assert_allclose(copy.wait().numpy(), layer_statistics(p, valid).numpy(),
                               rtol=1e-4, atol=1e-5)


@cuda
def test_a_watched_step_on_cuda_never_waits_for_the_device(tmp_path) -> None:
    """History on and a viewer on every head: the training thread's part of a step raises
    no synchronisation (torch's sync debug mode would turn one into an error), and what
    arrives equals the CPU computation."""
    model = small_encoder(EventDispatcher()).cuda().eval()
    run = Run(model, run_id="toy")
    service = HistoryWriter(HistoryStore(tmp_path), HistoryConfig())
    service.attach(run)
    publisher = StreamTap(run, notify=lambda _: None)
    need = SampleNeed(0, attention=True, stats=True)
    publisher.set_plan(Plan(interval=0.0, sources=frozenset({("attn", 0), ("attn", 1)}),
                            needs={0: (need,), 1: (need,)}))
    x = torch.randn(2, 6, 8, device="cuda")
    with torch.no_grad():
        model(x)
    run.step(0, loss=1.0)  # the first step also takes the probe snapshot
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():  # "a prototype feature": said once, not a failure
            warnings.filterwarnings("ignore", "Synchronization debug mode", UserWarning)
            torch.cuda.set_sync_debug_mode("error")
        with torch.no_grad():
            model(x)
        run.step(1, loss=1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stats = publisher.slots[("head_stats", 1, 0)]
    attention = publisher.slots[("attention", 1, 0)]
    assert stats.step == 1 and stats.data.is_pinned()
    want = layer_statistics(attention.wait().float())
    np.testing.assert_allclose(stats.wait().numpy(), want.numpy(), atol=2e-3)
    assert service.flush()
    row = service.store.stat_at(service.session_of("toy"), 1)
    publisher.close()
    service.close()
    assert row is not None and row.step == 1  # the history's row: the same values
    np.testing.assert_allclose(row.heads[1, :11], want.numpy(), atol=2e-3)


def test_a_view_pooled_where_captured_equals_one_pooled_when_encoded() -> None:
    """The publisher pools to the subscribers' max_side before the copy; frames (values,
    pool factor, labels) are those of a full-resolution capture pooled by the encoder,
    also for a view size the capture was not pooled for."""
    a = _attention(3, 300, 300)
    labels = [f"t{i}" for i in range(300)]
    pooled = pooled_view(0, SampleNeed(0, attention=True, max_side=64), (0, 1, 2), a, "self", 1.0)
    full = Capture("attention", 0, 0, (0, 1, 2), a.half(), "self", 1.0)
    assert pooled.data.shape == (3, 60, 60) and pooled.pool == 5
    for cap in (pooled, full):
        cap.labels = _axis_labels(labels, cap)
    for side in (64, 32, 100):
        got, want = (decode_frame(encode_binary("r", cap, None, side, "float16"))
                     for cap in (pooled, full))
        if side == 100:  # 300 / 100 = 3 is no multiple of 5: the pooled view stays at 5
            assert got[0]["pool"] == 5 and got[1].shape == (3, 60, 60)
            continue
        assert got[0]["pool"] == want[0]["pool"] and got[0]["labels"] == want[0]["labels"]
        np.testing.assert_allclose(got[1].astype(np.float32), want[1].astype(np.float32),
                                   atol=2e-3)


def test_on_the_cpu_the_training_thread_only_copies_and_the_reader_computes() -> None:
    """A CPU capture holds the sample's queries and keys; the first read computes the
    attention once for both captures, equal to the event's own (statistics included)."""
    torch.manual_seed(0)
    att = FullAttention(attention_dropout=0.0)
    q, k = torch.randn(2, 40, 3, 4), torch.randn(2, 40, 3, 4)
    event = att._event(q, k, 0.5, FullMask(40), LengthMask(torch.tensor([40, 30])))
    need = SampleNeed(1, attention=True, stats=True, max_side=20)
    # a publisher of no recurrent site, in the server's process (no staging: computed here)
    no_rows = SimpleNamespace(_row_layers=frozenset(), staging=None)
    stats, view = StreamTap._capture_attention(no_rows, event, 0, (need,))
    assert stats.pending is not None and view.pending is not None  # nothing computed yet
    assert view.full_shape == (40, 40) and view.pool == 2
    a = event.attention(sample=1)  # (H, L, S)
    valid = valid_key_counts(MaskInfo.of(event), 1, 40, 40)
    np.testing.assert_allclose(stats.wait().numpy(), layer_statistics(a, valid).numpy(),
                               rtol=1e-6, atol=1e-7)
    assert view.wait().shape == (3, 20, 20) and view.data.dtype == torch.float16
    np.testing.assert_allclose(view.data.float().numpy(), pool_matrix(a, 2).numpy(), atol=1e-3)
