"""The seed documentation's examples, with ``fast_transformers`` -> ``transformer_core``.

The code below is the seed's, apart from the import prefix, plotting, and the
typos the seed has (an unclosed parenthesis; ``shape[2]`` where the comment
means the heads, ``shape[1]``).
"""

from __future__ import annotations

import torch

from transformer_core.builders import TransformerEncoderBuilder
from transformer_core.events import AttentionEvent, EventDispatcher, IntermediateOutput, QKVEvent
from transformer_core.events.filters import event_class, from_layer, layer_name_contains

from .helpers import Recorder


def test_getting_started():
    # Make a transformer as we always would
    transformer = TransformerEncoderBuilder.from_kwargs(
        n_layers=4,
        n_heads=4,
        query_dimensions=64,
        value_dimensions=64
    ).get()

    # Make an event handler that just appends to a list
    attentions = []

    def save_attention_matrix(event):
        attentions.append(event.attention_matrix.detach().cpu())

    # Register said event handler for AttentionEvents
    EventDispatcher.get().listen(AttentionEvent, save_attention_matrix)

    # Do a forward pass like always
    transformer(torch.rand(10, 100, 64*4))

    assert len(attentions) == 4
    for matrix in attentions:
        assert matrix.shape == (10, 4, 100, 100)
        torch.testing.assert_close(matrix.sum(-1), torch.ones(10, 4, 100))
        assert (matrix >= 0).all()
    assert attentions[0][0, 0].shape == (100, 100)  # what the seed plots
    EventDispatcher.get().remove(save_attention_matrix)


def make_net():
    return TransformerEncoderBuilder.from_kwargs(
        n_layers=11, n_heads=4, query_dimensions=2, value_dimensions=2,
        feed_forward_dimensions=8,
    ).get().eval()


def run_with(net, event_filter) -> list:
    got = Recorder()
    EventDispatcher.get().listen(event_filter, got)
    with torch.no_grad():
        net(torch.rand(2, 6, 8))
    EventDispatcher.get().remove(got)
    return got.events


def test_filter_examples():
    net = make_net()

    # Checking whether an event is from a specific class
    filter1 = event_class(AttentionEvent)

    # Checking whether an event comes from a specific layer
    filter2 = from_layer(net.layers[10])

    # Checking whether the human readable name of the module contains a string
    filter3 = layer_name_contains(net, "layers.10")

    # Check whether it comes from a specific layer *and* is an AttentionEvent
    filter4 = from_layer(net.layers[10]) & event_class(AttentionEvent)
    # or equivalently
    filter4b = from_layer(net.layers[10]) & AttentionEvent

    # Check whether the attention matrix has 4 heads
    filter5 = (
        event_class(AttentionEvent) &  # unless we also use the event_class
                                       # filter the event might not have the
                                       # attention_matrix attribute
        (lambda ev: ev.attention_matrix.shape[1]==4)
    )

    events1 = run_with(net, filter1)
    assert len(events1) == 11 and all(isinstance(ev, AttentionEvent) for ev in events1)

    layer10 = net.layers[10]
    events2 = run_with(net, filter2)
    assert [type(ev) for ev in events2] == [QKVEvent, AttentionEvent, IntermediateOutput]
    assert events2[2].source is layer10

    events3 = run_with(net, filter3)
    assert [ev.source for ev in events3] == [ev.source for ev in events2]

    for flt in (filter4, filter4b, AttentionEvent & from_layer(net.layers[10])):
        (event,) = run_with(net, flt)
        assert event.source is layer10.attention.inner_attention

    assert len(run_with(net, filter5)) == 11
    as_written = event_class(AttentionEvent) & (lambda ev: ev.attention_matrix.shape[2] == 4)
    assert run_with(net, as_written) == []  # shape[2] is L (6 here), never 4


def test_default_dispatcher_is_used_unless_given():
    net = make_net()
    ed = EventDispatcher.get()
    assert all(m.event_dispatcher is ed for m in net.modules() if hasattr(m, "event_dispatcher"))
