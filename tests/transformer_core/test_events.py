"""Event payloads, the EventDispatcher and the AttentionEvent's lazy/slice paths."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from transformer_core.events import (
    AttentionEvent,
    Event,
    EventDispatcher,
    IntermediateOutput,
    QKVEvent,
    dispatching_to,
)
from transformer_core.events.filters import event_class
from transformer_core.masking import LengthMask

from .helpers import Recorder

# -- payloads -----------------------------------------------------------------


def test_events_carry_source_and_payload():
    src = object()
    x = torch.zeros(1, 2, 3)
    assert Event(src).source is src
    qkv = QKVEvent(src, "q", "k", "v")
    assert (qkv.source, qkv.queries, qkv.keys, qkv.values) == (src, "q", "k", "v")
    out = IntermediateOutput(src, x)
    assert out.source is src and out.x is x
    assert isinstance(qkv, Event) and isinstance(out, Event)


# -- EventDispatcher.get ------------------------------------------------------


def test_get_returns_one_dispatcher_per_key():
    assert EventDispatcher.get() is EventDispatcher.get("")
    assert EventDispatcher.get("a") is EventDispatcher.get("a")
    assert EventDispatcher.get("a") is not EventDispatcher.get("b")
    assert EventDispatcher.get("a") is not EventDispatcher.get()


def test_get_passes_instances_through():
    private = EventDispatcher()
    assert EventDispatcher.get(private) is private
    assert private not in EventDispatcher._dispatchers.values()


def test_get_rejects_other_types():
    with pytest.raises(TypeError, match="event_dispatcher"):
        EventDispatcher.get(3)


# -- listen / remove / clear / dispatch ---------------------------------------


def test_listen_dispatch_remove_clear():
    ed = EventDispatcher()
    assert not ed.has_listeners
    a, b = Recorder(), Recorder()
    ed.listen(Event, a)
    ed.listen(QKVEvent, b)
    assert ed.has_listeners
    ev, qkv = Event(None), QKVEvent(None, 1, 2, 3)
    ed.dispatch(ev)
    ed.dispatch(qkv)
    assert a.events == [ev, qkv]
    assert b.events == [qkv]
    ed.remove(a)
    ed.dispatch(qkv)
    assert a.events == [ev, qkv] and b.events == [qkv, qkv]
    ed.remove(a)  # removing an unknown handler is a no-op
    ed.clear()
    assert not ed.has_listeners
    ed.dispatch(qkv)
    assert len(b.events) == 2


def test_handlers_run_in_registration_order():
    ed = EventDispatcher()
    calls = []
    for name in "cab":
        ed.listen(Event, lambda ev, name=name: calls.append(name))
    ed.dispatch(Event(None))
    assert calls == ["c", "a", "b"]


def test_filter_promotion_event_subclass_and_callable():
    ed = EventDispatcher()
    by_class, by_callable, by_filter = Recorder(), Recorder(), Recorder()
    ed.listen(QKVEvent, by_class)
    ed.listen(lambda ev: getattr(ev, "source", None) == "me", by_callable)
    ed.listen(event_class(IntermediateOutput), by_filter)
    mine, other = QKVEvent("me", 0, 0, 0), IntermediateOutput("other", None)
    ed.dispatch(mine)
    ed.dispatch(other)
    assert by_class.events == [mine]
    assert by_callable.events == [mine]
    assert by_filter.events == [other]


@pytest.mark.parametrize("bad_filter", [3, "AttentionEvent", None, int])
def test_bad_filter_raises_type_error(bad_filter):
    with pytest.raises(TypeError, match="event_filter"):
        EventDispatcher().listen(bad_filter, print)


def test_bad_handler_raises_type_error():
    with pytest.raises(TypeError, match="event_handler"):
        EventDispatcher().listen(Event, "not callable")


def test_listen_and_remove_during_dispatch_use_a_snapshot():
    ed = EventDispatcher()
    late = Recorder()

    def first(ev):
        ed.remove(second)
        ed.listen(Event, late)

    second = Recorder()
    ed.listen(Event, first)
    ed.listen(Event, second)
    e1, e2 = Event(1), Event(2)
    ed.dispatch(e1)  # the snapshot taken when dispatch began is delivered
    assert second.events == [e1] and late.events == []
    ed.dispatch(e2)
    assert second.events == [e1] and late.events == [e2]


def test_listen_remove_from_another_thread_while_dispatching():
    ed = EventDispatcher()
    errors: list[BaseException] = []
    stop = threading.Event()
    steady = Recorder()
    ed.listen(Event, steady)

    def churn():
        try:
            for i in range(2000):
                handler = Recorder()
                ed.listen(Event, handler)
                if i % 2:
                    ed.remove(handler)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=churn)
    thread.start()
    dispatched = 0
    try:
        while not stop.is_set() and dispatched < 200_000:
            ed.dispatch(Event(dispatched))
            dispatched += 1
    except BaseException as exc:  # "dictionary changed size during iteration" and the like
        errors.append(exc)
    thread.join(timeout=30)
    assert not errors
    assert len(steady.events) == dispatched
    assert len(ed._listeners) == 1 + 1000  # steady + the handlers never removed


# -- private dispatchers and copies -------------------------------------------


def test_private_dispatcher_never_touches_global(make_encoder, dispatcher):
    glob = Recorder()
    EventDispatcher.get().listen(Event, glob)
    mine = Recorder()
    dispatcher.listen(Event, mine)
    net = make_encoder()
    net(torch.randn(1, 3, 8))
    assert glob.events == []
    assert mine.events  # the private one did see them
    for module in net.modules():
        if hasattr(module, "event_dispatcher"):
            assert module.event_dispatcher is dispatcher


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copied_model_keeps_keyed_dispatcher(make_encoder, copier):
    keyed = EventDispatcher.get("test-copies")
    net = make_encoder(event_dispatcher="test-copies")
    seen = Recorder()
    keyed.listen(AttentionEvent, seen)
    clone = copier(net)
    clone(torch.randn(1, 3, 8))
    assert len(seen.events) == 2
    assert all(ev.source in set(clone.modules()) for ev in seen.events)
    assert clone.layers[0].attention.event_dispatcher is keyed


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copied_model_with_private_dispatcher_gets_its_own(make_encoder, dispatcher, copier):
    net = make_encoder()
    dispatcher.listen(Event, lambda ev: None)  # a handler that cannot be pickled
    clone = copier(net)
    copies = {id(m.event_dispatcher) for m in clone.modules() if hasattr(m, "event_dispatcher")}
    assert len(copies) == 1  # still shared by the whole model
    new = clone.layers[0].event_dispatcher
    assert new is not dispatcher and not new.has_listeners
    assert new not in EventDispatcher._dispatchers.values()


# -- AttentionEvent -------------------------------------------------------------


class CountingLogits:
    """A logits function over a fixed (N, H, L, S) tensor that records what it computed."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, samples, heads) -> torch.Tensor:
        out = self.logits[samples][:, heads]
        self.calls.append(tuple(out.shape))
        return out


@pytest.fixture
def synthetic_event():
    logits = CountingLogits(torch.randn(3, 4, 5, 6))
    return AttentionEvent("src", (3, 4, 5, 6), logits), logits


def test_attention_matrix_is_lazy_and_cached(synthetic_event):
    event, logits = synthetic_event
    assert logits.calls == [] and event._matrix is None
    assert "computed=False" in repr(event)
    matrix = event.attention_matrix
    assert logits.calls == [(3, 4, 5, 6)]
    assert event.attention_matrix is matrix
    assert logits.calls == [(3, 4, 5, 6)]  # once
    torch.testing.assert_close(matrix, torch.softmax(logits.logits, -1))
    torch.testing.assert_close(matrix.sum(-1), torch.ones(3, 4, 5))


# (sample, heads, the same selection written as plain indexing of the full matrix m)
INDEXES = [
    (0, None, lambda m: m[0]),
    (-1, 2, lambda m: m[-1][2]),
    (1, [0, 3], lambda m: m[1][[0, 3]]),
    (2, slice(1, 3), lambda m: m[2][1:3]),
    ([2, 0], [1], lambda m: m[[2, 0]][:, [1]]),
    (slice(0, 2), slice(1, None), lambda m: m[0:2][:, 1:]),
    (None, None, lambda m: m),
    (None, -2, lambda m: m[:, -2]),
    (torch.tensor([1, 2]), torch.tensor(3), lambda m: m[[1, 2]][:, 3]),
    (torch.tensor(2), [True, False, True, False], lambda m: m[2][[0, 2]]),
]


@pytest.mark.parametrize(("sample", "heads", "expected"), INDEXES)
def test_attention_slice_equals_indexing_the_matrix(synthetic_event, sample, heads, expected):
    event, logits = synthetic_event
    full = torch.softmax(logits.logits, -1)
    got = event.attention(sample=sample, heads=heads)
    torch.testing.assert_close(got, expected(full))
    assert event._matrix is None  # the slice did not build the whole matrix
    # on a cached matrix the same call slices the cache
    torch.testing.assert_close(event.attention_matrix, full)
    torch.testing.assert_close(event.attention(sample=sample, heads=heads), expected(full))


def test_attention_computes_only_the_requested_slice(synthetic_event):
    event, logits = synthetic_event
    assert event.attention(sample=1, heads=[0, 2]).shape == (2, 5, 6)
    assert event.attention(sample=0, heads=slice(None)).shape == (4, 5, 6)
    assert logits.calls == [(1, 2, 5, 6), (1, 4, 5, 6)]


@pytest.mark.parametrize(
    ("sample", "heads", "match"),
    [(3, None, "sample"), (-4, None, "sample"), (0, 4, "head"), (0, [0, 9], "head"),
     ([5], None, "sample"), (None, [-5], "head")],
)
def test_attention_out_of_range_raises_index_error(synthetic_event, sample, heads, match):
    event, _ = synthetic_event
    with pytest.raises(IndexError, match=match):
        event.attention(sample=sample, heads=heads)
    with pytest.raises(IndexError, match=match):
        event.logits(sample=sample, heads=heads)


def test_logits_softmax_is_the_matrix(synthetic_event):
    event, logits = synthetic_event
    torch.testing.assert_close(event.logits(1, [2]), logits.logits[1][[2]])
    torch.testing.assert_close(torch.softmax(event.logits(), -1), event.attention_matrix)


def test_attention_event_metadata():
    ev = AttentionEvent("s", (1, 1, 2, 2), lambda n, h: torch.zeros(1, 1, 2, 2), role="cross",
                        attention_type="linear")
    assert ev.is_cross and ev.role == "cross" and ev.attention_type == "linear"
    assert not AttentionEvent("s", (1, 1, 2, 2), lambda n, h: None).is_cross
    given = torch.full((1, 1, 2, 2), 0.5)
    ev = AttentionEvent("s", (1, 1, 2, 2), lambda n, h: 1 / 0, matrix=given)
    assert ev.attention_matrix is given  # an emitter-built matrix is the cache
    assert "computed=True" in repr(ev)


@pytest.mark.parametrize("attention_type", ["full", "linear", "causal-linear", "local"])
def test_a_sample_copy_reads_like_the_event_after_the_model_moved_on(
        make_encoder, dispatcher, attention_type):
    """What a recorder keeps to read in another thread: one sample's own copies."""
    extra = {"local_context": 3} if attention_type == "local" else {}
    model = make_encoder(attention_type=attention_type, n_layers=1, **extra)
    events = Recorder()
    dispatcher.listen(AttentionEvent, events)
    lengths = None if attention_type == "causal-linear" else LengthMask(torch.tensor([7, 4, 2]))
    model(torch.randn(3, 7, 8), length_mask=lengths)
    event = events.events[0]
    want = [(event.attention(n).clone(), event.logits(n).clone()) for n in range(3)]
    copies = [event.sample_copy(n) for n in range(3)]
    for tensor in (event.queries, event.keys):
        if tensor is not None:
            tensor.data.fill_(float("nan"))  # the model's buffers are reused or freed
    for copy_, (attention, logits) in zip(copies, want, strict=True):
        assert copy_.shape == (1, *event.shape[1:]) and copy_.source is event.source
        assert copy_.attention_type == attention_type
        torch.testing.assert_close(copy_.attention(0), attention, rtol=0, atol=0)
        torch.testing.assert_close(copy_.logits(0), logits, rtol=0, atol=0)
    if lengths is not None:  # sample 2 has 2 keys: the rest of its rows is zero
        assert copies[2].attention(0)[..., 2:].abs().max() == 0


def test_an_event_without_a_recipe_copies_its_sample_matrix(synthetic_event):
    event, logits = synthetic_event
    want = logits.logits[2:3].clone()  # (1, H, L, S)
    copy_ = event.sample_copy(-1)
    assert logits.calls == [(1, 4, 5, 6), (1, 4, 5, 6)]  # computed now, that sample only
    logits.logits.fill_(0.0)  # the emitter's tensors change afterwards
    torch.testing.assert_close(copy_.logits(0), want[0])
    torch.testing.assert_close(copy_.attention(0, [1]), torch.softmax(want, -1)[0, [1]])
    with pytest.raises(IndexError, match="sample"):
        event.sample_copy(3)


@pytest.mark.parametrize("attention_type", ["full", "linear", "local"])
def test_concat_of_sample_copies_reads_like_each_copy(make_encoder, dispatcher, attention_type):
    """A recorder joins many steps' copies of one layer: one computation, same values."""
    extra = {"local_context": 3} if attention_type == "local" else {}
    model = make_encoder(attention_type=attention_type, n_layers=1, **extra)
    events = Recorder()
    dispatcher.listen(AttentionEvent, events)
    for lengths in ([7, 4, 2], [7, 7, 7], [3, 5, 6]):  # three "steps"
        model(torch.randn(3, 7, 8), length_mask=LengthMask(torch.tensor(lengths), max_len=7))
    copies = [e.sample_copy(n) for e in events.events for n in (2, 0)]
    joined = AttentionEvent.concat(copies)
    assert joined.shape == (6, *copies[0].shape[1:])
    if attention_type == "full":  # joined by the emitter: one computation from all inputs
        assert joined.queries.shape[0] == 6
    want = torch.cat([c.attention() for c in copies])  # (6, H, L, S)
    torch.testing.assert_close(joined.attention(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(joined.attention(4, [1]), want[4, [1]], rtol=0, atol=1e-6)
    logits = torch.cat([c.logits() for c in copies])
    assert torch.equal(torch.isinf(joined.logits()), torch.isinf(logits))
    assert AttentionEvent.concat(copies[:1]) is copies[0]


def test_dispatching_to_redirects_this_thread_only(make_encoder, dispatcher):
    """A recorder's probe pass runs inside dispatching_to in the training thread while a
    dashboard thread may subscribe: the subscription must land on the model's own
    dispatcher (and hear the next training step), and other threads' passes must not
    be redirected."""
    model = make_encoder(n_layers=1)
    x = torch.randn(1, 3, 8)
    private, outside, late = Recorder(), Recorder(), Recorder()
    redirected = EventDispatcher()
    redirected.listen(AttentionEvent, private)
    dispatcher.listen(AttentionEvent, outside)
    with dispatching_to(model, redirected):
        model(x)  # heard by the private listener only
        other = threading.Thread(target=lambda: (dispatcher.listen(AttentionEvent, late),
                                                  model(x)))
        other.start()
        other.join()  # a dashboard thread subscribes, another thread runs the model
        assert model.layers[0].event_dispatcher is dispatcher  # nothing about the model changed
    assert len(private.events) == 1
    assert len(outside.events) == 1 and len(late.events) == 1  # the other thread's pass
    model(x)
    assert len(outside.events) == 2 and len(late.events) == 2 and len(private.events) == 1
    with pytest.raises(RuntimeError), dispatching_to(model, redirected):
        raise RuntimeError("a failing forward")
    model(x)
    assert len(private.events) == 1 and len(outside.events) == 3  # undone on error


def test_dispatching_to_nests(make_encoder, dispatcher):
    model = make_encoder(n_layers=1)
    inner, outer = Recorder(), Recorder()
    first, second = EventDispatcher(), EventDispatcher()
    first.listen(AttentionEvent, outer)
    second.listen(AttentionEvent, inner)
    with dispatching_to(model, first):
        with dispatching_to(model, second):
            model(torch.randn(1, 3, 8))
        model(torch.randn(1, 3, 8))
    assert len(inner.events) == 1 and len(outer.events) == 1
