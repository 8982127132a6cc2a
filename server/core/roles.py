"""Head-role scores of attention matrices, batched over heads: what each head does.

Pure functions beside :mod:`.stats`; the per-step scores are computed with the head
statistics by :func:`~attnscope.core.reduce.layer_statistics`, where the attention
is (in float32). Scores are the
mean attention weight on the key a role predicts (TransformerLens's detector
convention), so 1.0 means "every query does exactly this" and all are in [0, 1].

>>> eye = torch.eye(4)[None]                              # (H=1, L=4, S=4): a self head
>>> shift = torch.eye(4).roll(-1, 1).tril()[None]         # key i-1 (row 0 has none)
>>> shift[0, 0, 0] = 1.0                                  # row 0 attends to itself
>>> s = pattern_scores(torch.cat([eye, shift]))           # (6, H=2)
>>> dict(zip(PATTERN_NAMES, [[round(v, 2) for v in row] for row in s.tolist()]))
{'distance': [0.0, 1.0], 'previous_token': [0.0, 1.0], 'diagonal': [1.0, 0.0], \
'local': [1.0, 1.0], 'sink': [0.0, 0.33], 'uniform': [0.0, 0.0]}

Shape legend: H heads, L queries, S keys, R role scores, K layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .reduce import local_window as local_window  # re-exported: part of the role rules
from .reduce import pattern_rows

# Per-step pattern scores (from any input), in this order.
PATTERN_NAMES = ("distance", "previous_token", "diagonal", "local", "sink", "uniform")
# Scores that need a probe whose second half repeats its first half.
REPEAT_NAMES = ("induction", "duplicate_token")
# Roles a head can be tagged with.
ROLES = ("previous_token", "sink", "diagonal", "local", "uniform", "induction",
         "duplicate_token")
# Tried first, highest score wins: each names one key per query.
SPECIFIC_ROLES = ("induction", "duplicate_token", "previous_token", "diagonal", "sink")


def pattern_scores(p: torch.Tensor, valid: torch.Tensor | None = None,
                   entropy: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (6, H) on the CPU of attention ``p`` (H, L, S), in :data:`PATTERN_NAMES` order.

    Query rows 1..L-1 are averaged (row 0 of a causal head has one key, so it
    would count towards every role). ``distance`` is the mean |i - j| weighted
    by attention, in positions; ``previous_token`` the weight on key i-1,
    ``diagonal`` on key i, ``local`` within :func:`local_window` of i, ``sink``
    on key 0; ``uniform`` the entropy of the rows with more than one unmasked
    key (``valid`` (L,) counts them; None: all S) over log(their key count), so a
    causal head spreading evenly scores 1. ``entropy`` (H,), when given, is
    :func:`~attnscope.core.stats.head_stats`' entropy of the same ``p`` and
    ``valid``, from which ``uniform`` follows without a second pass. Positional
    scores are NaN when L != S (cross-attention); NaN attention gives NaN scores.
    (:func:`~attnscope.core.reduce.layer_statistics` computes these with the head
    statistics, on the device.)
    """
    p = p.detach().float()  # (H, L, S); no copy if it is float32 already
    H, L, S = p.shape
    counts = torch.full((L,), float(S), device=p.device) if valid is None \
        else valid.to(p.device, torch.float32)  # (L,)
    many = counts > 1  # (L,)
    if entropy is not None:  # head_stats' mean counts rows with one key as 0
        entropy_sum = entropy.to(p.device) * L  # (H,)
    else:
        rows_entropy = -torch.xlogy(p, p).sum(-1) / counts.clamp_min(2.0).log()  # (H, L)
        entropy_sum = torch.where(many, rows_entropy, torch.zeros_like(rows_entropy)).sum(-1)
    return pattern_rows(p, entropy_sum, many).cpu()  # (6, H)


def repeat_scores(p: torch.Tensor, half: int) -> torch.Tensor:
    """Scores (2, H) of attention ``p`` (H, L, S) on a probe whose tokens at
    ``half``..2*half-1 repeat those at 0..half-1, in :data:`REPEAT_NAMES` order.

    Over the query rows i of the repeat (half <= i < 2*half): ``induction`` is
    the weight on key i-half+1 (the token after this token's first occurrence:
    what an induction head copies), ``duplicate_token`` the weight on key i-half
    (the first occurrence itself). The last row's induction key is i itself
    minus half-1, always visible to a causal head.

    >>> p = torch.zeros(1, 6, 6); p[0, 0, 0] = 1
    >>> for i in range(1, 6): p[0, i, max(0, i - 2)] = 1.0  # key i-half+1 with half=3
    >>> repeat_scores(p, 3).tolist()
    [[1.0], [0.0]]
    """
    p = p.detach().float()  # (H, L, S)
    H, L, S = p.shape
    if half < 2 or 2 * half > min(L, S):
        raise ValueError(f"half: need 2 <= half and 2*half <= min(L, S) = {min(L, S)}, "
                         f"got {half}")
    rows = p[:, half: 2 * half]  # (H, half, S)
    i = torch.arange(half, 2 * half, device=p.device)  # (half,)
    induction = rows[:, torch.arange(half), i - half + 1].mean(-1)  # (H,)
    duplicate = rows[:, torch.arange(half), i - half].mean(-1)  # (H,)
    return torch.stack([induction, duplicate]).cpu()  # (2, H)


def repeated_probe(x: torch.Tensor) -> torch.Tensor:
    """The probe input with tokens half..2*half-1 replaced by tokens 0..half-1 (half =
    L // 2; an odd last token stays): (N, L, ...) -> (N, L, ...), an induction probe of
    the same shape, so the model sees nothing new but the repeat.

    >>> repeated_probe(torch.tensor([[5, 6, 7, 8, 9]])).tolist()
    [[5, 6, 5, 6, 9]]
    """
    if x.ndim < 2 or x.shape[1] < 4:
        raise ValueError(f"x: expected (N, L, ...) with L >= 4, got {tuple(x.shape)}")
    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, :half], x[:, 2 * half:]], dim=1)


@dataclass(frozen=True)
class RoleRule:
    """When a score makes a role: a head takes a role at ``threshold`` and keeps it
    while its score stays at or above ``keep`` (hysteresis: no flicker at the edge)."""

    # 0.4 of the weight on the one key the role names (TransformerLens's detectors flag
    # heads from about there); the induction demo's previous-token head sits near 0.5,
    # as its layer shares the job between heads.
    threshold: float = 0.4
    keep: float = 0.3
    # "local": most weight near the diagonal; a uniform causal head scores ~0.5 at L=24.
    local_threshold: float = 0.8
    local_keep: float = 0.7
    # "uniform": normalised entropy; 1.0 = weights spread evenly over all keys.
    uniform_threshold: float = 0.9
    uniform_keep: float = 0.85
    # Collapsed: entropy this low with no role (each query looks at one arbitrary key).
    collapsed_entropy: float = 0.02

    def bounds(self, role: str) -> tuple[float, float]:
        """(take, keep) thresholds of ``role``."""
        if role == "local":
            return self.local_threshold, self.local_keep
        if role == "uniform":
            return self.uniform_threshold, self.uniform_keep
        return self.threshold, self.keep


def assign_roles(scores: dict[str, torch.Tensor], previous: list[str | None],
                 rule: RoleRule = RoleRule()) -> list[str | None]:
    """The role of each of H heads from ``scores`` (role name -> (H,), NaN = unknown)
    and each head's ``previous`` role.

    The specific roles (one key per query: induction, duplicate, previous token,
    diagonal, sink) are tried first, highest score at or above ``threshold`` wins;
    then ``local``, then ``uniform``; none passes: None. A head keeps its previous
    role while that score stays at or above its ``keep`` bound (no flicker at the
    edge), unless a specific role beats a generic one or outscores a specific one.

    >>> t = lambda *v: torch.tensor(v)
    >>> assign_roles({"previous_token": t(0.9, 0.45, 0.1), "uniform": t(0.1, 0.2, 0.95)},
    ...              [None, "previous_token", None])
    ['previous_token', 'previous_token', 'uniform']
    """
    H = len(previous)
    values = {name: scores[name].tolist() for name in ROLES if name in scores}
    out: list[str | None] = []
    for h in range(H):
        def score(name: str, h: int = h) -> float:
            v = values.get(name)
            return -math.inf if v is None or not math.isfinite(v[h]) else v[h]

        best = max(SPECIFIC_ROLES, key=score)
        fresh = best if score(best) >= rule.threshold else None
        kept = previous[h]
        holds = kept is not None and score(kept) >= rule.bounds(kept)[1]
        # kept, unless a specific role beats a generic one or outscores a specific one
        if holds and (fresh is None or fresh == kept
                      or (kept in SPECIFIC_ROLES and score(kept) >= score(fresh))):
            out.append(kept)
            continue
        if fresh is not None:
            out.append(fresh)
        elif score("local") >= rule.local_threshold:
            out.append("local")
        elif score("uniform") >= rule.uniform_threshold:
            out.append("uniform")
        else:
            out.append(None)
    return out
