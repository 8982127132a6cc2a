"""Captures of a sample's attention, computed where they are read: what the stream's
tap makes on the training side and the server process (or a relay) makes again from a
sample copy that crossed the channel. Shape legend: h heads, L queries, S keys.
"""

from __future__ import annotations

import threading

import torch

from transformer_core.events import AttentionEvent

from ..contract.plan import Capture, SampleNeed
from .reduce import HostCopy, layer_statistics, pool_factor, pool_matrix, to_host
from .stats import MaskInfo, valid_key_counts

LATER = torch.empty(0)  # the data of a capture computed when first read



def heads_arg(heads: tuple[int, ...] | None) -> list[int] | None:
    """A need's heads as an index list (None: all)."""
    return None if heads is None else list(heads)


def to_cpu_half(t: torch.Tensor) -> HostCopy:
    """Detached float16 copy on the host (converted on the device first: less to move;
    from CUDA without waiting, see :func:`~attnscope.core.reduce.to_host`)."""
    return to_host(t, torch.float16)


def host_capture(kind: str, layer: int, sample: int, heads: tuple[int, ...], copy: HostCopy,
             role: str, now: float) -> Capture:
    return Capture(kind, layer, sample, heads, copy.tensor, role, now, ready=copy.done)


def pooled_view(layer: int, need: SampleNeed, heads: tuple[int, ...], a: torch.Tensor, role: str,
          now: float) -> Capture:
    """The attention capture of ``a`` (h, L, S), pooled where it is to ``need.max_side``."""
    L, S = a.shape[-2:]
    factor = 1 if need.max_side is None else pool_factor(L, S, need.max_side)
    view = a if factor == 1 else pool_matrix(a, factor)  # (h, L/f, S/f) where computed
    cap = host_capture("attention", layer, need.sample, heads, to_cpu_half(view), role, now)
    cap.pool, cap.full_shape = factor, (L, S)
    return cap


def deferred_captures(copy: AttentionEvent, layer: int, need: SampleNeed,
                      heads: tuple[int, ...], role: str, now: float) -> list[Capture]:
    """The ``head_stats`` and ``attention`` captures ``need`` asks of one sample copy
    (1, H, L, S), computed when first read, once for both."""
    L, S = copy.shape[2:]
    memo: dict[str, torch.Tensor] = {}
    lock = threading.Lock()  # the two captures may be read by two threads at once

    def attention() -> torch.Tensor:
        with lock:
            if "a" not in memo:
                with torch.no_grad():
                    memo["a"] = copy.attention(sample=0, heads=heads_arg(need.attention_heads))
            return memo["a"]  # (h, L, S)

    def stats() -> torch.Tensor:
        valid = valid_key_counts(MaskInfo.of(copy), 0, L, S)
        return layer_statistics(attention(), valid)  # (11, H)

    def view() -> torch.Tensor:
        return pooled_view(layer, need, heads, attention(), role, now).data

    out = []
    if need.stats:
        out.append(Capture("head_stats", layer, need.sample, heads, LATER, role, now,
                           pending=stats, event=copy, need=need))
    if need.attention:
        factor = 1 if need.max_side is None else pool_factor(L, S, need.max_side)
        out.append(Capture("attention", layer, need.sample, heads, LATER, role, now,
                           pending=view, pool=factor, full_shape=(L, S), event=copy,
                           need=need))
    return out
