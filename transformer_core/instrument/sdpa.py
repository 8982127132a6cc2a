"""Adapter for modules that call ``F.scaled_dot_product_attention`` themselves
(nanoGPT's ``CausalSelfAttention``, timm's ``Attention``, most hand-written models).

While the module's dispatcher has listeners, its forward runs under a
``TorchFunctionMode`` that lets every call through unchanged and, after each
``scaled_dot_product_attention`` call, dispatches that call's q, k, mask,
``is_causal``, scale and ``enable_gqa`` as a lazy AttentionEvent. Nobody listening:
no mode, the module's forward runs as it is. Only calls made inside the selected
modules are seen, whatever name the module imported the function under.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .lazy import SDPACall, sdpa_event
from .sites import AttentionSite
from .wrapping import dispatcher_of, emit_eagerly, wrap_forward

KIND = "sdpa"
_SDPA = F.scaled_dot_product_attention
_SDPA_NAME = "scaled_dot_product_attention"


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    return query, key, attn_mask, is_causal, scale


class _Watching(threading.local):
    """Per thread: the selected modules whose forward is running, innermost last."""

    stack: list[nn.Module] | None = None


_watching = _Watching()


class _SDPAMode(TorchFunctionMode):
    """Dispatches each ``scaled_dot_product_attention`` call on the innermost watched module."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _SDPA and _watching.stack:
            module = _watching.stack[-1]
            if module.event_dispatcher.has_listeners:
                emit_eagerly(_dispatch, module, args, kwargs)
        return out


def _dispatch(module: nn.Module, args: tuple, kwargs: dict) -> None:
    query, key, mask, is_causal, scale = _sdpa_args(*args, **kwargs)
    call = SDPACall.of(query, key, mask, is_causal, scale)
    module.event_dispatcher.dispatch(sdpa_event(module, call, role=module.attnscope_role))


@contextmanager
def _intercepting(module: nn.Module) -> Iterator[None]:
    """Run a watched module's forward; the outermost one enters the mode."""
    outermost = not _watching.stack
    if outermost:
        _watching.stack = []
    _watching.stack.append(module)
    try:
        if outermost:
            with _SDPAMode():
                yield
        else:
            yield
    finally:
        _watching.stack.pop()
        if outermost:
            _watching.stack = None


def calls_sdpa(module: nn.Module) -> bool:
    """Whether the code of ``type(module).forward`` names ``scaled_dot_product_attention``."""
    forward = getattr(type(module).forward, "__wrapped__", type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and _SDPA_NAME in code.co_names


def instrument_sdpa(name: str, module: nn.Module, index: int, role: str = "self",
                    heads: int | None = None, d_model: int | None = None) -> AttentionSite:
    """Make ``module`` dispatch the SDPA calls of its forward while someone listens."""
    dispatcher = dispatcher_of(module)
    module.attnscope_role = role
    wrap_forward(module, dispatcher, around=_intercepting)
    return AttentionSite(index=index, name=name, module=module, dispatcher=dispatcher,
                         qkv_dispatcher=None, heads=heads, d_model=d_model, role=role,
                         attention_type="full", kind=KIND)
