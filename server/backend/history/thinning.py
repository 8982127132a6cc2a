"""Which snapshot to drop when a run's history is full: logarithmic thinning.

Snapshots are kept so that the gap between neighbours grows in proportion to
their age: recent steps stay dense (every K steps), old ones get sparse, and
the first and the newest snapshot are never dropped. Each time one must go,
the one whose removal makes the smallest gap relative to its age goes.

>>> steps = list(range(0, 100, 10))
>>> thinning_victim(steps)  # the oldest interior snapshot: its gap is smallest for its age
1
>>> keep = list(range(0, 1000, 10))
>>> while len(keep) > 12:
...     del keep[thinning_victim(keep)]
>>> keep[0], keep[-1], keep[-2]
(0, 990, 980)
"""

from __future__ import annotations

from collections.abc import Sequence


def thinning_victim(steps: Sequence[int], now: int | None = None) -> int:
    """Index into ``steps`` (sorted ascending, at least 3) of the snapshot to drop.

    ``now`` is the current step (default: the newest snapshot). The cost of
    dropping snapshot i is the gap it leaves, ``steps[i+1] - steps[i-1]``,
    divided by its age ``now - steps[i] + 1``; the cheapest goes (the oldest on
    ties). Never 0 nor the last index.
    """
    if len(steps) < 3:
        raise ValueError(f"steps: need at least 3 snapshots to thin, got {len(steps)}")
    now = steps[-1] if now is None else now
    best, best_cost = 1, float("inf")
    for i in range(1, len(steps) - 1):
        cost = (steps[i + 1] - steps[i - 1]) / (now - steps[i] + 1)
        if cost < best_cost:
            best, best_cost = i, cost
    return best
