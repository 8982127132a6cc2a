"""What the stream captures, in the terms every side shares: a :class:`Plan` (the union
of a run's subscriptions, per layer and sample) and a :class:`Capture` (one array in a
latest-value slot). Core: the hub builds plans, the in-process and remote publishers
follow them, the wire carries both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.stats import MaskInfo

SlotKey = tuple[str, int, int]  # (kind, layer, sample)


@dataclass(frozen=True)
class SampleNeed:
    """What the union of subscriptions wants from one layer for one sample.

    ``*_heads`` are the heads to capture: a sorted tuple, or None for all heads.
    ``attention_heads`` is None (all) whenever ``stats`` is set. ``max_side``: pool
    the attention view to at most this side where it is computed (every subscriber
    of this sample asks for it), or None: capture it at full resolution.
    """

    sample: int
    attention: bool = False
    attention_heads: tuple[int, ...] | None = None
    logits: bool = False
    logits_heads: tuple[int, ...] | None = None
    stats: bool = False
    qkv: bool = False
    qkv_heads: tuple[int, ...] | None = None
    max_side: int | None = None


@dataclass(frozen=True)
class Plan:
    """The union of a run's subscriptions, swapped atomically into the publisher.

    ``sources`` holds ``("attn" | "qkv", layer)`` for each site whose AttentionEvents
    or QKVEvents are wanted (the same in every process: a publisher maps them to its
    own modules with :attr:`attnscope.contract.layout.LocalModel.sources`); ``needs[layer]``
    lists per-sample needs.
    """

    interval: float = 1.0
    sources: frozenset[tuple[str, int]] = frozenset()
    needs: dict[int, tuple[SampleNeed, ...]] = field(default_factory=dict)
    scalars: bool = False

    @property
    def empty(self) -> bool:
        return not self.sources and not self.scalars


EMPTY_PLAN = Plan()


@dataclass(eq=False, slots=True)
class Capture:
    """One captured array, as put into a latest-value slot.

    ``data`` is on the CPU: attention (h, L, S) float16, qk_logits (h, L, S)
    float32, qkv_norms (3, h, P) float32, head_stats: the statistics of all H
    heads (11, H) float32 (``STAT_NAMES + PATTERN_NAMES``, reduced where the
    attention was computed), or, from an older remote publisher, their attention
    (H, L, S) float16 with ``masks``. When ``ready`` is a CUDA event, ``data`` is
    still arriving from the device; when ``pending`` is set, it is computed by the
first reader (off the training thread): read it through :meth:`wait`, which any
    thread may call (the first computes, the others wait for it). An attention
    capture pooled where it was computed has ``pool`` > 1 and its (L, S) in
    ``full_shape``.
    ``cache`` holds its encodings by view, filled lazily by the hub's encoder thread.
    ``event`` and ``need``: for a capture computed when first read, the sample copy and
    the need it is computed from (what a training process sends instead of ``data``).
    """

    kind: str
    layer: int
    sample: int
    heads: tuple[int, ...]
    data: torch.Tensor
    role: str
    time: float
    step: int = 0
    seq: int = 0
    labels: tuple[list[str] | None, list[str] | None] | None = None
    masks: MaskInfo | None = None
    cache: dict[Any, Any] = field(default_factory=dict)
    ready: Any = None  # torch.cuda.Event recorded after the copy into ``data``
    pool: int = 1  # attention pooled by this factor where captured
    full_shape: tuple[int, int] | None = None  # (L, S) before that pooling
    pending: Callable[[], torch.Tensor] | None = None  # computes ``data`` when first read
    # What ``pending`` computes from: the sample's event copy (queries and keys) and the
    # need it serves; a training process sends these to the server's process instead.
    event: Any = None
    need: SampleNeed | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def wait(self) -> torch.Tensor:
        """``data``, once computed (``pending``) or arrived from the device (``ready``);
        blocks the reader only. Thread-safe: the stream's encoder and the heads feed
        may read one capture at once; ``pending`` runs once."""
        if self.pending is None and self.ready is None:
            return self.data
        with self._lock:
            if self.pending is not None:
                self.data = self.pending()
                self.pending = None
            if self.ready is not None:
                self.ready.synchronize()
                self.ready = None
        return self.data
