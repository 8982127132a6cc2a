"""AttentionEvents of one recurrent step: the current query's row over the keys so far.

Every event here has shape (N, H, 1, S): the step's queries (N, H, E) against
keys (N, S, H, E), S being the keys seen so far (self-attention) or the memory
length (cross-attention). Nothing is computed until a listener reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...events import AttentionEvent, SoftmaxScores
from ...events.portable import Recipe
from ...masking import BaseMask, sample_rows


def _key_mask(key_lengths: BaseMask | None, samples, S: int) -> torch.Tensor | None:
    """(n, 1, 1, S) bool, True for keys a query may see; None when none is masked."""
    if key_lengths is None or key_lengths.all_ones:
        return None
    return key_lengths.bool_matrix[samples][:, None, None, :S]


def softmax_step_logits(query, keys, scale, key_lengths, samples, heads) -> torch.Tensor:
    """Scaled dot products (n, h, 1, S) of query (N, H, E) and keys (N, S, H, E);
    padded keys are -inf."""
    q = query[samples][:, heads]  # (n, h, E)
    k = keys[samples][:, :, heads]  # (n, S, h, E)
    logits = torch.einsum("nhe,nshe->nhs", q, k)[:, :, None] * scale  # (n, h, 1, S)
    allowed = _key_mask(key_lengths, samples, keys.shape[1])
    return logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))


def masked_row_softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension; a row with every key masked is all zeros, not NaN."""
    weights = torch.softmax(logits, dim=-1)
    return weights.masked_fill(torch.isneginf(logits).all(-1, keepdim=True), 0.0)


def softmax_step_event(source, query: torch.Tensor, keys: torch.Tensor, scale: float,
                       key_lengths: BaseMask | None, role: str,
                       matrix: torch.Tensor | None = None) -> AttentionEvent:
    """The event of softmax attention of query (N, H, E) over keys (N, S, H, E).

    ``matrix`` (N, H, 1, S), when the attention already computed it, is the cache.
    """
    N, H, _ = query.shape

    def logits(n, h):
        return softmax_step_logits(query, keys, scale, key_lengths, n, h)

    def copy(n: int) -> AttentionEvent:
        q = query[n : n + 1].detach().clone()  # (1, H, E)
        k = keys[n : n + 1].detach().clone()  # (1, S, H, E)
        return softmax_step_event(source, q, k, scale, sample_rows(key_lengths, n), role)

    return AttentionEvent(
        source, (N, H, 1, keys.shape[1]), logits,
        lambda n, h: masked_row_softmax(logits(n, h)),
        queries=query[:, None],  # (N, 1, H, E)
        keys=keys, key_lengths=key_lengths, softmax_temp=scale, role=role,
        attention_type="full", matrix=matrix, copy_fn=copy,
        scores_fn=lambda: _step_scores(query, keys, scale, key_lengths),
        recipe=Recipe("softmax_step", {"scale": float(scale)}, {"query": query, "keys": keys},
                      {"key_lengths": key_lengths}),
    )


def _step_scores(query: torch.Tensor, keys: torch.Tensor, scale: float,
                 key_lengths: BaseMask | None) -> SoftmaxScores:
    """The logits of one step, query (N, H, E) over keys (N, S, H, E), as SoftmaxScores."""
    allowed = _key_mask(key_lengths, slice(None), keys.shape[1])  # (N, 1, 1, S) or None
    return SoftmaxScores(query[:, None], keys, scale,
                         masks=() if allowed is None else (allowed,))


def softmax_step_event_of(source, query: torch.Tensor, keys: torch.Tensor,
                          key_lengths: BaseMask | None = None, *, scale: float,
                          role: str = "self", attention_type: str = "full") -> AttentionEvent:
    """:func:`softmax_step_event` by keyword (how :mod:`transformer_core.events.portable`
    builds it again)."""
    return softmax_step_event(source, query, keys, scale, key_lengths, role)


def _stacked(feature_keys: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, S, H, E') from a tensor or from S per-step tensors (N, H, E')."""
    if isinstance(feature_keys, torch.Tensor):
        return feature_keys
    return torch.stack(tuple(feature_keys), dim=1)


def linear_step_event(source, phi_q: torch.Tensor,
                      feature_keys: torch.Tensor | Sequence[torch.Tensor],
                      normaliser: torch.Tensor, unrecorded: int,
                      key_lengths: BaseMask | None, role: str) -> AttentionEvent:
    """The implied attention of a linear attention step.

    ``phi_q`` (N, H, E') is the feature-mapped query; ``feature_keys`` the
    feature-mapped keys (N, S', H, E') (padded keys already zeroed), or S'
    per-step tensors (N, H, E') stacked only when read; ``normaliser`` (N, H)
    is the sum the attention divided by, phi(q) . sum_j phi(k_j) + eps. The row
    (N, H, 1, unrecorded + S') is phi(q) . phi(k_j) / normaliser: exactly the
    weights the output used. The first ``unrecorded`` keys (folded into the
    state before anyone listened) are reported as weight 0 and logit -inf.
    """
    N, H, _ = phi_q.shape
    count = unrecorded + (len(feature_keys) if not isinstance(feature_keys, torch.Tensor)
                          else feature_keys.shape[1])

    def scores(n, h):
        k = _stacked(feature_keys)[n][:, :, h]  # (n, S', h, E')
        return torch.einsum("nhe,nshe->nhs", phi_q[n][:, h], k)[:, :, None]  # (n, h, 1, S')

    def padded(values: torch.Tensor, fill: float) -> torch.Tensor:
        if unrecorded == 0:
            return values
        pad = values.new_full((*values.shape[:-1], unrecorded), fill)
        return torch.cat([pad, values], dim=-1)  # (n, h, 1, S)

    def matrix(n, h):
        return padded(scores(n, h) / normaliser[n][:, h][:, :, None, None], 0.0)

    def logits(n, h):
        return padded(scores(n, h).log(), float("-inf"))

    def copy(n: int) -> AttentionEvent:
        q = phi_q[n : n + 1].detach().clone()  # (1, H, E')
        k = _stacked(feature_keys)[n : n + 1].detach().clone()  # (1, S', H, E')
        z = normaliser[n : n + 1].detach().clone()  # (1, H)
        return linear_step_event(source, q, k, z, unrecorded, sample_rows(key_lengths, n), role)

    recipe = None if not isinstance(feature_keys, torch.Tensor) else Recipe(
        "kernel_step", {"unrecorded": int(unrecorded)},
        {"phi_q": phi_q, "feature_keys": feature_keys, "normaliser": normaliser},
        {"key_lengths": key_lengths})
    return AttentionEvent(
        source, (N, H, 1, count), logits, matrix, key_lengths=key_lengths, role=role,
        attention_type="linear", copy_fn=copy, recipe=recipe,
    )


def linear_step_event_of(source, phi_q: torch.Tensor, feature_keys: torch.Tensor,
                         normaliser: torch.Tensor, key_lengths: BaseMask | None = None, *,
                         unrecorded: int, role: str = "self",
                         attention_type: str = "linear") -> AttentionEvent:
    """:func:`linear_step_event` by keyword (how :mod:`transformer_core.events.portable`
    builds it again)."""
    return linear_step_event(source, phi_q, feature_keys, normaliser, unrecorded, key_lengths,
                             role)
