"""Turning our masks into what the fused kernel and the lazy matrix need."""

from __future__ import annotations

import torch

from ..events import SoftmaxScores
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


def softmax_scores(queries: torch.Tensor, keys: torch.Tensor, scale: float,
                   attn_mask: BaseMask | None, key_lengths: BaseMask | None) -> SoftmaxScores:
    """The logits of ``softmax_logits`` as :class:`SoftmaxScores`: a causal attention mask
    becomes the band (None, 0) (no (L, S) tensor read), other masks bool (1, 1, L, S) and
    key lengths (N, 1, 1, S). queries (N, L, H, E), keys (N, S, H, E)."""
    S = keys.shape[1]
    band: tuple[int | None, int | None] = (None, None)
    masks = []
    if attn_mask is not None and not attn_mask.all_ones:
        if attn_mask.lower_triangular:
            band = (None, 0)
        else:
            masks.append(attn_mask.bool_matrix[None, None])  # (1, 1, L, S)
    if key_lengths is not None and not key_lengths.all_ones:
        masks.append(key_lengths.bool_matrix[:, None, None, :S])  # (N, 1, 1, S)
    return SoftmaxScores(queries, keys, scale, band, tuple(masks))


def apply_masks(
    logits: torch.Tensor,
    attn_mask: BaseMask | None,
    key_lengths: BaseMask | None,
    samples,
) -> torch.Tensor:
    """Set masked entries of ``logits`` (n, h, L, S) to -inf; ``samples`` indexes N."""
    if attn_mask is not None and not attn_mask.all_ones:
        # A mask built on the CPU for a model on a device (as the fused path accepts) is
        # moved here: a no-op when it is already on the logits' device.
        allowed = attn_mask.bool_matrix.to(logits.device)  # (L, S)
        logits = logits.masked_fill(~allowed, float("-inf"))
    if key_lengths is not None and not key_lengths.all_ones:
        keys_ok = key_lengths.bool_matrix[samples][:, None, None, : logits.shape[-1]]
        logits = logits.masked_fill(~keys_ok.to(logits.device), float("-inf"))
    return logits


def select(t: torch.Tensor, samples, heads) -> torch.Tensor:
    """``t[samples][:, :, heads]`` for a (N, X, H, E) tensor, keeping every dimension."""
    return t[samples][:, :, heads]


class UnsupportedMaskError(ValueError, RuntimeError):
    """An attention cannot apply this attention mask (e.g. an arbitrary mask for an
    attention whose cost depends on not building the L x S matrix).

    A ``RuntimeError``, as fast-transformers raises (its callers catch that), and
    a ``ValueError``, as our other argument errors are.
    """


def key_mask(key_lengths: BaseMask | None, S: int) -> torch.Tensor | None:
    """(N, S) bool, True for keys that may be attended; None when none is masked."""
    if key_lengths is None or key_lengths.all_ones:
        return None
    return key_lengths.bool_matrix[:, :S]


def query_mask(query_lengths: BaseMask | None, L: int) -> torch.Tensor | None:
    """(N, L) bool, True for real (not padded) queries; None when none is padded."""
    if query_lengths is None or query_lengths.all_ones:
        return None
    return query_lengths.bool_matrix[:, :L]


def rows(t: torch.Tensor, samples, heads) -> torch.Tensor:
    """``t[samples][:, heads]`` for a tensor laid out (N, H, ...), keeping both dimensions."""
    return t[samples][:, heads]
