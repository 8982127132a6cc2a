"""Temporarily send a model's events somewhere else."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

from .dispatcher import EventDispatcher, _redirect


@contextmanager
def dispatching_to(model: nn.Module, dispatcher: EventDispatcher) -> Iterator[None]:
    """Within the block, what ``model``'s dispatchers are given from this thread goes to
    ``dispatcher`` only.

    Listeners on the modules' own dispatchers see nothing of a forward pass run
    inside the block (an evaluation batch, a probe input). Nothing about the model
    changes: the redirect is this thread's, so listeners that other threads add or
    remove meanwhile (a dashboard's) stay on the modules' own dispatchers, and
    other threads' forward passes are not redirected (nor is a model's work in
    threads of its own, such as ``nn.DataParallel`` replicas). Nests; undone on
    exit, even on error.

    >>> from transformer_core.builders import TransformerEncoderBuilder
    >>> import torch
    >>> net = TransformerEncoderBuilder.from_kwargs(n_layers=1, n_heads=1,
    ...     query_dimensions=4, value_dimensions=4, feed_forward_dimensions=8).get()
    >>> private, seen = EventDispatcher(), []
    >>> private.listen(lambda ev: True, seen.append)
    >>> with dispatching_to(net, private):
    ...     _ = net(torch.rand(1, 3, 4))
    >>> len(seen) > 0, net.layers[0].event_dispatcher is EventDispatcher.get()
    (True, True)
    """
    own = {d for m in model.modules()
           if isinstance(d := vars(m).get("event_dispatcher"), EventDispatcher)}
    previous = _redirect.table
    _redirect.table = {**(previous or {}), **dict.fromkeys(own, dispatcher)}
    try:
        yield
    finally:
        _redirect.table = previous
