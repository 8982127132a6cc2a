"""Per-head statistics of an attention matrix, so a page can flag collapsed, dead or broken heads.

>>> p = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # one head, (L=2, S=2)
>>> head_stats(p, None).tolist()  # entropy, max weight, first-token weight, NaN, Inf
[[0.5], [0.75], [0.75], [0.0], [0.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transformer_core.events import AttentionEvent
from transformer_core.masking import BaseMask

from .roles import PATTERN_NAMES, REPEAT_NAMES, pattern_scores

STAT_NAMES = ("entropy", "max_weight", "first_token", "nan", "inf")
# The rows of head_statistics: the history's per-step record of each head (induction
# and duplicate_token are filled there from the latest induction probe).
HEAD_STATISTICS = (*STAT_NAMES, *PATTERN_NAMES, *REPEAT_NAMES)


def head_stats(p: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Statistics (5, H) on the CPU of one sample's attention ``p`` (H, L, S).

    Rows: normalised entropy (mean over query rows of the row entropy divided
    by log(number of unmasked keys); 0 = one-hot, 1 = uniform; rows with one
    key count as 0), mean max weight, mean weight on key 0, NaN count, Inf
    count. ``valid`` is the number of unmasked keys per query row (L,), or
    None when no key is masked.
    """
    p = p.detach().float()  # (H, L, S)
    S = p.shape[-1]
    counts = torch.full(p.shape[1:2], float(S), device=p.device) if valid is None \
        else valid.to(p.device, torch.float32)  # (L,)
    entropy = -torch.xlogy(p, p).sum(-1)  # (H, L); NaN rows stay NaN
    norm = counts.clamp_min(2.0).log()  # (L,)
    entropy = torch.where(counts > 1, entropy / norm, torch.zeros_like(entropy))
    stats = torch.stack([
        entropy.mean(-1),
        p.amax(-1).mean(-1),
        p[..., 0].mean(-1),
        p.isnan().sum((-1, -2)).float(),
        p.isinf().sum((-1, -2)).float(),
    ])  # (5, H)
    return stats.cpu()


def head_statistics(p: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """:func:`head_stats`, the pattern scores and NaN induction rows: (13, H) on the CPU,
    in :data:`HEAD_STATISTICS` order (the rows the history stores per step; the
    induction rows are filled from its probe).

    >>> head_statistics(torch.eye(3)[None], None)[:, 0].tolist()[5:]
    [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, nan, nan]
    """
    p = p.detach().float()  # (H, L, S): converted once for both
    stats = head_stats(p, valid)  # (5, H)
    patterns = pattern_scores(p, valid, entropy=stats[0])  # (6, H)
    repeat = torch.full((len(REPEAT_NAMES), stats.shape[1]), float("nan"))  # (2, H)
    return torch.cat([stats, patterns, repeat])  # (13, H)


@dataclass(frozen=True)
class MaskInfo:
    """What decides which keys a query row may see; kept from an event to count them later."""

    attn_mask: BaseMask | None
    key_lengths: BaseMask | None
    attention_type: str

    @classmethod
    def of(cls, event: AttentionEvent) -> MaskInfo:
        return cls(event.attn_mask, event.key_lengths, event.attention_type)


def valid_key_counts(masks: MaskInfo, sample: int, L: int, S: int) -> torch.Tensor | None:
    """Unmasked keys per query row (L,) of ``sample``, or None if nothing is masked."""
    valid = None
    mask = masks.attn_mask
    if mask is not None and not mask.all_ones:
        valid = mask.bool_matrix[:L, :S].cpu()  # (L, S)
    if masks.attention_type == "causal-linear":
        tri = torch.ones(L, S, dtype=torch.bool).tril()
        valid = tri if valid is None else valid & tri
    lengths = masks.key_lengths
    if lengths is not None and not lengths.all_ones:
        keys = lengths.bool_matrix[sample, :S].cpu()  # (S,)
        valid = keys.expand(L, S) if valid is None else valid & keys
    return None if valid is None else valid.sum(-1)
