"""Fixtures for transformer_core tests: deterministic seeds, clean dispatchers,
small model factories and float64 reference computations.

Shape legend: N batch, L queries, S keys, H heads, E query/key dim, D value dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from transformer_core.builders import TransformerDecoderBuilder, TransformerEncoderBuilder
from transformer_core.events import EventDispatcher


@pytest.fixture(autouse=True)
def _seed_and_clean_dispatchers() -> Iterator[None]:
    """Every test starts seeded and leaves no handler on any process-wide dispatcher."""
    torch.manual_seed(0)
    yield
    for dispatcher in list(EventDispatcher._dispatchers.values()):
        dispatcher.clear()


@pytest.fixture
def dispatcher() -> EventDispatcher:
    """A private dispatcher: tests using it never touch the global one."""
    return EventDispatcher()


def _factory(builder, dispatcher: EventDispatcher) -> Callable[..., torch.nn.Module]:
    """Small models from ``builder`` (eval mode, private dispatcher unless given)."""

    def make(**kwargs):
        options = dict(
            n_layers=2, n_heads=2, query_dimensions=4, value_dimensions=4,
            feed_forward_dimensions=16, event_dispatcher=dispatcher,
        )
        options.update(kwargs)
        return builder.from_kwargs(**options).get().eval()

    return make


@pytest.fixture
def make_encoder(dispatcher: EventDispatcher) -> Callable[..., torch.nn.Module]:
    """Small encoder factory (eval mode, private dispatcher unless given)."""
    return _factory(TransformerEncoderBuilder, dispatcher)


@pytest.fixture
def make_decoder(dispatcher: EventDispatcher) -> Callable[..., torch.nn.Module]:
    """Small decoder factory (eval mode, private dispatcher unless given)."""
    return _factory(TransformerDecoderBuilder, dispatcher)
