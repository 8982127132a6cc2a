"""Reductions where the tensors live: head statistics of a layer in one batched call,
pooled views, and copies to the host that never make the training thread wait.

Nothing here synchronises with a device: no ``.item()``, no ``.cpu()`` of a CUDA
tensor, no data-dependent branch. What crosses to the host is small (statistics
(R, H), views pooled to ``max_side``), copied into pinned memory with
``non_blocking=True``; a :class:`HostCopy` carries the CUDA event recorded after the
copy, and whoever reads it (a writer thread, the event loop) waits on that event.

>>> p = torch.eye(3)[None]                                  # one head, (L=3, S=3)
>>> [round(v, 2) for v in layer_statistics(p)[:, 0].tolist()]  # STAT_NAMES + PATTERN_NAMES
[0.0, 1.0, 0.33, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]

Shape legend: H heads, L queries, S keys, R statistics.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def local_window(keys: int) -> int:
    """Half-width w of the "local" band |i - j| <= w: 2 keys, or S/16 for long sequences.

    >>> local_window(24), local_window(512)
    (2, 32)
    """
    return max(2, keys // 16)


def pattern_rows(p: torch.Tensor, entropy_sum: torch.Tensor, many: torch.Tensor
                 ) -> torch.Tensor:
    """The six pattern scores (6, H) of ``p`` (H, L, S) float32, on its device;
    ``entropy_sum`` (H,) sums the normalised row entropies (0 for rows with one key),
    ``many`` (L,) marks rows with more than one key. See
    :func:`attnscope.core.roles.pattern_scores` for their meaning."""
    H, L, S = p.shape
    n_many = many.sum()  # a tensor: no sync
    uniform = torch.where(n_many > 0, entropy_sum / n_many.clamp_min(1),
                          torch.full_like(entropy_sum, math.nan))  # (H,)
    nan = torch.full_like(uniform, math.nan)  # (H,)
    if L < 2:
        return torch.stack([nan, nan, nan, nan, nan, uniform])  # (6, H)
    rows = p[:, 1:]  # (H, L-1, S): row 0 of a causal head has one key
    sink = rows[..., 0].mean(-1)  # (H,)
    if L != S:
        return torch.stack([nan, nan, nan, nan, sink, uniform])  # (6, H)
    i = torch.arange(1, L, device=p.device)[:, None]  # (L-1, 1)
    j = torch.arange(S, device=p.device)[None, :]  # (1, S)
    offset = (i - j).abs().float()  # (L-1, S)
    band = (offset <= local_window(S)).float()  # (L-1, S)
    weights = torch.stack([offset, band])  # (2, L-1, S)
    sums = torch.einsum("hls,kls->hk", rows, weights) / (L - 1)  # (H, 2)
    previous = rows.diagonal(offset=0, dim1=-2, dim2=-1).mean(-1)  # key i-1
    diagonal = rows.diagonal(offset=1, dim1=-2, dim2=-1).mean(-1)  # key i
    return torch.stack([sums[:, 0], previous, diagonal, sums[:, 1], sink, uniform])  # (6, H)


def layer_statistics(p: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Head statistics and pattern scores (11, H) float32 of one sample's attention ``p``
    (H, L, S), on ``p``'s device, in ``STAT_NAMES + PATTERN_NAMES`` order, all heads in
    one batched call and without a host synchronisation.

    ``valid`` (L,) counts each query row's unmasked keys (None: all S). The values
    equal :func:`attnscope.core.stats.head_stats` and
    :func:`attnscope.core.roles.pattern_scores` of the same ``p`` (computed in
    float32 whatever ``p``'s dtype: a float16 input is converted once, on its device).
    """
    if p.ndim != 3:
        raise ValueError(f"p: expected (H, L, S), got shape {tuple(p.shape)}")
    p = p.detach().float()  # (H, L, S)
    H, L, S = p.shape
    counts = torch.full((L,), float(S), device=p.device) if valid is None \
        else valid.to(p.device, torch.float32)  # (L,)
    many = counts > 1  # (L,)
    entropy_rows = -torch.xlogy(p, p).sum(-1)  # (H, L); NaN rows stay NaN
    entropy_rows = torch.where(many, entropy_rows / counts.clamp_min(2.0).log(),
                               torch.zeros_like(entropy_rows))  # (H, L)
    stats = torch.stack([
        entropy_rows.mean(-1),
        p.amax(-1).mean(-1),
        p[..., 0].mean(-1),
        *_non_finite(p),
    ])  # (5, H)
    return torch.cat([stats, pattern_rows(p, entropy_rows.sum(-1), many)])  # (11, H)


def _non_finite(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN and Inf counts (H,), (H,) float32 of ``p`` (H, L, S).

    On the CPU, where a branch costs no synchronisation, only rows whose sum is not
    finite are searched (a row without NaN or Inf has a finite sum, barring overflow,
    which is then searched too); on a device, one pass each.
    """
    if p.device.type == "cpu":
        bad = ~p.sum(-1).isfinite()  # (H, L)
        if not bad.any():
            zero = torch.zeros(p.shape[0])
            return zero, zero.clone()
        h, _ = bad.nonzero(as_tuple=True)
        rows = p[bad]  # (B, S): the rows to search
        nan = torch.zeros(p.shape[0]).index_add_(0, h, rows.isnan().sum(-1).float())
        inf = torch.zeros(p.shape[0]).index_add_(0, h, rows.isinf().sum(-1).float())
        return nan, inf
    return p.isnan().sum((-1, -2)).float(), p.isinf().sum((-1, -2)).float()


def pool_factor(length: int, keys: int, max_side: int) -> int:
    """The average-pooling factor that brings both sides to at most ``max_side``.

    >>> pool_factor(512, 512, 128), pool_factor(24, 24, 128)
    (4, 1)
    """
    return max(1, math.ceil(max(length, keys) / max_side))


def pool_matrix(data: torch.Tensor, factor: int) -> torch.Tensor:
    """(h, L, S) -> (h, ceil(L/f), ceil(S/f)) float32 on ``data``'s device; edge groups
    average what they hold."""
    data = data.float()
    if factor == 1:
        return data
    return F.avg_pool2d(data[None], factor, factor, ceil_mode=True)[0]


@dataclass
class HostCopy:
    """A tensor on the host, or on its way there from a device.

    ``done`` is the CUDA event recorded after the non-blocking copy into pinned
    memory (None when the source was on the CPU: ready at once). Read
    :attr:`tensor` only after :meth:`wait` (or when :meth:`ready`).
    """

    tensor: torch.Tensor
    done: Any = None  # torch.cuda.Event

    def ready(self) -> bool:
        """Whether the copy has arrived (never blocks)."""
        return self.done is None or bool(self.done.query())

    def wait(self) -> torch.Tensor:
        """The host tensor, once the copy has arrived (blocks the caller, not the device)."""
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        return self.tensor


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> HostCopy:
    """A detached host copy of ``t`` (converted to ``dtype`` first, where ``t`` is).

    From a CUDA tensor: a non-blocking copy into pinned memory and an event recorded
    after it on the current stream; the caller does not wait. From a CPU tensor: a
    copy (the caller's tensor may change after this returns).
    """
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)  # on the device: less to move
    if t.device.type != "cuda":
        return HostCopy(t.to("cpu", copy=True))
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    # blocking: a reader waiting on it sleeps; a default event's synchronize() spins a
    # core (charged to the cost budget as helper CPU, and taken from the training loop's
    # own host threads)
    done = torch.cuda.Event(blocking=True)
    done.record()
    return HostCopy(out, done)


def limit_threads(n: int) -> None:
    """Give the calling (helper) thread ``n`` torch intra-op threads, leaving every other
    thread's count as it was. Not called at present: helper threads use torch's default
    count (switched off while a CI hang was blamed on it; that hang was a test's own race,
    and turning this back on waits for a measurement at scale).

    ``torch.set_num_threads`` sets the calling thread's OpenMP count and a process-wide
    value that each thread copies on its first parallel operation: a helper thread
    that set it alone would lower the count of threads that start computing later
    (the training thread itself, if it has not computed yet). So the process-wide
    value is put back from a short-lived thread, which leaves this thread's own
    count at ``n``.
    """
    if n < 1:
        raise ValueError(f"n: need at least 1 thread, got {n}")
    previous = torch.get_num_threads()  # the process-wide value, copied by this thread
    if previous == n:
        return
    torch.set_num_threads(n)
    restore = threading.Thread(target=torch.set_num_threads, args=(previous,),
                               name="attnscope-threads")
    restore.start()
    restore.join()
    logger.debug("%s: %d torch threads (others keep %d)", threading.current_thread().name,
                 n, previous)


def pool_labels(labels: list[str] | None, factor: int) -> list[str] | None:
    """Group labels by ``factor``: each group is its first and last label joined by ``…``."""
    if labels is None or factor == 1:
        return labels
    groups = [labels[i : i + factor] for i in range(0, len(labels), factor)]
    return [g[0] if len(g) == 1 else f"{g[0]}…{g[-1]}" for g in groups]
