"""Turning our masks into what the fused kernel and the lazy matrix need."""

from __future__ import annotations

import torch

from ..masking import BaseMask


def sdpa_mask(
    attn_mask: BaseMask | None, key_lengths: BaseMask | None, L: int, S: int
) -> tuple[torch.Tensor | None, bool]:
    """The ``(attn_mask, is_causal)`` pair for ``scaled_dot_product_attention``.

    All-ones masks become ``None`` (the kernel then never sees an L x S mask);
    a causal attention mask alone becomes ``is_causal=True``. Otherwise a bool
    mask broadcastable to (N, H, L, S): (1, 1, L, S), (N, 1, 1, S) or (N, 1, L, S).
    """
    dense = attn_mask is not None and not attn_mask.all_ones
    lengths = key_lengths is not None and not key_lengths.all_ones
    if not dense and not lengths:
        return None, False
    if dense and not lengths and attn_mask.lower_triangular and L == S:
        return None, True
    mask = None
    if dense:
        mask = attn_mask.bool_matrix[None, None]  # (1, 1, L, S)
    if lengths:
        keys_ok = key_lengths.bool_matrix[:, None, None, :S]  # (N, 1, 1, S)
        mask = keys_ok if mask is None else mask & keys_ok
    return mask, False


def apply_masks(
    logits: torch.Tensor,
    attn_mask: BaseMask | None,
    key_lengths: BaseMask | None,
    samples,
) -> torch.Tensor:
    """Set masked entries of ``logits`` (n, h, L, S) to -inf; ``samples`` indexes N."""
    if attn_mask is not None and not attn_mask.all_ones:
        logits = logits.masked_fill(~attn_mask.bool_matrix, float("-inf"))
    if key_lengths is not None and not key_lengths.all_ones:
        keys_ok = key_lengths.bool_matrix[samples][:, None, None, : logits.shape[-1]]
        logits = logits.masked_fill(~keys_ok, float("-inf"))
    return logits


def select(t: torch.Tensor, samples, heads) -> torch.Tensor:
    """``t[samples][:, :, heads]`` for a (N, X, H, E) tensor, keeping every dimension."""
    return t[samples][:, :, heads]
