"""Adapter for ``torch.nn.MultiheadAttention``, alone or in ``nn.TransformerEncoderLayer``
/ ``nn.TransformerDecoderLayer``.

While someone listens, q and k are projected again from the module's inputs with its
own weights (the module itself never returns them) and emitted as a lazy
:class:`~transformer_core.events.AttentionEvent`. Inside an encoder layer the
*layer's* forward is wrapped, because the layer's inference fast path
(``torch._transformer_encoder_layer_fwd``) never calls the attention module's
forward; no hooks are used, so the fast path keeps running.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lazy import SDPACall, sdpa_event
from .sites import AttentionSite
from .wrapping import dispatcher_of, wrap_forward

KIND = "multihead"


def _to_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A MultiheadAttention mask (bool: True = masked; float: added) as a float mask."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        mask, float("-inf"))


def _merge_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 N: int, H: int, dtype: torch.dtype) -> torch.Tensor | None:
    """attn_mask (L, S) or (N*H, L, S) and key_padding_mask (N, S), in MHA's convention,
    as one SDPA-convention mask (bool: True = may attend; else float) of (N|1, H|1, L|1, S)."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask.reshape(N, H, *attn_mask.shape[-2:]) if attn_mask.ndim == 3
                     else attn_mask[None, None])  # (N|1, H|1, L, S)
    if key_padding_mask is not None:
        masks.append(key_padding_mask[:, None, None, :])  # (N, 1, 1, S)
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        allowed = ~masks[0]
        for m in masks[1:]:
            allowed = allowed & ~m
        return allowed
    total = _to_additive(masks[0], dtype)
    for m in masks[1:]:
        total = total + _to_additive(m, dtype)
    return total


def _one_more_key(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` (.., S) in MHA's convention with one more, unmasked, key column."""
    if mask is None:
        return None
    return torch.cat([mask, torch.zeros_like(mask[..., :1])], dim=-1)  # (.., S+1)


def mha_call(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
             key_padding_mask: torch.Tensor | None = None,
             attn_mask: torch.Tensor | None = None) -> SDPACall:
    """The attention ``mha(query, key, ...)`` computes, as an :class:`SDPACall`.

    ``query`` (L, N, D) and ``key`` (S, N, D_k), (N, L, D) when ``batch_first``, or
    unbatched (L, D); masks in MultiheadAttention's convention. ``bias_k`` and
    ``add_zero_attn`` append one key each, as the module does.
    """
    if query.ndim == 2:  # unbatched
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)  # (L, N, D), (S, N, D_k)
    L, N, _ = query.shape
    H, E = mha.num_heads, mha.head_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = None
    if mha.in_proj_bias is not None:
        b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q)  # (L, N, H*E)
    k = F.linear(key, w_k, b_k)  # (S, N, H*E)
    if attn_mask is not None and attn_mask.ndim == 2:
        attn_mask = attn_mask[None]  # (1, L, S)
    extra = []
    if mha.bias_k is not None:
        extra.append(mha.bias_k.expand(1, N, H * E))  # (1, N, H*E)
    if mha.add_zero_attn:
        extra.append(k.new_zeros(1, N, H * E))
    for key_row in extra:
        k = torch.cat([k, key_row])  # (S+1, N, H*E)
        attn_mask, key_padding_mask = _one_more_key(attn_mask), _one_more_key(key_padding_mask)
    if attn_mask is not None and attn_mask.shape[0] == 1:
        attn_mask = attn_mask[0]  # (L, S)
    q = q.reshape(L, N, H, E).permute(1, 2, 0, 3)  # (N, H, L, E)
    k = k.reshape(-1, N, H, E).permute(1, 2, 0, 3)  # (N, H, S, E)
    mask = _merge_masks(attn_mask, key_padding_mask, N, H, q.dtype)
    return SDPACall.of(q, k, mask)


def _mha_args(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
              average_attn_weights=True, is_causal=False):
    return query, key, key_padding_mask, attn_mask


def _emit_mha(mha: nn.Module, args: tuple, kwargs: dict, out) -> None:
    query, key, key_padding_mask, attn_mask = _mha_args(*args, **kwargs)
    call = mha_call(mha, query, key, key_padding_mask, attn_mask)
    mha.event_dispatcher.dispatch(sdpa_event(mha, call, role=mha.attnscope_role))


def _layer_args(src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    return src, src_mask, src_key_padding_mask


def _emit_encoder_layer(layer: nn.Module, args: tuple, kwargs: dict, out) -> None:
    src, src_mask, key_padding_mask = _layer_args(*args, **kwargs)
    if src.is_nested:  # from nn.TransformerEncoder's padding fast path (batch_first)
        lengths = torch.tensor([t.shape[0] for t in src.unbind()], device=src.device)
        src = src.to_padded_tensor(0.0)  # (N, L, D)
        positions = torch.arange(src.shape[1], device=src.device)
        key_padding_mask = positions[None, :] >= lengths[:, None]  # (N, L): True = padding
    x = layer.norm1(src) if layer.norm_first else src
    mha = layer.self_attn
    call = mha_call(mha, x, x, key_padding_mask, src_mask)
    mha.event_dispatcher.dispatch(sdpa_event(mha, call, role="self"))


def instrument_multihead(model: nn.Module, name: str, mha: nn.MultiheadAttention,
                         role: str, index: int) -> AttentionSite:
    """Make ``mha`` emit AttentionEvents on its own dispatcher; the site describing it."""
    dispatcher = dispatcher_of(mha)
    mha.attnscope_role = role
    owner = next((m for m in model.modules()
                  if isinstance(m, nn.TransformerEncoderLayer) and m.self_attn is mha), None)
    if owner is not None:
        wrap_forward(owner, dispatcher, emit=_emit_encoder_layer)
    else:
        wrap_forward(mha, dispatcher, emit=_emit_mha)
    return AttentionSite(index=index, name=name, module=mha, dispatcher=dispatcher,
                         qkv_dispatcher=None, heads=mha.num_heads, d_model=mha.embed_dim,
                         role=role, attention_type="full", kind=KIND)
