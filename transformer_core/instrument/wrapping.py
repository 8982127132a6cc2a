"""Wrapping one module instance's ``forward`` (never its class, never with hooks).

Forward hooks would switch off PyTorch's fused encoder fast path; replacing the
instance's ``forward`` does not. With nobody listening the wrapper costs one
attribute read and a call; the module's own code and kernels run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn as nn

from ..events import EventDispatcher

# (module, args, kwargs, output) -> None: builds and dispatches the module's event.
Emitter = Callable[[nn.Module, tuple, dict, Any], None]
# module -> a context the forward runs in while someone listens (an interception).
Around = Callable[[nn.Module], AbstractContextManager]


def dispatcher_of(module: nn.Module) -> EventDispatcher:
    """The module's own dispatcher, attached on first use (``module.event_dispatcher``,
    where :func:`~transformer_core.events.dispatching_to` finds it)."""
    dispatcher = vars(module).get("event_dispatcher")
    if not isinstance(dispatcher, EventDispatcher):
        dispatcher = EventDispatcher()
        module.event_dispatcher = dispatcher
    return dispatcher


class WrappedForward:
    """``module.forward`` replaced: while ``dispatcher`` has listeners, the original
    forward runs inside ``around(module)`` and ``emit`` follows it; otherwise the
    original forward alone. A plain class (not a closure) so models still pickle."""

    def __init__(self, module: nn.Module, dispatcher: EventDispatcher,
                 emit: Emitter | None = None, around: Around | None = None) -> None:
        self.module = module
        self.dispatcher = dispatcher
        self.emit = emit
        self.around = around
        self.inner = vars(module).get("forward")  # another library's instance forward, if any

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.dispatcher.has_listeners:
            return self._forward(args, kwargs)
        with self.around(self.module) if self.around is not None else nullcontext():
            out = self._forward(args, kwargs)
        if self.emit is not None:
            emit_eagerly(self.emit, self.module, args, kwargs, out)
        return out


@torch.compiler.disable
def emit_eagerly(emit: Callable[..., None], *args: Any) -> None:
    """``emit(*args)`` outside any ``torch.compile`` graph: a compiled model breaks its
    graph here, and only while someone listens (the call is skipped otherwise)."""
    emit(*args)


def wrap_forward(module: nn.Module, dispatcher: EventDispatcher, emit: Emitter | None = None,
                 around: Around | None = None) -> None:
    """Make ``module`` emit through ``dispatcher`` while it has listeners (see
    :class:`WrappedForward`); a module already wrapped is left as it is."""
    if isinstance(vars(module).get("forward"), WrappedForward):
        return
    module.forward = WrappedForward(module, dispatcher, emit, around)
