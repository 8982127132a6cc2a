"""Temporarily send a model's events somewhere else."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

from .dispatcher import EventDispatcher


@contextmanager
def dispatching_to(model: nn.Module, dispatcher: EventDispatcher) -> Iterator[None]:
    """Within the block, every module of ``model`` dispatches to ``dispatcher`` only.

    Listeners on the modules' own dispatchers see nothing of a forward pass run
    inside the block (an evaluation batch, a probe input); the modules' own
    dispatchers are restored on exit, even on error.

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
    # vars() and object.__setattr__: the dispatcher is a plain attribute, and skipping
    # nn.Module's __getattr__ / __setattr__ makes the swap (and its window) several times
    # shorter, which matters to a recorder that swaps every few training steps.
    saved = [(m, d) for m in model.modules()
             if isinstance(d := vars(m).get("event_dispatcher"), EventDispatcher)]
    for module, _ in saved:
        object.__setattr__(module, "event_dispatcher", dispatcher)
    try:
        yield
    finally:
        for module, original in saved:
            object.__setattr__(module, "event_dispatcher", original)
