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

from .reduce import layer_statistics
from .roles import PATTERN_NAMES, REPEAT_NAMES

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
    None when no key is masked. (The first rows of
    :func:`~attnscope.core.reduce.layer_statistics`, which stays on the device.)
    """
    return layer_statistics(p, valid)[: len(STAT_NAMES)].cpu()


def head_statistics(p: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """:func:`head_stats`, the pattern scores and NaN induction rows: (13, H) on the CPU,
    in :data:`HEAD_STATISTICS` order (the rows the history stores per step; the
    induction rows are filled from its probe).

    >>> head_statistics(torch.eye(3)[None], None)[:, 0].tolist()[5:]
    [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, nan, nan]
    """
    return with_repeat_rows(layer_statistics(p, valid)).cpu()  # (13, H)


def with_repeat_rows(stats: torch.Tensor) -> torch.Tensor:
    """(11, H) statistics and pattern scores -> (13, H) :data:`HEAD_STATISTICS` rows, the
    induction rows NaN (the history fills them from its probe), on ``stats``' device."""
    repeat = torch.full((len(REPEAT_NAMES), stats.shape[1]), float("nan"),
                        device=stats.device)  # (2, H)
    return torch.cat([stats, repeat])  # (13, H)


@dataclass(frozen=True)
class MaskInfo:
    """What decides which keys a query row may see; kept from an event to count them later."""

    attn_mask: BaseMask | None
    key_lengths: BaseMask | None
    attention_type: str

    @classmethod
    def of(cls, event: AttentionEvent) -> MaskInfo:
        return cls(event.attn_mask, event.key_lengths, event.attention_type)


def valid_key_counts(masks: MaskInfo, sample: int, L: int, S: int,
                     on_device: bool = False) -> torch.Tensor | None:
    """Unmasked keys per query row (L,) of ``sample``, or None if nothing is masked; on the
    CPU, or where the masks are with ``on_device`` (no host synchronisation)."""
    def here(t: torch.Tensor) -> torch.Tensor:
        return t if on_device else t.cpu()

    valid = None
    mask = masks.attn_mask
    if mask is not None and not mask.all_ones:
        valid = here(mask.bool_matrix[:L, :S])  # (L, S)
    if masks.attention_type == "causal-linear":
        device = "cpu" if valid is None else valid.device
        tri = torch.ones(L, S, dtype=torch.bool, device=device).tril()
        valid = tri if valid is None else valid & tri
    lengths = masks.key_lengths
    if lengths is not None and not lengths.all_ones:
        keys = here(lengths.bool_matrix[sample, :S])  # (S,)
        valid = keys.expand(L, S) if valid is None else valid & keys.to(valid.device)
    return None if valid is None else valid.sum(-1)
