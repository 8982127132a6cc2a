"""Adapter for Hugging Face ``transformers`` models (4.4x to 5.x).

Their attention modules call one function of the attention interface
(``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, or the modeling file's
own ``eager_attention_forward``) with the module, q (N, H, L, E) after RoPE, k and
v (N, K, S, E) after the cache update, the mask the model built for that
implementation, and the scale, soft cap and position bias. Those functions are
wrapped (once per process): the wrapper calls the original, so the configured
implementation (``sdpa`` by default) still computes the output, and then, only for
an instrumented module whose dispatcher has listeners, dispatches a lazy
AttentionEvent built from the same arguments. Other modules and models pay one
dictionary look-up per call.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .lazy import SDPACall, sdpa_event
from .sites import AttentionSite
from .wrapping import dispatcher_of, emit_eagerly

logger = logging.getLogger(__name__)

KIND = "huggingface"
_MARK = "__attnscope_wrapped__"
_INTERFACE_NAMES = ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
# Module names of cross-attention in models whose attention class serves both roles.
_CROSS_NAMES = ("crossattention", "encdecattention", "encoder_attn", "cross_attn")


def hf_call(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
            attention_mask: torch.Tensor | None, kwargs: dict[str, Any],
            implementation: str) -> SDPACall:
    """What one attention-interface call applies, as an :class:`SDPACall`.

    query (N, H, L, E), key (N, K, S, E), attention_mask bool (True: attend) or
    float (added), (N|1, 1|H, L, >=S). ``position_bias`` (T5) is added, ``softcap``
    applied before the mask; ``is_causal`` is taken as ``sdpa`` takes it (only when
    no mask is given and L > 1); ``eager`` relies on its mask alone.
    """
    L, S = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.ndim == 2:
        return _flash_call(module, query, key, attention_mask, kwargs)
    mask = None if attention_mask is None else attention_mask[..., :S]  # (N|1, 1|H, L, S)
    bias = kwargs.get("position_bias")
    if bias is not None:
        bias = bias[..., :S]
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
        else:
            mask = bias + mask
    is_causal = False
    if implementation != "eager" and attention_mask is None:
        flag = kwargs.get("is_causal")
        flag = getattr(module, "is_causal", True) if flag is None else flag
        is_causal = bool(flag) and L > 1
        if is_causal and implementation != "sdpa":  # flash/flex: bottom-right aligned
            return _flash_call(module, query, key, None, kwargs)
    return SDPACall.of(query, key, mask, is_causal, kwargs.get("scaling"), kwargs.get("softcap"))


def _flash_call(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                padding: torch.Tensor | None, kwargs: dict[str, Any]) -> SDPACall:
    """For kernels given a (N, S) padding mask (1: keep) instead of an (L, S) mask:
    causal aligned bottom-right (the last query sees the last key), an optional
    ``sliding_window``, and the padding, as one bool mask (N|1, 1, L, S)."""
    L, S = query.shape[2], key.shape[2]
    flag = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if flag is None else flag
    rows = torch.arange(L, device=query.device)[:, None] + (S - L)  # (L, 1)
    cols = torch.arange(S, device=query.device)[None, :]  # (1, S)
    keep = torch.ones(L, S, dtype=torch.bool, device=query.device)
    if causal:
        keep = keep & (cols <= rows)
    window = kwargs.get("sliding_window")
    if window:
        keep = keep & (rows - cols < window)
    mask = keep[None, None]  # (1, 1, L, S)
    if padding is not None:
        mask = mask & padding[:, None, None, -S:].bool()  # (N, 1, L, S)
    return SDPACall.of(query, key, mask, False, kwargs.get("scaling"), kwargs.get("softcap"))


def _dispatch(module: nn.Module, role: str, query: torch.Tensor, key: torch.Tensor,
              attention_mask: torch.Tensor | None, kwargs: dict[str, Any],
              implementation: str) -> None:
    call = hf_call(module, query, key, attention_mask, kwargs, implementation)
    module.event_dispatcher.dispatch(sdpa_event(module, call, role=role))


def _emitting(fn: Callable, implementation: str) -> Callable:
    """``fn`` (an attention-interface function) that also dispatches the event of an
    instrumented module while its dispatcher has listeners."""

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        out = fn(module, query, key, value, attention_mask, *args, **kwargs)
        role = vars(module).get("attnscope_role")  # None: a module nobody instrumented
        if role is not None and module.event_dispatcher.has_listeners:
            if args:  # scaling, dropout... passed by position: named as fn names them
                bound = signature.bind_partial(module, query, key, value, attention_mask,
                                               *args, **kwargs).arguments
                kwargs = {**bound.pop("kwargs", {}), **bound}
            emit_eagerly(_dispatch, module, role, query, key, attention_mask, kwargs,
                         implementation)
        return out

    setattr(attention, _MARK, True)
    return attention


def _wrap_interfaces(modeling: Any) -> None:
    """Wrap every registered attention function and ``modeling``'s own eager one (once)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in list(ALL_ATTENTION_FUNCTIONS.keys()):
        fn = ALL_ATTENTION_FUNCTIONS[name]
        if not getattr(fn, _MARK, False):
            ALL_ATTENTION_FUNCTIONS[name] = _emitting(fn, name)
    eager = getattr(modeling, "eager_attention_forward", None)
    if eager is not None and not getattr(eager, _MARK, False):
        modeling.eager_attention_forward = _emitting(eager, "eager")


def is_hf_attention(module: nn.Module) -> bool:
    """Whether ``type(module).forward`` calls the attention interface."""
    if "transformers" not in sys.modules:
        return False
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and any(n in code.co_names for n in _INTERFACE_NAMES)


def _role(name: str, module: nn.Module) -> str:
    cross = getattr(module, "is_cross_attention", None)
    if cross is None:
        cross = any(part in name.lower() for part in _CROSS_NAMES)
    return "cross" if cross else "self"


def instrument_hf(name: str, module: nn.Module, index: int) -> AttentionSite:
    """Make the Hugging Face attention ``module`` dispatch AttentionEvents."""
    _wrap_interfaces(sys.modules[type(module).__module__])
    dispatcher = dispatcher_of(module)
    role = _role(name, module)
    module.attnscope_role = role
    config = getattr(module, "config", None)
    heads = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads", None)
    d_model = getattr(config, "hidden_size", None)
    return AttentionSite(index=index, name=name, module=module, dispatcher=dispatcher,
                         qkv_dispatcher=None, heads=heads, d_model=d_model, role=role,
                         attention_type="full", kind=KIND)
